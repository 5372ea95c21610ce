"""The channel between the daemon and one worker: calls with answers, and one-way notes, over a pipe.

Why a pipe (``multiprocessing.Pipe`` of the ``spawn`` context) rather than a Unix socket or gRPC on a
socket in LORAD_HOME: the worker inherits its end when it is started, so there is nothing to listen
on, no name another local user could connect to, and no token to check; the daemon sees the worker
die at once (the pipe reports end-of-file, whatever killed it); and both ends are lorad, so plain
Python objects (pickled dataclasses, lorad's errors with their hints) cross it without a schema.

Each end runs :meth:`Link.serve` on one thread: it reads messages in order, hands notes to the
handler in that order (a job's events stay in sequence), answers calls on a thread of their own (an
answer may take long, e.g. waiting for a caption folder), and wakes whoever waits for an answer.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
import pickle
import socket
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from lorad.errors import LoradError

log = logging.getLogger("lorad.workers.link")


class LinkClosed(LoradError):
    """The other end of the channel is gone (its process died or shut down)."""


@dataclass(frozen=True)
class Call:
    """A request that wants an answer: ``op`` with keyword ``args``."""

    call_id: int
    op: str
    args: dict[str, Any]


@dataclass(frozen=True)
class Answer:
    """The answer to call ``call_id``: ``value``, or the ``error`` it raised."""

    call_id: int
    value: Any = None
    error: BaseException | None = None


@dataclass(frozen=True)
class Note:
    """A one-way message: ``op`` with keyword ``args`` (a job's event, a stop request)."""

    op: str
    args: dict[str, Any]


class _Waiting:
    __slots__ = ("answer", "done")

    def __init__(self) -> None:
        self.done = threading.Event()
        self.answer: Answer | None = None


class Link:
    """One end of the channel over ``connection`` (a ``multiprocessing.connection.Connection``).

    ``on_call(op, args)`` answers the other end's calls (its return value or exception goes back);
    ``on_note(op, args)`` takes its notes. Thread-safe: any thread may :meth:`call` or :meth:`note`.
    """

    def __init__(
        self,
        connection: Any,
        *,
        on_call: Callable[[str, dict[str, Any]], Any],
        on_note: Callable[[str, dict[str, Any]], None],
        name: str = "link",
    ) -> None:
        self._connection = connection
        self._on_call = on_call
        self._on_note = on_note
        self._name = name
        self._send_lock = threading.Lock()
        self._ids = itertools.count(1)
        self._waiting: dict[int, _Waiting] = {}
        self._lock = threading.Lock()
        self._closed = False

    @property
    def closed(self) -> bool:
        return self._closed

    def note(self, op: str, **args: Any) -> None:
        """Send a one-way message; LinkClosed when the other end is gone."""
        self._send(Note(op, args))

    def call(self, op: str, *, timeout: float | None = None, **args: Any) -> Any:
        """Ask the other end and wait for its answer (at most ``timeout`` seconds: LinkClosed after it).
        The other end's exception is raised here; LinkClosed when it goes away before answering."""
        waiting = _Waiting()
        call_id = next(self._ids)
        with self._lock:
            if self._closed:
                raise LinkClosed(f"{self._name}: the other end is gone")
            self._waiting[call_id] = waiting
        try:
            self._send(Call(call_id, op, args))
            if not waiting.done.wait(timeout):
                raise LinkClosed(f"{self._name}: no answer to `{op}` within {timeout:g} s")
        finally:
            with self._lock:
                self._waiting.pop(call_id, None)
        answer = waiting.answer
        if answer is None:
            raise LinkClosed(f"{self._name}: the other end went away before answering `{op}`")
        if answer.error is not None:
            raise answer.error
        return answer.value

    def serve(self) -> None:
        """Read and dispatch messages until the other end closes the channel (or :meth:`close`); then
        every call still waiting fails with LinkClosed."""
        try:
            while True:
                try:
                    message = self._connection.recv()
                except (EOFError, OSError):
                    return
                if isinstance(message, Answer):
                    with self._lock:
                        waiting = self._waiting.get(message.call_id)
                    if waiting is not None:
                        waiting.answer = message
                        waiting.done.set()
                elif isinstance(message, Call):
                    threading.Thread(
                        target=self._answer, args=(message,), name=f"{self._name}-{message.op}", daemon=True
                    ).start()
                elif isinstance(message, Note):
                    try:
                        self._on_note(message.op, message.args)
                    except Exception:  # a bad note must not end the channel
                        log.exception("%s: handling note %s", self._name, message.op)
        finally:
            self._shut()

    def close(self) -> None:
        """Close this end: both ends' :meth:`serve` return; calls waiting here fail."""
        self._shut()
        # A thread blocked reading keeps a closed descriptor's socket open (the other end would never see
        # end-of-file): shut the socket itself down first, which ends both ends' reads.
        with contextlib.suppress(OSError, ValueError):
            channel = socket.socket(fileno=os.dup(self._connection.fileno()))
            channel.shutdown(socket.SHUT_RDWR)
            channel.close()
        with contextlib.suppress(OSError):
            self._connection.close()

    def _answer(self, call: Call) -> None:
        try:
            answer = Answer(call.call_id, value=self._on_call(call.op, call.args))
        except BaseException as err:  # it goes back to the caller, who raises it
            answer = Answer(call.call_id, error=_portable(err))
        with contextlib.suppress(LinkClosed):  # the caller may be gone; nobody waits for this answer then
            self._send(answer)

    def _send(self, message: Call | Answer | Note) -> None:
        with self._send_lock:
            if self._closed:
                raise LinkClosed(f"{self._name}: the other end is gone")
            try:
                self._connection.send(message)
            except (OSError, EOFError, BrokenPipeError) as err:
                raise LinkClosed(f"{self._name}: the other end is gone ({err})") from None

    def _shut(self) -> None:
        with self._lock:
            self._closed = True
            waiting = list(self._waiting.values())
        for item in waiting:
            item.done.set()  # no answer: call() raises LinkClosed


def _portable(error: BaseException) -> BaseException:
    """``error`` if it survives pickling (lorad's errors do), else a RuntimeError with its text."""
    try:
        pickle.loads(pickle.dumps(error))
    except Exception:
        return RuntimeError(f"{type(error).__name__}: {error}")
    return error
