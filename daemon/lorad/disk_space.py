"""Disk space: checking for room before a large write, and turning a full disk into a clear error.

Libraries report a full disk in their own words: Python raises ``OSError(ENOSPC)``, safetensors a
``SafetensorError`` with "No space left on device (os error 28)", torch.save a ``RuntimeError`` from
``inline_container.cc`` that has lost the errno. :func:`is_disk_full` recognises them all, and
:func:`disk_full_error` says which disk is full and how much room the write needed.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

from lorad.errors import DiskFull
from lorad_client.format import format_bytes

_FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})
_FULL_WORDS = (
    "no space left on device",
    "os error 28",
    "storagefull",
    "disk quota exceeded",
    "database or disk is full",
)
# torch.save reports a failed write without its errno; it means a full disk when the disk has no room.
_WRITE_FAILED_WORDS = ("inline_container.cc", "file write failed", "pytorchstreamwriter")
_LOW_SPACE_BYTES = 1 << 20


def existing_ancestor(path: Path) -> Path:
    """``path``, or its nearest ancestor that exists (where a not-yet-created folder would live)."""
    path = Path(os.path.abspath(path))
    while not path.exists() and path.parent != path:
        path = path.parent
    return path


def mount_point(path: Path) -> Path:
    """The mount point of the filesystem holding ``path``: the "disk" a person can free space on."""
    path = existing_ancestor(path)
    while not os.path.ismount(path) and path.parent != path:
        path = path.parent
    return path


def free_bytes(path: Path) -> int:
    """Bytes an unprivileged writer may still use on the disk holding ``path`` (0 if unknown)."""
    try:
        return shutil.disk_usage(existing_ancestor(path)).free
    except OSError:
        return 0


def _chain(err: BaseException) -> Iterator[BaseException]:
    seen: set[int] = set()
    current: BaseException | None = err
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        yield current
        current = current.__cause__ or current.__context__


def is_disk_full(err: BaseException, path: Path | None = None, needed: int = 0) -> bool:
    """True when ``err`` (or an exception it came from) says the disk is full. A write failure that
    lost its reason counts when ``path``'s disk has less room than ``needed`` (or almost none)."""
    for link in _chain(err):
        if isinstance(link, DiskFull):
            return True
        if isinstance(link, OSError) and link.errno in _FULL_ERRNOS:
            return True
        text = str(link).lower()
        if any(word in text for word in _FULL_WORDS):
            return True
        if (
            path is not None
            and any(word in text for word in _WRITE_FAILED_WORDS)
            and free_bytes(path) < max(needed, _LOW_SPACE_BYTES)
        ):
            return True
    return False


def disk_full_error(path: Path, what: str, needed: int = 0, hint: str = "") -> DiskFull:
    """The error for a write of ``what`` into ``path`` that did not fit: it names the disk (its mount
    point), the room the write needed and the room there is."""
    free = free_bytes(path)
    disk = mount_point(path)
    need = f"needs about {format_bytes(needed)}, " if needed else ""
    return DiskFull(
        f"the disk at {disk} is full: writing {what} {need}{format_bytes(free)} free",
        hint
        or (
            f"Free at least {format_bytes(max(needed - free, 0) or _LOW_SPACE_BYTES)} on {disk}, or choose a "
            "folder on another disk, then run again."
        ),
        path=str(path),
        needed=needed,
        free=free,
    )


def ensure_room(path: Path, needed: int, what: str, hint: str = "") -> None:
    """Raise :class:`DiskFull` before writing when the disk holding ``path`` has less than ``needed`` bytes."""
    if needed and free_bytes(path) < needed:
        raise disk_full_error(path, what, needed, hint)


@contextlib.contextmanager
def disk_full_as_error(path: Path, what: str, needed: int = 0, hint: str = "") -> Iterator[None]:
    """Turn a full-disk failure of the body (a write of ``what`` into ``path``) into :class:`DiskFull`;
    other errors pass unchanged. The body must remove its own partial files (the atomic writers do)."""
    try:
        yield
    except DiskFull:
        raise
    except Exception as err:
        if is_disk_full(err, path, needed):
            raise disk_full_error(path, what, needed, hint) from None
        raise
