"""Writing files that belong to the user (captions, metadata.csv) atomically, with normal permissions.

``lorad.atomic`` writes through ``mkstemp``, whose files are private (0600): right for lorad's own
state, wrong for captions that other tools, users and sync services read. Here an existing file keeps
its mode, and a new one gets what any editor would give it (0666 minus the umask).
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from lorad.atomic import atomic_path, user_file_mode


def write_user_text(path: Path, text: str) -> None:
    """Write UTF-8 ``text`` to ``path`` atomically (see :func:`lorad.atomic.atomic_path`), with the
    existing file's permissions, or a new file's usual ones."""
    try:
        mode = stat.S_IMODE(path.stat().st_mode)
    except FileNotFoundError:
        mode = user_file_mode()
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
        os.chmod(tmp, mode)  # before the rename: the file never appears with other permissions
