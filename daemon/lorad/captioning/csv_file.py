"""Updating a metadata CSV in place: change or add caption rows, keep everything else.

The file is first read with :func:`lorad.data.captions.read_metadata_csv`, so a file training would
refuse (not UTF-8, bad quoting) is refused here too instead of being rewritten. Other columns,
other rows and row order are kept; the whole file is rewritten atomically on :meth:`CaptionCsv.save`.
"""

from __future__ import annotations

import csv
import io
from pathlib import Path

from lorad.captioning.user_files import write_user_text
from lorad.data.captions import CAPTION_COLUMNS, FILE_COLUMNS, normalise_rel_path, read_metadata_csv


class CaptionCsv:
    """A metadata CSV held in memory while captions are set; mutable, owned by one writer."""

    def __init__(self, path: Path, header: list[str], rows: list[list[str]]) -> None:
        self.path = path
        self.header = header
        self.rows = rows
        self._file_col, self._caption_col = _columns(header)
        self._row_of: dict[str, int] = {}
        for index, row in enumerate(rows):
            rel = normalise_rel_path(row[self._file_col].strip()) if len(row) > self._file_col else None
            if rel is not None:
                self._row_of.setdefault(rel, index)  # the first row for a file is the one training reads

    @classmethod
    def open(cls, path: Path) -> CaptionCsv:
        """The CSV at ``path``, or a new empty ``file,caption`` one if it does not exist yet.

        Raises :class:`~lorad.errors.DataError` (naming the file and line) for a file that training
        could not read either.
        """
        if not path.exists():
            return cls(path, ["file", "caption"], [])
        read_metadata_csv(path)  # validation only: raises for what training would refuse
        text = path.read_bytes().decode("utf-8-sig")
        rows = [row for row in csv.reader(io.StringIO(text, newline=""), strict=True)]
        header, width = rows[0], len(rows[0])
        _, caption_col = _columns(header)
        kept = []
        for row in rows[1:]:
            if not any(cell.strip() for cell in row):
                continue  # blank lines carry nothing; the rewrite drops them
            if len(row) > width and caption_col == width - 1:
                # The reader's leniency: unquoted commas belong to a last caption column.
                row = [*row[: width - 1], ",".join(row[width - 1 :])]
            kept.append(row)
        return cls(path, header, kept)

    def caption_of(self, rel: str) -> str | None:
        """The (stripped, non-empty) caption of image ``rel``, or None."""
        index = self._row_of.get(rel)
        if index is None:
            return None
        row = self.rows[index]
        caption = row[self._caption_col].strip() if len(row) > self._caption_col else ""
        return caption or None

    def set(self, rel: str, caption: str) -> None:
        """Give image ``rel`` this caption: its first row is updated, or a row is appended."""
        index = self._row_of.get(rel)
        if index is None:
            row = [""] * len(self.header)
            row[self._file_col] = rel
            self._row_of[rel] = len(self.rows)
            self.rows.append(row)
        else:
            row = self.rows[index]
            row.extend([""] * (len(self.header) - len(row)))
        row[self._caption_col] = caption

    def save(self) -> None:
        """Write the whole file atomically; fields are quoted where the CSV format needs it."""
        out = io.StringIO()
        writer = csv.writer(out, lineterminator="\n")
        writer.writerow(self.header)
        writer.writerows(self.rows)
        write_user_text(self.path, out.getvalue())


def _columns(header: list[str]) -> tuple[int, int]:
    """(file column, caption column) of a header that read_metadata_csv accepted."""
    names = [cell.strip().lower() for cell in header]
    return (
        next(names.index(c) for c in FILE_COLUMNS if c in names),
        next(names.index(c) for c in CAPTION_COLUMNS if c in names),
    )
