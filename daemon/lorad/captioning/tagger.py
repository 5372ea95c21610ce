"""The WD14 tagger: booru-style tags from the ONNX models people already have on disk.

A tagger folder holds ``model.onnx`` (an image batch in, one sigmoid score per tag out) and
``selected_tags.csv`` (columns ``tag_id,name,category,count``, one row per score, in order;
category 9 = rating, 0 = general, 4 = character). Tags are written the kohya way: comma separated,
underscores shown as spaces (except in short emoticons such as ``^_^``), chosen tags excluded.
"""

from __future__ import annotations

import csv
import io
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lorad.captioning.errors import CaptionModelError
from lorad.captioning.model_folder import TAGGER_MODEL, TAGGER_TAGS
from lorad.captioning.options import CaptionOptions

if TYPE_CHECKING:
    import numpy as np
    from PIL import Image

RATING, GENERAL, CHARACTER = 9, 0, 4
# Tags this short are emoticons (^_^, >_<, o_o) whose underscore is part of the picture.
_KEEP_UNDERSCORE_UP_TO = 3
_HINT = (
    "selected_tags.csv must be the tag list that came with model.onnx: a header `tag_id,name,category,count` "
    "and one row per tag."
)


@dataclass(frozen=True)
class Tag:
    """One row of selected_tags.csv: the tag as the model knows it (underscores) and its category."""

    name: str
    category: int


def read_selected_tags(path: Path) -> tuple[Tag, ...]:
    """The tags of a WD14 ``selected_tags.csv``, in file order (= the model's output order).

    Raises :class:`CaptionModelError` naming the file and line when it is not UTF-8 CSV with
    ``name`` and ``category`` columns, a row lacks a name, or a category is not a whole number.
    """
    try:
        text = path.read_bytes().decode("utf-8-sig")
    except OSError as err:
        raise CaptionModelError(f"{path}: cannot be read ({err.strerror or err})", _HINT) from err
    except UnicodeDecodeError as err:
        raise CaptionModelError(f"{path}: not UTF-8 text (byte {err.start})", _HINT) from err
    reader = csv.reader(io.StringIO(text, newline=""))
    try:
        header = [cell.strip().lower() for cell in next(reader, [])]
        if "name" not in header or "category" not in header:
            raise CaptionModelError(
                f"{path} line 1: the header lacks a {'name' if 'name' not in header else 'category'} column",
                _HINT,
            )
        name_col, category_col = header.index("name"), header.index("category")
        tags = []
        for row in reader:
            line = reader.line_num
            if not any(cell.strip() for cell in row):
                continue
            if len(row) <= max(name_col, category_col) or not row[name_col].strip():
                raise CaptionModelError(f"{path} line {line}: the row has no tag name", _HINT)
            try:
                category = int(row[category_col])
            except ValueError:
                raise CaptionModelError(f"{path} line {line}: the category is not a number", _HINT) from None
            tags.append(Tag(row[name_col].strip(), category))
    except csv.Error as err:
        raise CaptionModelError(f"{path} line {reader.line_num}: malformed CSV: {err}", _HINT) from err
    if not tags:
        raise CaptionModelError(f"{path}: lists no tags", _HINT)
    return tuple(tags)


def tag_text(name: str) -> str:
    """How a tag is written in a caption: underscores become spaces, except in short emoticons."""
    return name if len(name) <= _KEEP_UNDERSCORE_UP_TO else name.replace("_", " ")


def _normal(tag: str) -> str:
    return " ".join(tag.replace("_", " ").split()).lower()


def format_tags(scores: Sequence[float], tags: Sequence[Tag], options: CaptionOptions) -> str:
    """The caption for one image's ``scores`` (one per tag, same order as ``tags``).

    Character tags scoring at least ``character_threshold`` come first (they name who is in the
    picture, which a trigger-style LoRA wants up front), then general tags scoring at least
    ``general_threshold``; each group by score, highest first. Rating tags are never written.
    Tags in ``exclude_tags`` are left out whichever way they are spelt (underscores or spaces, any case).
    """
    excluded = {_normal(tag) for tag in options.exclude_tags}
    characters: list[tuple[float, int]] = []
    general: list[tuple[float, int]] = []
    for index, (score, tag) in enumerate(zip(scores, tags, strict=True)):
        score = float(score)
        if tag.category == RATING:
            continue
        if tag.category == CHARACTER:
            if score >= options.character_threshold:
                characters.append((-score, index))
        elif score >= options.general_threshold:
            general.append((-score, index))
    chosen = [tags[index].name for _, index in sorted(characters) + sorted(general)]
    kept = [tag_text(name) for name in chosen if _normal(name) not in excluded]
    return ", ".join(dict.fromkeys(kept))


