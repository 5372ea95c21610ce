"""Reading and editing the captions of an image folder, where the folder keeps them.

The rules are lorad's (``daemon/lorad/captioning/writer.py``, not imported: the WebUI has no torch):
a folder with ``metadata.csv`` keeps captions there (a ``file``/``file_name`` column and a
``caption``/``text`` column; other columns and rows are kept, rows updated in place or appended);
otherwise each image has ``<stem>.txt`` beside it. Paths are posix, relative to the folder; images
are found in subfolders too. Every file is replaced atomically and keeps its permissions.
"""

from __future__ import annotations

import csv
import io
import os
import stat
import tempfile
from collections.abc import Mapping
from pathlib import Path

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp"})
METADATA_CSV = "metadata.csv"
_FILE_COLUMNS = ("file", "file_name")
_CAPTION_COLUMNS = ("caption", "text")


class CaptionFileError(ValueError):
    """The folder's metadata.csv cannot be read or updated; ``str(err)`` says which line and why."""


def list_images(folder: Path) -> list[str]:
    """Images under ``folder`` (relative posix paths, sorted); hidden files and folders are skipped."""
    found = []
    for path in folder.rglob("*"):
        rel = path.relative_to(folder)
        if path.suffix.lower() in IMAGE_EXTENSIONS and path.is_file() and not any(p.startswith(".") for p in rel.parts):
            found.append(rel.as_posix())
    return sorted(found)


def uses_csv(folder: Path) -> bool:
    """True when the folder keeps its captions in metadata.csv."""
    return (folder / METADATA_CSV).is_file()


def read_captions(folder: Path) -> dict[str, str]:
    """Caption of every image in ``folder`` ("" when it has none), in list_images order."""
    images = list_images(folder)
    if uses_csv(folder):
        header, rows = _read_csv(folder / METADATA_CSV)
        file_col, caption_col = _columns(header, folder / METADATA_CSV)
        by_file: dict[str, str] = {}
        for row in rows:
            if len(row) > max(file_col, caption_col):
                by_file.setdefault(_normalise(row[file_col]), row[caption_col].strip())
        return {rel: by_file.get(rel, "") for rel in images}
    return {rel: _read_sidecar(folder / rel) for rel in images}


def write_captions(folder: Path, captions: Mapping[str, str]) -> int:
    """Save ``captions`` (relative image path → text) where the folder keeps them; returns how many
    changed. Unchanged captions are not rewritten; empty ones are skipped (they would not train)."""
    current = read_captions(folder)
    changed = {
        rel: text.strip()
        for rel, text in captions.items()
        if rel in current and text.strip() and text.strip() != current[rel]
    }
    if not changed:
        return 0
    if uses_csv(folder):
        path = folder / METADATA_CSV
        header, rows = _read_csv(path)
        file_col, caption_col = _columns(header, path)
        index = {_normalise(row[file_col]): i for i, row in reversed(list(enumerate(rows))) if len(row) > file_col}
        for rel, text in changed.items():
            if rel in index:
                row = rows[index[rel]]
                row.extend([""] * (len(header) - len(row)))
            else:
                row = [""] * len(header)
                row[file_col] = rel
                rows.append(row)
            row[caption_col] = text
        out = io.StringIO()
        writer = csv.writer(out, lineterminator="\n")
        writer.writerows([header, *rows])
        write_text_atomically(path, out.getvalue())
    else:
        for rel, text in changed.items():
            image = folder / rel
            write_text_atomically(image.with_name(image.stem + ".txt"), text + "\n")
    return len(changed)


def write_text_atomically(path: Path, text: str) -> None:
    """Replace ``path`` with UTF-8 ``text`` via a temp file in the same folder and a rename; an existing
    file keeps its mode, a new one gets 0666 minus the umask (what an editor would give it)."""
    try:
        mode = stat.S_IMODE(path.stat().st_mode)
    except FileNotFoundError:
        umask = os.umask(0)
        os.umask(umask)
        mode = 0o666 & ~umask
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _normalise(cell: str) -> str:
    """A CSV file cell as the relative posix path list_images gives (Windows separators, "./" dropped)."""
    return cell.strip().replace("\\", "/").removeprefix("./")


def _read_sidecar(image: Path) -> str:
    try:
        text = image.with_name(image.stem + ".txt").read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError):
        return ""
    return next((line.strip() for line in text.splitlines() if line.strip()), "")


def _read_csv(path: Path) -> tuple[list[str], list[list[str]]]:
    try:
        text = path.read_bytes().decode("utf-8-sig")
        rows = [row for row in csv.reader(io.StringIO(text, newline=""), strict=True) if any(c.strip() for c in row)]
    except (UnicodeDecodeError, csv.Error) as err:
        raise CaptionFileError(f"{path}: cannot be read as a UTF-8 CSV ({err}); fix it or remove it") from err
    if not rows:
        return ["file", "caption"], []
    header = rows[0]
    width = len(header)
    _, caption_col = _columns(header, path)
    # Like lorad's reader: unquoted commas in a last caption column belong to the caption.
    body = [
        [*r[: width - 1], ",".join(r[width - 1 :])] if len(r) > width and caption_col == width - 1 else r
        for r in rows[1:]
    ]
    return header, body


def _columns(header: list[str], path: Path) -> tuple[int, int]:
    names = [cell.strip().lower() for cell in header]
    file_col = next((names.index(c) for c in _FILE_COLUMNS if c in names), None)
    caption_col = next((names.index(c) for c in _CAPTION_COLUMNS if c in names), None)
    if file_col is None or caption_col is None:
        raise CaptionFileError(
            f"{path} line 1: the header {','.join(header)!r} needs a file and a caption column (e.g. `file,caption`)"
        )
    return file_col, caption_col
