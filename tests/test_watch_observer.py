"""The watchdog observer on a real temporary folder: what it records, and folders it cannot watch."""

from __future__ import annotations

import errno
import os
import queue
import time
from pathlib import Path

import pytest

from lorad.watching.observer import (
    CHANGED,
    CLOSED,
    REMOVED,
    VANISHED,
    FileEvent,
    FolderObserver,
    WatchUnavailable,
    hint_for_os_error,
)


def collect(events: queue.Queue[FileEvent], until: FileEvent, timeout: float = 10.0) -> list[FileEvent]:
    """Events recorded until ``until`` arrives (fails after ``timeout``)."""
    seen: list[FileEvent] = []
    end = time.monotonic() + timeout
    while until not in seen:
        seen.append(events.get(timeout=max(0.01, end - time.monotonic())))
    return seen


@pytest.mark.skipif(os.uname().sysname != "Linux", reason="close-after-write events are inotify's")
def test_records_writes_closes_renames_deletes_and_the_folder_vanishing(tmp_path: Path) -> None:
    root = tmp_path / "watched"
    (root / "sub").mkdir(parents=True)
    events: queue.Queue[FileEvent] = queue.Queue()
    observer = FolderObserver(root, events.put)
    observer.start()
    try:
        assert observer.alive
        (root / "sub" / "a.png").write_bytes(b"png")
        seen = collect(events, FileEvent(CLOSED, str(root / "sub" / "a.png")))
        assert FileEvent(CHANGED, str(root / "sub" / "a.png")) in seen  # subfolders are watched
        (root / "x.part").write_bytes(b"png")
        os.rename(root / "x.part", root / "x.png")
        seen = collect(events, FileEvent(CHANGED, str(root / "x.png"), complete=True))
        assert FileEvent(REMOVED, str(root / "x.part")) in seen
        (root / "x.png").unlink()
        collect(events, FileEvent(REMOVED, str(root / "x.png")))
        for path in sorted(root.rglob("*"), reverse=True):
            path.unlink() if path.is_file() else path.rmdir()
        root.rmdir()
        collect(events, FileEvent(VANISHED, str(root)))
    finally:
        observer.stop()
    assert not observer.alive


def test_a_missing_folder_or_a_file_cannot_be_watched(tmp_path: Path) -> None:
    with pytest.raises(WatchUnavailable, match="does not exist") as missing:
        FolderObserver(tmp_path / "nope", print).start()
    assert "lorad watch rm" in missing.value.hint
    (tmp_path / "file.png").write_bytes(b"")
    with pytest.raises(WatchUnavailable, match="is not a folder"):
        FolderObserver(tmp_path / "file.png", print, polling=True).start()


def test_the_watch_limit_hint_says_how_to_raise_it() -> None:
    assert "max_user_watches" in hint_for_os_error(OSError(errno.ENOSPC, "inotify watch limit reached"))
    assert "--polling" in hint_for_os_error(OSError(errno.EACCES, "denied"))
