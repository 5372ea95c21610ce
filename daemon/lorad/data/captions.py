"""Captions: the metadata CSV, ``<stem>.txt`` sidecar files, and per-sample caption preparation.

Captions follow the kohya convention: a caption is a list of tags separated by commas
("ohwx, a cat, sitting on a sofa"). ``prepare_caption`` applies the per-sample transforms
(trigger word, keep_tokens, shuffle, dropout) at training time; the raw caption is what the
scan stores.
"""

from __future__ import annotations

import csv
import io
import os
import random
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from types import MappingProxyType

from lorad.atomic import remove_stale_temps
from lorad.errors import DataError

# Header names accepted for the two columns. `file_name` is what diffusers' ImageFolder uses and
# `text` is its usual caption column, so a diffusers-style metadata.csv works unchanged.
FILE_COLUMNS = ("file", "file_name")
CAPTION_COLUMNS = ("caption", "text")

SEPARATOR = ","


@dataclass(frozen=True)
class CsvCaptions:
    """Captions read from a metadata CSV.

    ``captions`` maps an image path relative to ``train_data_dir`` (posix, normalised: no "./",
    backslashes turned into "/") to its caption; ``lines`` maps the same keys to the CSV line
    they came from, for messages. ``problems`` are rows that were ignored (empty caption,
    duplicate, unusable path), each a sentence naming the CSV file and line.
    """

    source: str
    captions: Mapping[str, str] = field(default_factory=dict)
    lines: Mapping[str, int] = field(default_factory=dict)
    problems: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "captions", MappingProxyType(dict(self.captions)))
        object.__setattr__(self, "lines", MappingProxyType(dict(self.lines)))
        object.__setattr__(self, "problems", tuple(self.problems))


def read_metadata_csv(metadata_path: Path) -> CsvCaptions:
    """Read ``metadata_path``: a CSV whose header names a file column (``file`` or ``file_name``)
    and a caption column (``caption`` or ``text``); other columns are ignored.

    UTF-8 with or without a byte-order mark. Rows that can be skipped without guessing (empty
    caption, duplicate file, absolute or ``..`` path) are reported in ``problems`` and ignored;
    the first row for a file wins. A file that is not valid CSV — not UTF-8, an unclosed quote,
    a row with a different number of fields than the header (usually a caption with commas that
    is not quoted) — raises :class:`DataError` naming the file and line.
    Whether the named files exist is for the caller to check.
    """
    name = metadata_path.name
    try:
        data = metadata_path.read_bytes()
    except OSError as err:
        raise DataError(
            f"`metadata_path`: cannot read {metadata_path}: {err.strerror or err}",
            hint="Check the path and that the file is readable.",
        ) from err
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        line = data[: err.start].count(b"\n") + 1
        raise DataError(
            f"{metadata_path} line {line}: not UTF-8 text (byte 0x{data[err.start]:02x})",
            hint="Save the metadata CSV as UTF-8 (most editors offer it under 'Save as' / encoding).",
        ) from err

    # newline="" keeps quoted newlines inside captions intact, as the csv module requires.
    reader = csv.reader(io.StringIO(text, newline=""), strict=True)
    try:
        header = next(reader, None)
        if header is None:
            raise DataError(
                f"{metadata_path} is empty",
                hint="Add a header line `file,caption` and one row per image, or remove `metadata_path`.",
            )
        file_col, caption_col = _header_columns(header, metadata_path)
        width = len(header)
        captions: dict[str, str] = {}
        lines: dict[str, int] = {}
        problems: list[str] = []
        start = reader.line_num + 1
        for row in reader:
            line = start
            start = reader.line_num + 1
            if not row or all(not cell.strip() for cell in row):
                continue  # blank lines are harmless; spreadsheets like to append them
            if len(row) > width and caption_col == width - 1:
                # `cat.png,a cat, sitting`: people rarely quote captions, and when the caption is
                # the last column the extra commas can only belong to it.
                row = [*row[:caption_col], ",".join(row[caption_col:])]
            if len(row) < width and len(row) <= caption_col:
                # `cat.png` alone (a caption never written): one row to skip, not a broken file.
                what = row[file_col].strip() if len(row) > file_col else ""
                problems.append(
                    f"{name} line {line}: no `{header[caption_col].strip()}` field"
                    + (f" for `{what}`" if what else "")
                    + " (row ignored; write `file,caption` on that line)"
                )
                continue
            if len(row) != width:
                raise DataError(
                    f"{metadata_path} line {line}: {len(row)} field{'s' if len(row) != 1 else ''}, "
                    f"but the header has {width}",
                    hint='Put captions that contain commas in double quotes: cat.png,"a cat, sitting".',
                )
            file_value = row[file_col].strip()
            caption = row[caption_col].strip()
            if not file_value:
                problems.append(f"{name} line {line}: empty `{header[file_col].strip()}` value (row ignored)")
                continue
            rel = normalise_rel_path(file_value)
            if rel is None:
                problems.append(
                    f"{name} line {line}: file `{file_value}` must be a path inside train_data_dir "
                    "(no absolute path, no `..`) (row ignored)"
                )
                continue
            if rel in lines:
                problems.append(f"{name} line {line}: duplicate row for `{rel}` (line {lines[rel]} is used)")
                continue
            if not caption:
                problems.append(f"{name} line {line}: empty caption for `{rel}` (row ignored)")
                continue
            captions[rel] = caption
            lines[rel] = line
    except csv.Error as err:
        raise DataError(
            f"{metadata_path} line {reader.line_num}: malformed CSV: {err}",
            hint="Check the quoting on that line: a caption with commas or quotes goes in double quotes, "
            'with inner quotes doubled ("").',
        ) from err
    return CsvCaptions(source=name, captions=captions, lines=lines, problems=tuple(problems))


