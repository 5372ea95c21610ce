"""A running job's events, published from a side thread so the training thread never waits for them.

Publishing an event appends it to SQLite (a commit) and wakes the job's watchers under the hub's
lock. On the training thread that is time the device may sit idle (every step emits one); here the
training thread only queues the event, and one thread per job publishes the queue in order.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from typing import Any


class EventPump:
    """Publishes ``(kind, payload)`` pairs of job ``job_id`` with ``publish``, in the order given.

    :meth:`close` waits until everything queued is published (the worker closes the pump before it
    stores the job's final state), and returns the first error ``publish`` raised, if any (events
    after a failed one are dropped: the job's history must not have a hole in the middle).
    """

    def __init__(self, job_id: str, publish: Callable[[str, str, dict[str, Any]], object]) -> None:
        self.job_id = job_id
        self._publish = publish
        self._queue: queue.SimpleQueue[tuple[str, dict[str, Any]] | None] = queue.SimpleQueue()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name=f"lorad-events-{job_id}", daemon=True)
        self._thread.start()

    def put(self, kind: str, payload: dict[str, Any]) -> None:
        """Queue one event (returns at once)."""
        self._queue.put((kind, payload))

    def close(self) -> BaseException | None:
        """Publish what is queued, stop the thread; the first publishing error, or None."""
        self._queue.put(None)
        self._thread.join()
        return self._error

    def _run(self) -> None:
        while (item := self._queue.get()) is not None:
            if self._error is None:
                try:
                    self._publish(self.job_id, *item)
                except Exception as err:  # reported by close(), on the worker's thread
                    self._error = err
