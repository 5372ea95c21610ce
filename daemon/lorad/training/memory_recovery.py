"""Out-of-memory recovery: a step that runs out of memory makes the run leaner and is done again.

The ladder, one rung per out-of-memory error (``oom_recovery: true``, the default):

1. halve the micro-batch: each planned micro-batch is done in pieces of half the size, so the
   accumulation doubles and the effective batch (and the samples of every step) stay the same;
2. at one sample per piece, turn gradient checkpointing on;
3. then the family's own savings, one at a time (:meth:`FamilyRun.reduce_memory`, e.g. ``fp8_base``);
4. then fail with the family's hint, computed for the settings reached.

Recovery covers the forward and backward passes of a step, where activations take the memory; an
error in the optimizer's update (a few LoRA-sized tensors) fails the run as before.

The step that failed is redone from its first micro-batch with its gradients dropped, and its random
draws are the same (the loop seeds them by planned micro-batch, and a family draws a piece's numbers
as part of its whole micro-batch), so the run goes on as if it had used the smaller pieces from the
start. The state reached is saved in each checkpoint and put back on resume.
"""

from __future__ import annotations

import dataclasses
import gc
import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch

from lorad.errors import TrainingOutOfMemory
from lorad.events import MemoryRecovered
from lorad.families.registry import get_spec

if TYPE_CHECKING:
    from lorad.config.schema import TrainingKeys
    from lorad.training.family import FamilyRun

# The ladder is finite by construction; this also bounds a family whose savings never run out.
MAX_RECOVERIES = 12


class MemoryRecovery:
    """The run's current memory settings, and the next rung of the ladder when a step runs out."""

    def __init__(self, config: TrainingKeys, run: FamilyRun, device: torch.device) -> None:
        self.config, self.run, self.device = config, run, device
        self.micro_batch = config.batch_size  # samples per piece of a planned micro-batch
        self.gradient_checkpointing = config.gradient_checkpointing
        self.reduced: list[str] = []  # the family's savings turned on, in order
        self.changes: list[str] = []  # one line per recovery, for the summary

    @property
    def accumulation(self) -> int:
        """Pieces per optimizer step: the configured accumulation times the pieces per micro-batch."""
        return self.config.gradient_accumulation_steps * math.ceil(self.config.batch_size / self.micro_batch)

    def pieces(self, micro_batch: Any) -> Sequence[tuple[Any, float]]:
        """A planned micro-batch as the pieces to run now, each with its share of the micro-batch's loss."""
        if self.micro_batch >= self.config.batch_size:
            return [(micro_batch, 1.0)]
        return self.run.split(micro_batch, self.micro_batch)

    def recover(self, error: str, at_step: int) -> MemoryRecovered:
        """Free the failed step's memory and take the next rung; TrainingOutOfMemory when none is left
        (or recovery is off). ``error`` is the out-of-memory message, ``at_step`` the step that failed."""
        gc.collect()  # the failed step's activations are garbage once its exception is gone
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        if not self.config.oom_recovery or len(self.changes) >= MAX_RECOVERIES:
            raise self._exhausted(error, at_step)
        before = self.micro_batch
        if before > 1 and hasattr(self.run, "split"):
            self.micro_batch = math.ceil(before / 2)
            change = f"batch {before} → {self.micro_batch} × accumulation {self.accumulation}"
        elif not self.gradient_checkpointing:
            self.run.train_mode(True)
            self.gradient_checkpointing = True
            change = "gradient checkpointing on"
        elif (saving := self._reduce()) is not None:
            self.reduced.append(saving)
            change = f"{saving} on"
        else:
            raise self._exhausted(error, at_step)
        change += f" after out-of-memory at step {at_step}"
        self.changes.append(change)
        return MemoryRecovered(
            step=at_step,
            change=change,
            micro_batch=self.micro_batch,
            gradient_accumulation_steps=self.accumulation,
            gradient_checkpointing=self.gradient_checkpointing,
            error=error.splitlines()[0] if error else "",
        )

    def state(self) -> dict[str, Any]:
        """What a checkpoint records, so a resumed run keeps the settings reached (JSON-friendly)."""
        return {
            "micro_batch": self.micro_batch,
            "gradient_checkpointing": self.gradient_checkpointing,
            "reduced": list(self.reduced),
            "changes": list(self.changes),
        }

    def restore(self, state: dict[str, Any]) -> None:
        """Put back the settings a checkpoint recorded (after ``train_mode``, before the first step)."""
        if not state:
            return
        self.micro_batch = int(state["micro_batch"])
        self.changes = list(state.get("changes", ()))
        if state["gradient_checkpointing"] and not self.gradient_checkpointing:
            self.run.train_mode(True)
            self.gradient_checkpointing = True
        for name in state.get("reduced", ()):
            if self._reduce() != name:
                raise RuntimeError(f"the checkpoint was trained with {name}, which this run cannot turn on")
            self.reduced.append(name)

    def _reduce(self) -> str | None:
        reduce_memory = getattr(self.run, "reduce_memory", None)
        return reduce_memory() if reduce_memory is not None else None

    def _exhausted(self, error: str, at_step: int) -> TrainingOutOfMemory:
        reached = dataclasses.replace(
            self.config,
            batch_size=self.micro_batch,
            gradient_accumulation_steps=self.accumulation,
            gradient_checkpointing=self.gradient_checkpointing,
        )
        tried = f" after {len(self.changes)} recoveries ({'; '.join(self.changes)})" if self.changes else ""
        first_line = error.splitlines()[0] if error else "out of memory"
        return TrainingOutOfMemory(
            f"out of memory at step {at_step}{tried}: {first_line}",
            get_spec(self.config.model_family).out_of_memory_hint(reached),
        )
