"""The one interface every captioner has, and loading one from a model folder.

A captioner is loaded once and then captions any number of batches: the daemon keeps it resident
in its model registry (keyed by :class:`CaptionerKey`), the CLI loads it for one command.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from lorad.captioning.errors import CaptionModelError
from lorad.captioning.options import KINDS, CaptionOptions

if TYPE_CHECKING:
    from PIL import Image


class Captioner(Protocol):
    """Turns a batch of pictures into one caption each.

    ``kind`` is one of :data:`~lorad.captioning.options.KINDS`; ``source`` the model folder;
    ``model_version`` a short description (the family, e.g. "blip", "git", "wd14 (9083 tags)").
    ``input_size`` is the side in pixels the model looks at (images may be decoded down to it);
    ``max_batch`` the most images one call may take (None: any number).

    ``caption`` returns exactly one string per image, in order (possibly "" when the model has
    nothing to say); the images are upright RGB. It must be safe to call from several threads:
    a resident captioner may serve a caption request and a training job at once.
    """

    kind: str
    source: str
    model_version: str
    input_size: int
    max_batch: int | None

    def caption(self, images: Sequence[Image.Image], options: CaptionOptions) -> list[str]: ...


@dataclass(frozen=True)
class CaptionerKey:
    """What identifies a loaded captioner: its kind, model folder (absolute), device and dtype, and
    whether it may load pickle weights (set only for a model that has no others: see
    :func:`lorad.config.pickle_policy.needs_pickle`)."""

    kind: str
    model: str
    device: str
    dtype: str
    allow_pickle: bool = False


@dataclass(frozen=True)
class ProvidedCaptioner:
    """A captioner ready to use, and how it got there (``resident``: it was already loaded)."""

    captioner: Captioner
    resident: bool
    seconds: float
    model_id: str = ""


# Gives a captioner for the duration of a `with` block (the daemon reserves a resident one from its
# registry; :func:`load_fresh_captioner` loads a private copy).
CaptionerProvider = Callable[[CaptionerKey], AbstractContextManager[ProvidedCaptioner]]


def captioner_placement(kind: str, device_name: str = "auto") -> tuple[str, str]:
    """(device, dtype name) a captioner of ``kind`` runs with for the config-style ``device_name``.

    GPUs run torch captioners in float16 (inference only: half the memory and time, no loss of
    caption quality worth having fp32 for); the CPU and ONNX taggers use float32.
    """
    if kind == "wd14":  # onnxruntime runs it: placing it needs (and imports) no torch
        import onnxruntime

        cuda = "CUDAExecutionProvider" in onnxruntime.get_available_providers()
        return ("cuda:0" if cuda else "cpu") if device_name == "auto" else device_name, "float32"
    from lorad.training.placement import pick_device

    device = pick_device(device_name)
    return str(device), "float16" if device.type == "cuda" else "float32"


def processor_side(image_processor: Any) -> int:
    """The side, in pixels, of the images a transformers image processor feeds its model (its crop
    size, else its resize target; 224 when it says neither)."""
    for attribute in ("crop_size", "size"):
        size = getattr(image_processor, attribute, None)
        if isinstance(size, int):
            return size
        # A dict in transformers 4, a SizeDict (attributes) in 5.
        values = [
            size.get(k) if isinstance(size, Mapping) else getattr(size, k, None)
            for k in ("height", "width", "shortest_edge")
        ]
        sides = [v for v in values if isinstance(v, int)]
        if sides:
            return max(sides)
    return 224


def load_captioner(key: CaptionerKey) -> Captioner:
    """Load the captioner ``key`` names from its (already checked) model folder.

    Raises :class:`CaptionModelError` naming the folder when the files are there but the library
    cannot load them (wrong architecture, damaged weights, a tag list that does not match the network).
    """
    if key.kind not in KINDS:
        raise ValueError(f"unknown captioner kind {key.kind!r}")
    folder = Path(key.model)
    try:
        if key.kind == "wd14":
            from lorad.captioning.tagger import load_tagger

            return load_tagger(folder, device=key.device)
        if key.kind == "clip":
            from lorad.captioning.clip_ranking import load_clip_ranker

            return load_clip_ranker(folder, device=key.device, dtype=key.dtype, allow_pickle=key.allow_pickle)
        from lorad.captioning.sentence import load_sentence_captioner

        return load_sentence_captioner(folder, device=key.device, dtype=key.dtype, allow_pickle=key.allow_pickle)
    except CaptionModelError:
        raise
    except Exception as err:
        # transformers and onnxruntime fail in many ways on a folder that looks complete; the user
        # can act on "this folder does not load" plus the library's own words.
        raise CaptionModelError(
            f"{folder}: the {key.kind} model does not load: {type(err).__name__}: {err}",
            "Check that the folder is a complete, undamaged copy of the model "
            "(download it again if in doubt) and that it is the right kind for "
            f"`{key.kind}`.",
        ) from err


@contextmanager
def load_fresh_captioner(key: CaptionerKey) -> Iterator[ProvidedCaptioner]:
    """The default CaptionerProvider: load the captioner for this block only, then free it."""
    import time

    from lorad.models.registry import free_memory

    start = time.monotonic()
    captioner = load_captioner(key)
    try:
        yield ProvidedCaptioner(captioner=captioner, resident=False, seconds=time.monotonic() - start)
    finally:
        del captioner
        free_memory()
