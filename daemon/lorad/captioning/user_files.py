"""Writing files that belong to the user (captions, metadata.csv) atomically, with normal permissions.

``lorad.atomic`` writes through ``mkstemp``, whose files are private (0600): right for lorad's own
state, wrong for captions that other tools, users and sync services read. Here an existing file keeps
its mode, and a new one gets what any editor would give it (0666 minus the umask).
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from lorad.atomic import atomic_path

_DEFAULT_UMASK = 0o022


def write_user_text(path: Path, text: str) -> None:
    """Write UTF-8 ``text`` to ``path`` atomically (see :func:`lorad.atomic.atomic_path`), with the
    existing file's permissions, or a new file's usual ones."""
    try:
        mode = stat.S_IMODE(path.stat().st_mode)
    except FileNotFoundError:
        mode = 0o666 & ~_umask()
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
        os.chmod(tmp, mode)  # before the rename: the file never appears with other permissions


def _umask() -> int:
    """The process umask, read without changing it (os.umask can only be read by setting it, which
    would race with other threads creating files)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    return _DEFAULT_UMASK
