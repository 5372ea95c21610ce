"""Writing generated captions where the folder keeps them, and recording them as generated."""

from __future__ import annotations

import os
import re
import time
from collections.abc import Iterable, Mapping
from pathlib import Path

from lorad.captioning.csv_file import CaptionCsv
from lorad.captioning.record import CaptionRecord, GeneratedCaption
from lorad.captioning.user_files import write_user_text
from lorad.data.captions import sidecar_path
from lorad.errors import DataError


def lands_inside(real_root: str, target: Path) -> bool:
    """True when writing ``target`` (which may not exist yet) puts a file inside ``real_root`` (a
    realpath): its folder resolves, links followed, to ``real_root`` or below, and it is no link."""
    parent = os.path.realpath(target.parent)
    inside = parent == real_root or parent.startswith(real_root.rstrip(os.sep) + os.sep)
    return inside and not target.is_symlink()


def with_trigger(caption: str, trigger_word: str) -> str:
    """``caption`` with ``trigger_word`` put first as its own tag, unless it already holds it as a
    whole word (any case): "ohwx, a red car"."""
    trigger = trigger_word.strip()
    # Lookarounds instead of \b so trigger words made of punctuation ("<ohwx>") match too.
    if not trigger or re.search(rf"(?<!\w){re.escape(trigger)}(?!\w)", caption, flags=re.IGNORECASE):
        return caption
    return f"{trigger}, {caption}" if caption else trigger


class CaptionWriter:
    """Writes captions of images under ``root`` and records them in the folder's caption record.

    ``format`` "csv": rows of ``csv_path`` (default ``root/metadata.csv``; its ``file`` column is
    relative to ``root``) are updated or appended, other rows and columns kept. "txt": each image
    gets ``<stem><caption_extension>`` beside it. ``trigger_word`` is put first in each caption
    that lacks it. Opening a malformed CSV raises :class:`~lorad.errors.DataError` at construction,
    before any captioning work.

    Each :meth:`write` saves the captions first and the record second, both atomically: a crash in
    between leaves captions that count as a person's (kept), never a record of captions that are not
    there. Not thread-safe: one writer per folder at a time.

    Nothing is written outside ``root``: the CSV and every sidecar must resolve (links followed) to a
    place inside it, and an existing sidecar that is a link is never replaced. A CSV outside ``root``
    raises DataError at construction; :meth:`writable` says which images can get a sidecar, and
    :meth:`write` raises DataError (writing nothing) for any that cannot.
    """

    def __init__(
        self,
        root: Path,
        *,
        format: str,
        captioner: str,
        model: str,
        csv_path: Path | None = None,
        caption_extension: str = ".txt",
        trigger_word: str = "",
    ) -> None:
        if format not in ("csv", "txt"):
            raise ValueError(f"format must be csv or txt, not {format!r}")
        self.root = root
        self.format = format
        self.csv_path = csv_path or root / "metadata.csv"
        self.caption_extension = caption_extension
        self.trigger_word = trigger_word
        self.captioner = captioner
        self.model = model
        self._real_root = os.path.realpath(root)
        if format == "csv" and not self._inside(self.csv_path):
            raise DataError(
                f"`metadata_path`: {self.csv_path} is outside {root}: lorad writes captions only inside the "
                "folder it captions",
                "put the captions file in the image folder (e.g. <folder>/metadata.csv), or caption into sidecars",
            )
        self._csv = CaptionCsv.open(self.csv_path) if format == "csv" else None
        self._record = CaptionRecord.load(root)

    @property
    def target(self) -> str:
        """Where captions go, for messages: the CSV's path, or the sidecar naming pattern."""
        if self.format == "csv":
            return str(self.csv_path)
        return f"<image name>{self.caption_extension} files beside the images"

    def _inside(self, target: Path) -> bool:
        return lands_inside(self._real_root, target)

    def writable(self, image: Path) -> bool:
        """Whether the caption of ``image`` can be written: always for the CSV (inside the root),
        for a sidecar only when it lands inside the root and is not a link."""
        return self._csv is not None or self._inside(sidecar_path(image, self.caption_extension))

    def _check_writable(self, images: Iterable[Path]) -> None:
        outside = [image for image in images if not self.writable(image)]
        if outside:
            raise DataError(
                f"the caption of {outside[0]} would be written outside {self.root} (a linked folder or a linked "
                "caption file): not written",
                "caption images inside the folder itself; lorad never writes through links that leave it",
            )

    @property
    def record_path(self) -> Path:
        """The caption record file of ``root``."""
        return self._record.path

    def write(self, captions: Mapping[Path, str]) -> dict[Path, str]:
        """Write ``captions`` (absolute image path under ``root`` → caption); returns the texts as
        written (with the trigger word)."""
        if not captions:
            return {}
        self._check_writable(captions)
        now = time.time()
        written: dict[Path, str] = {}
        entries: dict[str, GeneratedCaption] = {}
        for path, caption in captions.items():
            text = with_trigger(caption, self.trigger_word)
            rel = path.relative_to(self.root).as_posix()
            if self._csv is not None:
                self._csv.set(rel, text)
                where = self.csv_path.name
            else:
                sidecar = sidecar_path(path, self.caption_extension)
                write_user_text(sidecar, text + "\n")
                where = sidecar.relative_to(self.root).as_posix()
            written[path] = text
            entries[rel] = GeneratedCaption(
                caption=text, captioner=self.captioner, model=self.model, written_to=where, generated_at=now
            )
        if self._csv is not None:
            self._csv.save()
        self._record = self._record.with_entries(entries)
        self._record.save()
        return written

    def write_edited(self, captions: Mapping[Path, str]) -> None:
        """Write captions a person edited (absolute image path under ``root`` → caption), as they are
        (no trigger word added), and drop those images from the caption record: an edited caption is
        the person's, so ``regenerate`` never replaces it, even when its text equals what lorad wrote."""
        if not captions:
            return
        self._check_writable(captions)
        for path, caption in captions.items():
            if self._csv is not None:
                self._csv.set(path.relative_to(self.root).as_posix(), caption)
            else:
                write_user_text(sidecar_path(path, self.caption_extension), caption + "\n")
        if self._csv is not None:
            self._csv.save()
        rels = [path.relative_to(self.root).as_posix() for path in captions]
        if any(rel in self._record.entries for rel in rels):
            self._record = self._record.without(rels)
            self._record.save()
