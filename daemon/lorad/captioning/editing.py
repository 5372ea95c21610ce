"""Reading a folder's captions for a person to review, and writing the ones they edited.

The captions listed are exactly what training reads (the folder walk, the ``metadata.csv`` row
first, then the sidecar). An edit is written where that image's caption already lives (its CSV
row or its sidecar); an image without a caption gets one where the folder keeps captions
(:func:`~lorad.captioning.folder.detect_format`). Edited captions count as a person's from then on.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from lorad.captioning.folder import METADATA_NAME, detect_format, sidecar_caption
from lorad.captioning.record import CaptionRecord
from lorad.captioning.writer import CaptionWriter, lands_inside
from lorad.config.limits import shown
from lorad.data.captions import normalise_rel_path, read_metadata_csv, sidecar_path
from lorad.data.dataset import find_image_files
from lorad.errors import ConfigError, ConfigProblem

NONE, CSV, SIDECAR = "none", "csv", "sidecar"


@dataclass(frozen=True)
class CaptionEntry:
    """One image (``rel``: relative to the folder, posix) and its caption; ``source`` is NONE, CSV or
    SIDECAR; ``generated`` when lorad wrote it and nobody changed it; ``error`` when the sidecar
    exists but cannot be read."""

    rel: str
    caption: str
    source: str
    generated: bool = False
    error: str = ""


@dataclass(frozen=True)
class FolderCaptions:
    """The captions of ``folder``, sorted by path; new captions go to ``format`` ("csv"/"txt") at
    ``written_to`` (the CSV path, or the sidecar naming pattern)."""

    folder: Path
    entries: tuple[CaptionEntry, ...]
    format: str
    written_to: str


def resolve_folder(folder: str, base_dir: Path, source: str) -> Path:
    """``folder`` made absolute against ``base_dir``; ConfigError naming it when it is not a folder."""
    root = (base_dir / Path(folder.strip()).expanduser()).resolve() if folder.strip() else None
    if root is None:
        raise ConfigError([ConfigProblem("folder", "is empty", "name the folder that holds your images")], source)
    if not root.is_dir():
        what = "is a file, not a folder" if root.exists() else "does not exist"
        raise ConfigError([ConfigProblem("folder", f"{root} {what}", "name the folder that holds your images")], source)
    if root == Path(root.anchor):
        raise ConfigError(
            [ConfigProblem("folder", f"{root} is the root of the file system", "name the folder of your images")],
            source,
        )
    return root


def list_captions(root: Path, *, caption_extension: str = ".txt") -> FolderCaptions:
    """Every image under ``root`` with its caption. A metadata.csv training could not read raises
    DataError (naming the file and line)."""
    images = find_image_files(root)
    csv_path = root / METADATA_NAME
    csv_captions = read_metadata_csv(csv_path).captions if csv_path.is_file() else {}
    record = CaptionRecord.load(root)
    entries = []
    for path in images:
        rel = path.relative_to(root).as_posix()
        if rel in csv_captions:
            caption, source, error = csv_captions[rel], CSV, ""
        else:
            text, error = sidecar_caption(path, caption_extension)
            caption, source = (text, SIDECAR) if text is not None else ("", NONE)
        entries.append(
            CaptionEntry(
                rel, caption, source, generated=bool(caption) and record.is_generated(rel, caption), error=error
            )
        )
    fmt = detect_format(root, images, caption_extension)
    target = CaptionWriter(root, format=fmt, captioner="", model="", caption_extension=caption_extension).target
    return FolderCaptions(root, tuple(entries), fmt, target)


def set_captions(
    root: Path, edits: Sequence[tuple[str, str]], *, caption_extension: str = ".txt", source: str = "caption edits"
) -> FolderCaptions:
    """Write ``edits`` ((image path relative to ``root``, caption) pairs; the last for a path wins) and
    return the edited images as they read now. Every edit is checked first and nothing is written unless all are good:
    ConfigError lists each path outside ``root``, not one of its images, or with an empty caption.
    Captions are made one line (runs of whitespace → one space). An edit whose caption file would
    leave ``root`` (an image in a linked folder, a linked caption file) is refused the same way."""
    current = list_captions(root, caption_extension=caption_extension)
    real_root = os.path.realpath(root)
    by_rel = {entry.rel: entry for entry in current.entries}
    problems: list[ConfigProblem] = []
    wanted: dict[str, str] = {}
    for index, (given, caption) in enumerate(edits):
        key = f"edits[{index}].path"
        rel = normalise_rel_path(given)
        if rel is None:
            problems.append(
                ConfigProblem(key, f"{shown(given)} is outside {root}", "give the image's path relative to the folder")
            )
        elif rel not in by_rel:
            problems.append(
                ConfigProblem(
                    key, f"{root / rel} is not an image of the folder", "give the path of an image ListCaptions lists"
                )
            )
        elif (by_rel[rel].source == SIDECAR or (by_rel[rel].source == NONE and current.format == "txt")) and not (
            lands_inside(real_root, sidecar_path(root / rel, caption_extension))
        ):
            problems.append(
                ConfigProblem(
                    key,
                    f"the caption file of {rel} would be outside {root} (a linked folder or file)",
                    "edit it where it lives; lorad writes only inside the folder",
                )
            )
        elif not " ".join(caption.split()):
            problems.append(
                ConfigProblem(
                    f"edits[{index}].caption",
                    f"is empty for {rel}",
                    "write a caption (to caption it again, use CaptionImages)",
                )
            )
        else:
            wanted[rel] = " ".join(caption.split())
    if problems:
        raise ConfigError(problems, source)
    # Each caption goes where training reads it from now, so the edit is the one it sees.
    to_csv = {
        root / rel: text
        for rel, text in wanted.items()
        if by_rel[rel].source == CSV or (by_rel[rel].source == NONE and current.format == "csv")
    }
    to_sidecar = {root / rel: text for rel, text in wanted.items() if root / rel not in to_csv}
    for fmt, captions in (("csv", to_csv), ("txt", to_sidecar)):
        if captions:  # one writer after the other: each reads the caption record the last one saved
            CaptionWriter(root, format=fmt, captioner="", model="", caption_extension=caption_extension).write_edited(
                captions
            )
    after = list_captions(root, caption_extension=caption_extension)
    return FolderCaptions(root, tuple(e for e in after.entries if e.rel in wanted), after.format, after.written_to)
