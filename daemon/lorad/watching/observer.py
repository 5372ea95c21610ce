"""File events of one watched folder, from a watchdog observer; the handler only records them.

Each watch has its own observer (OS events: inotify, FSEvents, ReadDirectoryChangesW; or polling,
for network drives where OS events never arrive), so a folder that vanishes or cannot be watched
stops only its own observer. Recording is all the handler does: the manager's thread interprets
the events, so a slow decision never backs up watchdog's queue.
"""

from __future__ import annotations

import errno
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from watchdog.events import (
    DirCreatedEvent,
    DirDeletedEvent,
    DirMovedEvent,
    FileClosedEvent,
    FileCreatedEvent,
    FileDeletedEvent,
    FileModifiedEvent,
    FileMovedEvent,
    FileSystemEvent,
    FileSystemEventHandler,
)
from watchdog.observers import Observer
from watchdog.observers.api import BaseObserver
from watchdog.observers.polling import PollingObserver

from lorad.errors import LoradError

log = logging.getLogger("lorad.watching")

# How often the polling observer lists the folder. Detection latency on a network drive is this
# plus the quiet period.
POLL_INTERVAL_SECONDS = 1.0

CHANGED, CLOSED, REMOVED, RESCAN, VANISHED = "changed", "closed", "removed", "rescan", "vanished"
# What to do about a watched folder that is gone (the manager retries it every tick).
GONE_HINT = "create the folder again (the watch resumes by itself), or remove the watch with `lorad watch rm`"


@dataclass(frozen=True)
class FileEvent:
    """One recorded event: ``kind`` is CHANGED (``complete`` when renamed into place), CLOSED,
    REMOVED, RESCAN (a folder appeared, moved or went: look at ``path`` again) or VANISHED (the
    watched folder itself went). ``path`` is absolute."""

    kind: str
    path: str
    complete: bool = False


class WatchUnavailable(LoradError):
    """The folder cannot be watched (missing, not a folder, unreadable, or an OS watch limit)."""


class _Recorder(FileSystemEventHandler):
    def __init__(self, root: str, record: Callable[[FileEvent], None]) -> None:
        self._root = root
        self._record = record

    def dispatch(self, event: FileSystemEvent) -> None:
        src = str(event.src_path)
        if isinstance(event, FileMovedEvent):
            self._record(FileEvent(REMOVED, src))
            self._record(FileEvent(CHANGED, str(event.dest_path), complete=True))  # a rename is atomic
        elif isinstance(event, FileClosedEvent):
            self._record(FileEvent(CLOSED, src))
        elif isinstance(event, FileCreatedEvent | FileModifiedEvent):
            self._record(FileEvent(CHANGED, src))
        elif isinstance(event, FileDeletedEvent):
            self._record(FileEvent(REMOVED, src))
        elif isinstance(event, DirDeletedEvent) and src == self._root:
            self._record(FileEvent(VANISHED, src))
        elif isinstance(event, DirMovedEvent):
            self._record(FileEvent(VANISHED if src == self._root else RESCAN, src))
            self._record(FileEvent(RESCAN, str(event.dest_path)))
        elif isinstance(event, DirCreatedEvent | DirDeletedEvent):
            # Files that landed in a new folder before its OS watch existed have no events of their own.
            self._record(FileEvent(RESCAN, src))


class FolderObserver:
    """Watches one folder and its subfolders, calling ``record`` (from watchdog's thread) per event."""

    def __init__(
        self,
        folder: Path,
        record: Callable[[FileEvent], None],
        *,
        polling: bool = False,
        poll_interval: float = POLL_INTERVAL_SECONDS,
    ) -> None:
        self.folder = Path(folder)
        self.polling = polling
        self._record = record
        self._poll_interval = poll_interval
        self._observer: BaseObserver | None = None

    def start(self) -> None:
        """Start watching. Raises WatchUnavailable (with a hint) when the folder cannot be watched."""
        if not self.folder.is_dir():
            what = "is not a folder" if self.folder.exists() else "does not exist"
            raise WatchUnavailable(f"{self.folder} {what}", GONE_HINT)
        observer = PollingObserver(timeout=self._poll_interval) if self.polling else Observer()
        observer.daemon = True
        observer.schedule(_Recorder(str(self.folder), self._record), str(self.folder), recursive=True)
        try:
            observer.start()
        except OSError as err:
            raise WatchUnavailable(
                f"cannot watch {self.folder}: {err.strerror or err}", hint_for_os_error(err)
            ) from err
        self._observer = observer

    @property
    def alive(self) -> bool:
        """True while the observer runs (inotify stops it when the folder itself is deleted)."""
        return self._observer is not None and self._observer.is_alive() and bool(self._observer.emitters)

    def stop(self) -> None:
        """Stop watching (idempotent); waits briefly for watchdog's threads."""
        observer, self._observer = self._observer, None
        if observer is None:
            return
        try:
            observer.stop()
            observer.join(timeout=5)
        except Exception:  # a folder that vanished can make unscheduling fail; the threads end anyway
            log.debug("stopping the observer of %s", self.folder, exc_info=True)


def hint_for_os_error(err: OSError) -> str:
    """What to do when the OS refuses to watch a folder (watch limit, permissions, other)."""
    if err.errno in (errno.ENOSPC, errno.EMFILE):
        return (
            "the OS limit on watched folders is reached: raise it (e.g. `sysctl fs.inotify.max_user_watches="
            "524288`), watch fewer folders, or add the watch with `--polling`"
        )
    if err.errno in (errno.EACCES, errno.EPERM):
        return "make the folder readable by the daemon's user, or add the watch with `--polling`"
    return "check the folder exists and is readable, or add the watch with `--polling` (network drives)"
