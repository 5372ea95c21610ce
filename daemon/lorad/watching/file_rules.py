"""Which files of a watched folder count as training images.

Exactly the images training reads (the same walk, the same extensions), minus what is never a
finished image: hidden files and folders, and temporary or partial downloads.
"""

from __future__ import annotations

import os
from pathlib import Path, PurePath

from lorad.data.dataset import CACHE_DIR_NAME, IMAGE_EXTENSIONS, find_image_files

# Suffixes browsers, download tools and editors give files that are still being written.
PARTIAL_SUFFIXES = (".part", ".crdownload", ".tmp", ".download", ".partial", "~")

FileStat = tuple[int, int]  # (size in bytes, mtime in ns): a file is complete once this stops changing


def is_image_path(path: str | os.PathLike[str], root: str | os.PathLike[str]) -> bool:
    """True when ``path`` (under ``root``) names a training image: a trainable image extension, no
    hidden part (file or folder below ``root``), not a partial download, not in a cache folder.
    Looks only at the name, so it also answers for files that no longer exist."""
    try:
        parts = PurePath(path).relative_to(root).parts
    except ValueError:
        return False
    if not parts or any(part.startswith(".") or part == CACHE_DIR_NAME for part in parts):
        return False
    name = parts[-1]
    if name.lower().endswith(PARTIAL_SUFFIXES):
        return False
    return os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS


def stat_file(path: str | os.PathLike[str]) -> FileStat | None:
    """The file's (size, mtime_ns), or None when it is gone or not a regular file."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    if not os.path.isfile(path):
        return None
    return st.st_size, st.st_mtime_ns


def list_images(root: Path) -> dict[str, FileStat]:
    """Every training image under ``root`` now: relative posix path -> (size, mtime_ns)."""
    found: dict[str, FileStat] = {}
    for path in find_image_files(root):
        if is_image_path(path, root):
            stat = stat_file(path)
            if stat is not None:
                found[path.relative_to(root).as_posix()] = stat
    return found
