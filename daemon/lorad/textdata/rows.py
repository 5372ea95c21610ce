"""Reading text-data files into rows that remember where they came from (file and line).

JSONL, JSON (an array of objects, or one object holding such an array), CSV, and Parquet when
pyarrow is installed. Every row carries its file and 1-based line number (Parquet: row number) so a
bad row can be reported where the user can find it; unreadable rows become :class:`BadRow` s, never
exceptions.
"""

from __future__ import annotations

import csv
import importlib.util
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

SUFFIXES = (".jsonl", ".json", ".csv", ".parquet")


@dataclass(frozen=True)
class Row:
    """One record as read: ``fields`` is the raw mapping; ``where`` is "file:line"."""

    file: str
    line: int
    fields: dict[str, Any]

    @property
    def where(self) -> str:
        return f"{self.file}:{self.line}"


@dataclass(frozen=True)
class BadRow:
    """A record that will not be trained on, and why (a phrase the user can act on)."""

    file: str
    line: int
    reason: str

    def render(self) -> str:
        return f"{self.file}:{self.line}: {self.reason}"


def data_files(path: Path) -> list[Path]:
    """``path`` itself, or every supported file under a folder (sorted, recursive)."""
    if path.is_dir():
        return sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in SUFFIXES)
    return [path]


def read_rows(path: Path) -> Iterator[Row | BadRow]:
    """The records of one file in order; a record that is not an object becomes a BadRow.

    Raises OSError when the file cannot be read, ValueError for an unsupported suffix or a file
    that is not valid JSON as a whole (a ``.json`` file cannot be read row by row).
    """
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        yield from _jsonl_rows(path)
    elif suffix == ".json":
        yield from _json_rows(path)
    elif suffix == ".csv":
        yield from _csv_rows(path)
    elif suffix == ".parquet":
        yield from _parquet_rows(path)
    else:
        raise ValueError(f"{path.name}: unsupported file type {suffix!r}; use one of " + ", ".join(SUFFIXES))


def _as_row(file: str, line: int, value: Any) -> Row | BadRow:
    if not isinstance(value, dict):
        return BadRow(file, line, f"expected a JSON object, got {type(value).__name__}")
    return Row(file, line, value)


def _jsonl_rows(path: Path) -> Iterator[Row | BadRow]:
    with path.open(encoding="utf-8", errors="replace") as handle:
        for number, text in enumerate(handle, start=1):
            if not text.strip():
                continue
            try:
                yield _as_row(path.name, number, json.loads(text))
            except json.JSONDecodeError as err:
                yield BadRow(path.name, number, f"invalid JSON ({err.msg} at column {err.colno})")


def _json_rows(path: Path) -> Iterator[Row | BadRow]:
    """Walk the top-level array element by element so each row knows its starting line."""
    text = path.read_text(encoding="utf-8", errors="replace")
    decoder = json.JSONDecoder()
    start = _skip_space(text, 0)
    if start < len(text) and text[start] == "{":
        # {"data": [...]} (the layout some exporters write): read the first array inside.
        whole = json.loads(text)
        arrays = [v for v in whole.values() if isinstance(v, list)] if isinstance(whole, dict) else []
        if not arrays:
            yield _as_row(path.name, 1, whole)
            return
        for index, item in enumerate(arrays[0], start=1):
            yield _as_row(path.name, index, item)  # no positions in a nested array: number the items
        return
    if start >= len(text) or text[start] != "[":
        raise ValueError(f"{path.name}: a .json data file must hold an array of objects")
    pos = _skip_space(text, start + 1)
    if pos < len(text) and text[pos] == "]":
        return
    while pos < len(text):
        line = text.count("\n", 0, pos) + 1
        try:
            value, pos = decoder.raw_decode(text, pos)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path.name}:{err.lineno}: invalid JSON ({err.msg})") from None
        yield _as_row(path.name, line, value)
        pos = _skip_space(text, pos)
        if pos < len(text) and text[pos] == ",":
            pos = _skip_space(text, pos + 1)
        elif pos < len(text) and text[pos] == "]":
            return
        else:
            raise ValueError(f"{path.name}:{text.count(chr(10), 0, pos) + 1}: expected `,` or `]` in the array")


def _skip_space(text: str, pos: int) -> int:
    while pos < len(text) and text[pos] in " \t\r\n":
        pos += 1
    return pos


def _csv_rows(path: Path) -> Iterator[Row | BadRow]:
    with path.open(encoding="utf-8", errors="replace", newline="") as handle:
        reader = csv.DictReader(handle)
        previous_end = 1  # the header's line
        for record in reader:
            line = previous_end + 1  # a quoted field can span lines: the row starts after the last one
            previous_end = reader.line_num
            if None in record:
                yield BadRow(path.name, line, "more values than header columns")
                continue
            yield Row(path.name, line, {k: v for k, v in record.items() if v is not None})


def _parquet_rows(path: Path) -> Iterator[Row | BadRow]:
    if importlib.util.find_spec("pyarrow") is None:
        raise ValueError(f"{path.name}: reading Parquet needs the pyarrow package (`pip install pyarrow`)")
    import pyarrow.parquet as pq

    for index, record in enumerate(pq.read_table(path).to_pylist(), start=1):
        yield _as_row(path.name, index, record)