def remove_stale_caption_temps(folders: Iterable[Path], caption_extension: str = ".txt") -> list[Path]:
    """Remove temporary files a killed caption writer left in ``folders`` (``.metadata.csv.*.tmp``,
    sidecar and caption-record ones; see :func:`lorad.atomic.remove_stale_temps`: only where the writer
    is gone). Returns what was removed."""
    ext = re.escape(caption_extension if caption_extension.startswith(".") else "." + caption_extension)
    names = rf"[^/]+\.csv|[^/]+{ext}|\.lorad_captions\.json"
    return [removed for folder in dict.fromkeys(folders) for removed in remove_stale_temps(folder, names)]


def _header_columns(header: list[str], metadata_path: Path) -> tuple[int, int]:
    names = [cell.strip().lower() for cell in header]

    def find(candidates: tuple[str, ...]) -> int | None:
        return next((names.index(c) for c in candidates if c in names), None)

    file_col, caption_col = find(FILE_COLUMNS), find(CAPTION_COLUMNS)
    if file_col is None or caption_col is None:
        raise DataError(
            # The header is not shown: metadata_path may name a file that is no CSV at all (errors
            # never echo a file's text).
            f"{metadata_path} line 1: the header lacks a {'file' if file_col is None else 'caption'} column",
            hint="The first line must name the columns, e.g. `file,caption` (`file_name` and `text` are accepted too).",
        )
    return file_col, caption_col


def normalise_rel_path(value: str) -> str | None:
    """``value`` as a posix path relative to ``train_data_dir``, or None if it points outside.

    Backslashes count as separators (CSV files made on Windows) and "./" parts are dropped.
    """
    parts = [p for p in PurePosixPath(value.replace("\\", "/")).parts if p != "."]
    if not parts or parts[0] == "/" or ".." in parts or re.match(r"^[A-Za-z]:$", parts[0]):
        return None
    return "/".join(parts)


class SidecarError(ValueError):
    """A sidecar caption file exists but cannot be used; ``str(err)`` is the reason phrase."""


def sidecar_path(image_path: Path, caption_extension: str = ".txt") -> Path:
    """Where the caption of ``image_path`` lives: ``<stem><caption_extension>`` beside it.

    An extension given without its dot ("txt") gets one.
    """
    if not caption_extension.startswith("."):
        caption_extension = "." + caption_extension
    return image_path.with_name(image_path.stem + caption_extension)


def read_sidecar(image_path: Path, caption_extension: str = ".txt") -> str | None:
    """The caption in the sidecar file of ``image_path``, or None if it has none.

    Like kohya, the caption is the first non-empty line (stripped); UTF-8, BOM tolerated.
    Raises :class:`SidecarError` when the file exists but is empty, not UTF-8, unreadable, or a link
    to a file in another folder (a caption lives beside its image: a link elsewhere could make any
    file the daemon can read come back as a "caption").
    """
    path = sidecar_path(image_path, caption_extension)
    if path.is_symlink() and os.path.dirname(os.path.realpath(path)) != os.path.realpath(image_path.parent):
        raise SidecarError(f"caption file {path.name} is a link to a file outside its folder (not read)")
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return None
    except IsADirectoryError as err:
        raise SidecarError(f"caption file {path.name} is a folder") from err
    except OSError as err:
        raise SidecarError(f"caption file {path.name} cannot be read: {err.strerror or err}") from err
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        raise SidecarError(
            f"caption file {path.name} is not UTF-8 text (byte 0x{data[err.start]:02x} at {err.start})"
        ) from err
    for line in text.splitlines():
        if line.strip():
            return line.strip()
    raise SidecarError(f"caption file {path.name} is empty")