class WD14Tagger:
    """One loaded WD14 ONNX tagger; see :class:`lorad.captioning.captioner.Captioner`."""

    kind = "wd14"

    def __init__(
        self,
        session: Any,
        tags: tuple[Tag, ...],
        *,
        source: str,
        side: int,
        channels_last: bool,
        max_batch: int | None,
        memory_bytes: int,
    ) -> None:
        self.session = session
        self.tags = tags
        self.source = source
        self.model_version = f"wd14 ({len(tags)} tags)"
        self.input_size = side
        self.channels_last = channels_last
        self.max_batch = max_batch
        self.memory_bytes = memory_bytes  # the network's size on disk: onnxruntime holds no torch tensors
        self._input = session.get_inputs()[0].name
        self._output = session.get_outputs()[0].name
        self._lock = threading.Lock()

    def caption(self, images: Sequence[Image.Image], options: CaptionOptions) -> list[str]:
        import numpy as np

        if not images:
            return []
        arrays = [self._prepare(image) for image in images]
        step = self.max_batch or len(arrays)
        scores: list[np.ndarray] = []
        for start in range(0, len(arrays), step):
            batch = np.stack(arrays[start : start + step])
            with self._lock:
                scores.extend(self.session.run([self._output], {self._input: batch})[0])
        return [format_tags(row, self.tags, options) for row in scores]

    def _prepare(self, image: Image.Image) -> np.ndarray:
        """WD14's input: the picture padded to a white square, resized to the network's side,
        float32 0-255 in BGR channel order (the models were trained with OpenCV's)."""
        import numpy as np
        from PIL import Image as PILImage

        side = max(image.size)
        square = PILImage.new("RGB", (side, side), (255, 255, 255))
        square.paste(image, ((side - image.width) // 2, (side - image.height) // 2))
        square = square.resize((self.input_size, self.input_size), PILImage.Resampling.BICUBIC)
        array = np.asarray(square, dtype=np.float32)[:, :, ::-1]
        array = array if self.channels_last else array.transpose(2, 0, 1)
        return np.ascontiguousarray(array)


def load_tagger(folder: Path, *, device: str = "cpu") -> WD14Tagger:
    """Load ``folder``'s model.onnx with its tag list; on ``cuda[:N]`` onnxruntime's CUDA provider is
    used when installed (onnxruntime-gpu), else the CPU.

    Raises :class:`CaptionModelError` when the network's input is not one image batch of a fixed
    size (NHWC or NCHW, 3 channels) or its output count differs from the tag list's length.
    """
    import onnxruntime

    tags = read_selected_tags(folder / TAGGER_TAGS)
    providers: list[Any] = ["CPUExecutionProvider"]
    if device.startswith("cuda") and "CUDAExecutionProvider" in onnxruntime.get_available_providers():
        index = int(device.partition(":")[2] or 0)
        providers.insert(0, ("CUDAExecutionProvider", {"device_id": index}))
    model_path = folder / TAGGER_MODEL
    session = onnxruntime.InferenceSession(str(model_path), providers=providers)
    shape = list(session.get_inputs()[0].shape)
    if len(shape) == 4 and shape[3] == 3 and isinstance(shape[1], int):
        channels_last, side = True, shape[1]
    elif len(shape) == 4 and shape[1] == 3 and isinstance(shape[2], int):
        channels_last, side = False, shape[2]
    else:
        raise CaptionModelError(
            f"{model_path}: its input has shape {shape}, not a batch of square 3-channel images of a fixed size",
            "Use a WD14 tagger network (input N x size x size x 3).",
        )
    outputs = session.get_outputs()[0].shape
    if isinstance(outputs[-1], int) and outputs[-1] != len(tags):
        raise CaptionModelError(
            f"{model_path}: the network scores {outputs[-1]} tags but {folder / TAGGER_TAGS} lists {len(tags)}", _HINT
        )
    # A batch dimension fixed in the graph (some exports use 1) caps how many images one run takes.
    max_batch = shape[0] if isinstance(shape[0], int) and shape[0] > 0 else None
    return WD14Tagger(
        session,
        tags,
        source=str(folder),
        side=side,
        channels_last=channels_last,
        max_batch=max_batch,
        memory_bytes=model_path.stat().st_size,
    )
