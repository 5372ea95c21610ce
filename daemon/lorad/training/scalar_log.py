"""TensorBoard scalars, written in batches rather than a few calls every step."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any


class ScalarLog:
    """Collects (name, value, step) scalars and hands them to a TensorBoard ``SummaryWriter`` every
    ``every`` steps and on :meth:`flush`. Each ``add_scalar`` builds a protobuf on the calling thread;
    batching keeps that work out of most steps (the writer's own thread does the file I/O). Without a
    writer (a rank that does not report) the scalars are dropped."""

    def __init__(self, writer: Any, *, every: int = 25) -> None:
        self.writer = writer
        self.every = every
        self._rows: list[tuple[str, float, int]] = []
        self._steps: set[int] = set()  # the steps queued since the last write

    def add(self, step: int, values: Mapping[str, float]) -> None:
        """Queue ``values`` for ``step``; writes the queue once it spans ``every`` steps."""
        self._rows += [(name, float(value), step) for name, value in values.items()]
        self._steps.add(step)
        if len(self._steps) >= self.every:
            self._write()

    def flush(self) -> None:
        """Write every queued scalar and flush the event file (at checkpoints and at the end of the run)."""
        self._write()
        if self.writer is not None:
            self.writer.flush()

    def _write(self) -> None:
        for name, value, step in self._rows if self.writer is not None else ():
            self.writer.add_scalar(name, value, step)
        self._rows.clear()
        self._steps.clear()
