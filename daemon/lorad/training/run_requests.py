"""Requests to a running training loop from another thread ("sample now", "save now"), answered by the
loop after the step it is in. Imports no torch: the daemon's worker makes one per job.

The asking thread blocks in :meth:`RunRequests.ask` until the loop answers with the events the request
produced (the same events its watchers see), or until the run ends, which fails every open request.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from lorad.errors import LoradError
from lorad.events import Event

SAMPLE_NOW = "sample"
SAVE_NOW = "save"
KINDS = (SAMPLE_NOW, SAVE_NOW)


class RequestNotDone(LoradError):
    """The run could not act on a request: it ended first, it cannot do that, or the answer took too long."""


@dataclass
class RunRequest:
    """One request: its kind, and the answer the loop gives (events, or the reason it could not)."""

    kind: str
    _done: threading.Event = field(default_factory=threading.Event)
    events: list[Event] = field(default_factory=list)
    error: RequestNotDone | None = None

    def answer(self, events: Sequence[Event]) -> None:
        """The loop did it; ``events`` are what it produced."""
        self.events = list(events)
        self._done.set()

    def refuse(self, error: RequestNotDone) -> None:
        """The loop could not do it."""
        self.error = error
        self._done.set()


class RunRequests:
    """The request channel of one run: any thread :meth:`ask`s; the loop :meth:`take`s after each step."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._open: list[RunRequest] = []
        self._closed: str | None = None

    def ask(self, kind: str, *, timeout: float) -> list[Event]:
        """Ask the run to ``kind`` (SAMPLE_NOW or SAVE_NOW) after its current step and wait for it; the
        events it produced. RequestNotDone when the run ends first, refuses, or ``timeout`` seconds pass."""
        if kind not in KINDS:
            raise ValueError(f"unknown request {kind!r}")  # a caller's bug, not user input
        request = RunRequest(kind)
        with self._lock:
            if self._closed is not None:
                raise RequestNotDone(self._closed, "start the job again, or ask while it trains")
            self._open.append(request)
        if not request._done.wait(timeout):
            with self._lock:
                if request in self._open:
                    self._open.remove(request)
            raise RequestNotDone(
                f"the run did not reach the end of its step within {timeout:g}s",
                "ask again later; a slow step (or a long sample) is still running",
            )
        if request.error is not None:
            raise request.error
        return request.events

    def take(self) -> list[RunRequest]:
        """The loop's side: every open request, oldest first (each must be answered or refused)."""
        with self._lock:
            taken, self._open = self._open, []
        return taken

    def close(self, reason: str) -> None:
        """The run ended: refuse what is open and every later request with ``reason``."""
        with self._lock:
            self._closed = reason
            taken, self._open = self._open, []
        for request in taken:
            request.refuse(RequestNotDone(reason, "start the job again, or ask while it trains"))


def answer_requests(requests: RunRequests | None, act: Callable[[str], list[Event]]) -> None:
    """Answer every open request with ``act(kind)``; a RequestNotDone it raises refuses that request only."""
    for request in requests.take() if requests is not None else ():
        try:
            request.answer(act(request.kind))
        except RequestNotDone as err:
            request.refuse(err)