def split_tags(caption: str) -> list[str]:
    """The tags of ``caption``: its comma-separated parts, stripped, empty parts dropped."""
    return [tag.strip() for tag in caption.split(SEPARATOR) if tag.strip()]


def _contains_word(text: str, word: str) -> bool:
    # Whole-word, case-insensitive: "sks" is in "photo of SKS dog" but not in "asks". Lookarounds
    # instead of \b so trigger words made of punctuation ("<ohwx>") match too.
    return re.search(rf"(?<!\w){re.escape(word)}(?!\w)", text, flags=re.IGNORECASE) is not None


def prepare_caption(
    caption: str,
    *,
    rng: random.Random,
    shuffle: bool,
    keep_tokens: int,
    dropout: float,
    trigger_word: str | None,
    tag_dropout: float = 0.0,
    keep_tokens_separator: str = "",
) -> str:
    """The caption one training sample sees, following kohya's semantics.

    - With probability ``dropout`` the result is "" (an unconditional sample; the trigger word
      is dropped too). ``rng`` is consulted for this only when ``dropout > 0``.
    - ``keep_tokens_separator`` (e.g. "|||"): when the caption holds it, the tags before it are the
      kept ones (instead of the first ``keep_tokens``) and the marker is removed; tags after a second
      marker stay last, in place.
    - ``trigger_word``: if no tag contains it as a whole word (case-insensitive), it is put
      first as its own tag. It always counts among the kept tokens: with shuffling, the tag
      that carries it is moved first and stays there, even with ``keep_tokens == 0``, and it
      is one of the ``keep_tokens`` (``keep_tokens=1`` keeps just the trigger).
    - ``tag_dropout``: each tag that is not kept is dropped with this probability.
    - ``shuffle``: the tags after the kept ones are shuffled with ``rng``; the result is re-joined
      with ", ". Without shuffle, tag dropout or a separator the caption's text is left as it is
      (apart from a prepended trigger word), so sentence captions keep their spacing.

    The result depends only on the arguments and ``rng``'s state, which it advances.
    """
    if keep_tokens < 0:
        raise ValueError(f"keep_tokens must be >= 0, got {keep_tokens}")
    if not 0.0 <= dropout <= 1.0:
        raise ValueError(f"dropout must be within [0, 1], got {dropout}")
    if dropout > 0 and rng.random() < dropout:
        return ""

    caption = caption.strip()
    trigger = trigger_word.strip() if trigger_word else ""
    separated = bool(keep_tokens_separator) and keep_tokens_separator in caption
    tail: list[str] = []
    if separated:
        head_text, _, rest = caption.partition(keep_tokens_separator)
        middle_text, _, tail_text = rest.partition(keep_tokens_separator)
        head, tail = split_tags(head_text), split_tags(tail_text)
        tags = head + split_tags(middle_text)
        keep_tokens = len(head)
    else:
        tags = split_tags(caption)
    has_trigger = bool(trigger) and any(_contains_word(tag, trigger) for tag in tags + tail)

    if not (shuffle or tag_dropout or separated):
        if trigger and not has_trigger:
            return f"{trigger}{SEPARATOR} {caption}" if caption else trigger
        return caption

    if trigger:
        if has_trigger and any(_contains_word(tag, trigger) for tag in tags):
            at = next(i for i, tag in enumerate(tags) if _contains_word(tag, trigger))
            tags.insert(0, tags.pop(at))
        elif not has_trigger:
            tags.insert(0, trigger)
            keep_tokens += 1 if separated else 0
        keep_tokens = max(keep_tokens, 1)
    fixed, flexible = tags[:keep_tokens], tags[keep_tokens:]
    if tag_dropout:
        flexible = [tag for tag in flexible if rng.random() >= tag_dropout]
    if shuffle:
        rng.shuffle(flexible)
    return f"{SEPARATOR} ".join(fixed + flexible + tail)
