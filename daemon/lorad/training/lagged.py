"""A step's numbers (its loss) on the host one step late, so the device never waits for the host.

Reading a CUDA tensor's value (``float(loss)``, ``.item()``) blocks the host until every kernel
queued so far has run: the queue empties, and the next step's kernels start only after Python has
queued them again. Here a step's values are instead copied to pinned host memory with a
non-blocking copy, behind a CUDA event; they are read when the *next* step has been queued, by
waiting on that event only. The device is then still busy with the next step while the host
reads, checks and reports the previous one. On a CPU there is no queue to keep busy: values are
read at once, so a step is reported (and a stop request seen) right after it, as users expect.

This module is the one place in the training step that reads a device number on the host; a test
counts such reads to keep it so.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable
from typing import Generic, TypeVar

import torch

Note = TypeVar("Note")


class LaggedValues(Generic[Note]):
    """Device scalars pushed once per step, handed back on the host one push later.

    Each push carries a ``note`` (what the host already knows about that step: its number, its
    learning rate) that comes back with the values. :meth:`push` returns every earlier push, so at
    most one step is ever unread; :meth:`drain` waits for all of them (before a checkpoint, an
    export or a stop, so none is written before its loss has been checked).
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.lag = 0 if device.type == "cpu" else 1  # steps left unread after a push
        self._pending: deque[tuple[Note, torch.Tensor, torch.cuda.Event | None]] = deque()

    def push(self, values: torch.Tensor, note: Note) -> list[tuple[Note, list[float]]]:
        """Start copying ``values`` (a 1-D tensor on the run's device) to the host; return the earlier
        pushes' notes and values, in order (waiting only for those, never for this one)."""
        values = values.detach()
        if self.device.type == "cuda":
            host = torch.empty(values.shape, dtype=values.dtype, pin_memory=True)
            host.copy_(values, non_blocking=True)
            done = torch.cuda.Event()
            done.record(torch.cuda.current_stream(self.device))  # the run's device, not the current one
            self._pending.append((note, host, done))
        else:
            self._pending.append((note, values, None))
        return self._read(len(self._pending) - self.lag)

    def drain(self) -> list[tuple[Note, list[float]]]:
        """Every pushed step's notes and values, in order, waiting for the device where needed."""
        return self._read(len(self._pending))

    def _read(self, count: int) -> list[tuple[Note, list[float]]]:
        out = []
        for _ in range(count):
            note, host, done = self._pending.popleft()
            if done is not None:
                done.synchronize()  # waits for that step's copy only; later steps keep the device busy
            out.append((note, host.tolist()))
        return out


def all_finite(tensors: Iterable[torch.Tensor]) -> bool:
    """Whether every value of every tensor is finite: one device read for all of them (for the check
    before a checkpoint or an export, not for every step)."""
    flags = [torch.isfinite(t.detach()).all() for t in tensors]
    return bool(torch.stack(flags).all().item()) if flags else True


def wait_for_device(device: torch.device) -> None:
    """Wait until ``device`` has run everything queued so far (through an event, like the reads above;
    for the one wait a run makes on purpose: timing its first step)."""
    if device.type == "cuda":
        done = torch.cuda.Event()
        done.record(torch.cuda.current_stream(device))
        done.synchronize()
