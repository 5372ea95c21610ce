"""Atomic file writes: a reader sees the old file or the complete new one, never a partial one.

Each writer writes into a temporary file in the destination's own folder (so the final rename
stays on one filesystem), flushes it to disk, then renames it over the destination.

Temporary names are ``.<dest name>.<writer pid>.<random>.tmp``: a process killed mid-write leaves
one behind, and :func:`remove_stale_temps` recognises it as lorad's own and as stale (its writer
is gone) on the next run.

Permissions: by default a file is private (0600, mkstemp's mode): right for the daemon's own state,
tokens and discovery file. ``user_file=True`` gives what any editor would give a new file (0666, or
0777 for a folder, minus the umask): right for what a run writes for the user (LoRA files,
checkpoints, summaries, a LoRA published into a WebUI), which other users, tools and containers read.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

TEMP_SUFFIX = ".tmp"
# A temporary file of ours whose writer's pid is unknown (named before pids were part of the name)
# or may have been reused is left alone for this long: no real write takes an hour.
STALE_AFTER_SECONDS = 3600.0

_DEFAULT_UMASK = 0o022


def process_umask() -> int:
    """The process umask, read without changing it (os.umask can only be read by setting it, which
    would race with other threads creating files)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    return _DEFAULT_UMASK


def user_file_mode(*, folder: bool = False) -> int:
    """The mode a new file (or folder) of the user's gets: 0666 (0777) minus the umask."""
    return (0o777 if folder else 0o666) & ~process_umask()


def temp_prefix(name: str) -> str:
    """The start of a temporary name for ``name``: ``.<name>.<pid>.`` (see the module docstring)."""
    return f".{name}.{os.getpid()}."


@contextlib.contextmanager
def atomic_path(dest: str | os.PathLike[str], *, user_file: bool = False) -> Iterator[Path]:
    """Yield a temporary path next to ``dest``; on success it is fsynced and renamed to ``dest``.

    If the body raises, the temporary file is removed and ``dest`` is untouched. With ``user_file``
    the file gets a user file's mode (see the module docstring), else it stays private (0600).
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=temp_prefix(dest.name), suffix=TEMP_SUFFIX, dir=dest.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        if user_file:
            os.chmod(tmp, user_file_mode())  # before the rename: the file never appears with other permissions
        os.replace(tmp, dest)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_bytes_atomic(dest: str | os.PathLike[str], data: bytes, *, user_file: bool = False) -> None:
    """Write ``data`` to ``dest`` atomically."""
    with atomic_path(dest, user_file=user_file) as tmp:
        tmp.write_bytes(data)


def write_text_atomic(dest: str | os.PathLike[str], text: str, *, user_file: bool = False) -> None:
    """Write UTF-8 ``text`` to ``dest`` atomically."""
    write_bytes_atomic(dest, text.encode("utf-8"), user_file=user_file)


def write_with_atomic(
    dest: str | os.PathLike[str], writer: Callable[[Path], object], *, user_file: bool = False
) -> None:
    """Call ``writer(tmp_path)`` to produce the file, then move it to ``dest`` atomically.

    For libraries that only write to a path (safetensors, torch.save).
    """
    with atomic_path(dest, user_file=user_file) as tmp:
        writer(tmp)


@contextlib.contextmanager
def atomic_directory(dest: str | os.PathLike[str], *, user_file: bool = False) -> Iterator[Path]:
    """Yield a temporary directory next to ``dest``; on success it replaces ``dest`` whole.

    Used for checkpoints: a checkpoint folder either exists complete or not at all. An existing
    ``dest`` is removed only after the new one is complete. If the body raises, the temporary
    directory and everything in it are removed. With ``user_file`` every file and folder in it gets
    a user file's mode.
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=temp_prefix(dest.name), suffix=TEMP_SUFFIX, dir=dest.parent))
    try:
        if user_file:
            os.chmod(tmp, user_file_mode(folder=True))
        yield tmp
        for item in tmp.rglob("*"):
            if item.is_file():
                with open(item, "rb+") as fh:
                    os.fsync(fh.fileno())
            if user_file and not item.is_symlink():
                # Libraries (safetensors) create their files 0600 whatever the umask.
                os.chmod(item, user_file_mode(folder=item.is_dir()))
        if dest.exists():
            old = dest.with_name(f".{dest.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(dest, old)
            os.replace(tmp, dest)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _temp_name(name_pattern: str) -> re.Pattern[str]:
    # `.NAME.PID.RANDOM.tmp` (mkstemp's random part: letters, digits, `_`), `.NAME.RANDOM.tmp` from
    # before pids were in the name, and `.NAME.old` (atomic_directory's replaced copy).
    return re.compile(rf"^\.(?:{name_pattern})\.(?:(?:(?P<pid>\d+)\.)?[A-Za-z0-9_]+\.tmp|old)$")


def _writer_gone(pid: int) -> bool:
    if pid == os.getpid():
        return False  # one of this process's threads may be writing it right now
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except OSError:  # PermissionError: the pid lives (another user's); anything else: unsure
        return False
    return False


def remove_stale_temps(folder: Path, name_pattern: str, *, owned: bool = False) -> list[Path]:
    """Remove the temporary files and folders this module made in ``folder`` for destinations whose
    name matches the regular expression ``name_pattern``, where no writer can still be using them:
    their writer process is gone, or they are older than :data:`STALE_AFTER_SECONDS`. With ``owned``
    (the caller holds a lock that keeps every other writer out of ``folder``) all of them go.

    Returns what was removed; never raises for a file that cannot be removed (it is left).
    """
    pattern = _temp_name(name_pattern)
    removed: list[Path] = []
    try:
        entries = list(folder.iterdir())
    except OSError:
        return removed
    now = time.time()
    for entry in entries:
        match = pattern.match(entry.name)
        if match is None:
            continue
        try:
            age = now - entry.lstat().st_mtime
        except OSError:
            continue
        pid = match.group("pid")
        if not (owned or (pid is not None and _writer_gone(int(pid))) or age > STALE_AFTER_SECONDS):
            continue
        try:
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry)
            else:
                entry.unlink()
        except OSError:
            continue
        removed.append(entry)
    return removed
