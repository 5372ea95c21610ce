"""Which captions of a folder lorad generated: ``.lorad_captions.json`` in the image folder.

Later runs read it to tell generated captions from a person's: only a caption whose text is still
exactly what lorad wrote counts as generated, so one a person edited afterwards is theirs and is
never replaced without ``--overwrite``. The file is hidden (leading dot), so scans and most file
browsers skip it, and it travels with the folder.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import MappingProxyType

from lorad.captioning.user_files import write_user_text

log = logging.getLogger(__name__)

RECORD_NAME = ".lorad_captions.json"
FORMAT_VERSION = 1


@dataclass(frozen=True)
class GeneratedCaption:
    """One generated caption: its text as written, the captioner kind and model folder that made it,
    where it was written (``metadata.csv`` or the sidecar's name) and when (unix time)."""

    caption: str
    captioner: str
    model: str
    written_to: str
    generated_at: float


@dataclass(frozen=True)
class CaptionRecord:
    """The generated captions of one folder, keyed by image path relative to it (posix)."""

    path: Path
    entries: Mapping[str, GeneratedCaption] = field(default_factory=dict)

    def __post_init__(self) -> None:
        object.__setattr__(self, "entries", MappingProxyType(dict(self.entries)))

    @classmethod
    def load(cls, folder: Path) -> CaptionRecord:
        """The record of ``folder``; empty when it has none. An unreadable or malformed record is
        logged and treated as empty: every existing caption then counts as a person's, the safe side."""
        path = Path(folder) / RECORD_NAME
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            entries = {str(rel): GeneratedCaption(**entry) for rel, entry in data["captions"].items()}
        except FileNotFoundError:
            return cls(path)
        except (OSError, ValueError, TypeError, KeyError, AttributeError) as err:
            log.warning("%s cannot be read (%s); treating every existing caption as written by a person", path, err)
            return cls(path)
        return cls(path, entries)

    def is_generated(self, rel: str, caption: str) -> bool:
        """Whether ``caption`` (the image's caption now) is one lorad generated and nobody changed."""
        entry = self.entries.get(rel)
        return entry is not None and entry.caption == caption

    def with_entries(self, updates: Mapping[str, GeneratedCaption]) -> CaptionRecord:
        """A copy with ``updates`` added (replacing older entries for the same images)."""
        return CaptionRecord(self.path, {**self.entries, **updates})

    def without(self, rels: Iterable[str]) -> CaptionRecord:
        """A copy that no longer lists ``rels``: their captions count as a person's from now on."""
        drop = set(rels)
        return CaptionRecord(self.path, {rel: entry for rel, entry in self.entries.items() if rel not in drop})

    def save(self) -> None:
        """Write the record atomically (sorted, so it diffs well under version control)."""
        payload = {
            "version": FORMAT_VERSION,
            "about": "Captions lorad generated in this folder; a caption whose text differs from the one "
            "listed here was edited by a person and is kept.",
            "captions": {rel: asdict(entry) for rel, entry in sorted(self.entries.items())},
        }
        write_user_text(self.path, json.dumps(payload, indent=1, ensure_ascii=False) + "\n")
