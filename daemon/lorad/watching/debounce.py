"""When has a watched folder settled? Pure logic: no threads, no sleeps, the clock and ``stat`` injected.

The rules, for one folder:

- Every file event (created, modified, moved in, closed, deleted) restarts the quiet period.
- The folder has settled once no event came for ``quiet_seconds`` *and* every new file is complete.
- A file is complete when its (size, mtime) is the same as when it was last seen and either it was
  closed after writing since its last change (inotify's close-after-write) or renamed into place,
  or that last look is at least ``quiet_seconds`` old (size and mtime stable over a quiet period,
  for observers without close events: polling, macOS, Windows).
- A file that vanished before settling is dropped; deletions are reported so counts stay right.
- An incomplete file is looked at again ``quiet_seconds`` after its new sample.

The owner calls :meth:`Debouncer.poll` whenever it likes (at :meth:`Debouncer.deadline` at the
latest); ``poll`` returns the batch once, then the debouncer starts over.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

from lorad.watching.file_rules import FileStat, stat_file

DEFAULT_QUIET_SECONDS = 10.0


@dataclass(frozen=True)
class Settled:
    """A settled batch: complete new or changed files and deleted files (paths as recorded), sorted."""

    changed: tuple[str, ...]
    removed: tuple[str, ...]


@dataclass
class _Pending:
    sample: FileStat | None  # (size, mtime) when last looked at
    sample_time: float
    complete_hint: bool  # closed after writing / renamed into place, since the last change


class Debouncer:
    """Collects one folder's file events and says when they form a settled batch.

    ``clock`` gives monotonic seconds; ``stat(path)`` gives (size, mtime) or None if the file is
    gone. Not thread-safe: one owner feeds it events and polls it.
    """

    def __init__(
        self,
        quiet_seconds: float = DEFAULT_QUIET_SECONDS,
        *,
        clock: Callable[[], float] = time.monotonic,
        stat: Callable[[str], FileStat | None] = stat_file,
    ) -> None:
        if quiet_seconds < 0:
            raise ValueError(f"quiet_seconds must be >= 0, not {quiet_seconds}")
        self.quiet_seconds = quiet_seconds
        self._clock = clock
        self._stat = stat
        self._pending: dict[str, _Pending] = {}
        self._removed: set[str] = set()
        self._last_event: float | None = None

    # --- events --------------------------------------------------------------------------------
    def changed(self, path: str, *, complete: bool = False) -> None:
        """A file was created or written (``complete``: it was renamed into place, whole)."""
        now = self._clock()
        self._last_event = now
        self._removed.discard(path)
        self._pending[path] = _Pending(sample=self._stat(path), sample_time=now, complete_hint=complete)

    def closed(self, path: str) -> None:
        """A file opened for writing was closed (Linux inotify IN_CLOSE_WRITE)."""
        self.changed(path, complete=True)

    def removed(self, path: str) -> None:
        """A file was deleted or moved away."""
        self._last_event = self._clock()
        self._pending.pop(path, None)
        self._removed.add(path)

    # --- decisions -----------------------------------------------------------------------------
    @property
    def busy(self) -> bool:
        """True while events wait to settle."""
        return bool(self._pending or self._removed)

    @property
    def pending(self) -> int:
        """Files waiting to be complete."""
        return len(self._pending)

    def deadline(self) -> float | None:
        """The clock time at which :meth:`poll` may next return a batch, None when idle."""
        if not self.busy or self._last_event is None:
            return None
        times = [self._last_event + self.quiet_seconds]
        times += [p.sample_time + self.quiet_seconds for p in self._pending.values() if not p.complete_hint]
        return max(times)

    def poll(self) -> Settled | None:
        """The settled batch if the folder is quiet and every new file complete (then start over), else None."""
        if not self.busy or self._last_event is None:
            return None
        now = self._clock()
        if now - self._last_event < self.quiet_seconds:
            return None
        ready = True
        for path, pending in list(self._pending.items()):
            current = self._stat(path)
            if current is None:  # gone before it settled: nothing to train on
                del self._pending[path]
                continue
            stable = current == pending.sample
            if stable and (pending.complete_hint or now - pending.sample_time >= self.quiet_seconds):
                continue
            # Changed without an event (network drive) or not yet stable long enough: look again later.
            if not stable:
                self._pending[path] = _Pending(sample=current, sample_time=now, complete_hint=False)
            ready = False
        if not ready:
            return None
        batch = Settled(changed=tuple(sorted(self._pending)), removed=tuple(sorted(self._removed)))
        self._pending.clear()
        self._removed.clear()
        self._last_event = None
        return batch
