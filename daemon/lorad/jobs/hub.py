"""Job events: persisted in order, then fanned out to every live watcher.

Publishing writes the event to the store (so history survives a crash) and appends it to an
in-memory tail that watchers read without touching SQLite; a watcher that starts late reads the
history from the store first and then follows the tail, so it sees every event exactly once.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator, Mapping
from typing import Any

from lorad.jobs.records import EventRecord
from lorad.jobs.store import JobStore

# Kinds after which a job emits nothing more (until a restart re-queues an interrupted job).
FINAL_KINDS = frozenset({"finished", "failed", "cancelled"})


class EventHub:
    """Publish job events and follow them; thread-safe."""

    def __init__(self, store: JobStore) -> None:
        self._store = store
        self._cond = threading.Condition()
        self._tails: dict[str, list[EventRecord]] = {}  # job_id -> events published by this process

    def publish(self, job_id: str, kind: str, payload: Mapping[str, Any]) -> EventRecord:
        """Persist one event and wake the job's watchers; returns it with its seq."""
        with self._cond:  # one lock orders the store's seq and the tail identically
            record = self._store.append_event(job_id, kind, payload)
            self._tails.setdefault(job_id, []).append(record)
            self._cond.notify_all()
        return record

    def wake(self) -> None:
        """Wake all watchers (e.g. one whose client went away, so it can notice and stop)."""
        with self._cond:
            self._cond.notify_all()

    def forget(self, job_id: str) -> None:
        """Drop a finished job's in-memory tail; late watchers read its history from the store."""
        with self._cond:
            self._tails.pop(job_id, None)

    def _newer(self, job_id: str, seen: int) -> list[EventRecord] | None:
        """Tail events after ``seen``, or None when the tail cannot cover the gap (read the store)."""
        tail = self._tails.get(job_id)
        if not tail or tail[-1].seq <= seen:
            return []
        if tail[0].seq > seen + 1:
            return None
        return tail[seen + 1 - tail[0].seq :]

    def follow(
        self,
        job_id: str,
        *,
        after_seq: int = 0,
        active: Callable[[], bool] = lambda: True,
        poll_seconds: float = 1.0,
        history_only: bool = False,
    ) -> Iterator[EventRecord]:
        """Yield the job's events after ``after_seq`` in order — history, then live — until a final
        event has been yielded or ``active()`` turns False (checked at least every poll_seconds).
        With ``history_only`` it stops after the events that exist when it is called."""
        if history_only:
            yield from self._store.events(job_id, after_seq=after_seq)
            return
        seen = after_seq
        while active():
            with self._cond:
                batch = self._newer(job_id, seen)
                if batch == []:
                    self._cond.wait(timeout=poll_seconds)
                    batch = self._newer(job_id, seen)
            if batch is None or (batch == [] and job_id not in self._tails):
                # Not (fully) in memory: a job from before this process, or one just forgotten.
                batch = self._store.events(job_id, after_seq=seen)
            for record in batch:
                yield record
                seen = record.seq
                if record.kind in FINAL_KINDS:
                    return
