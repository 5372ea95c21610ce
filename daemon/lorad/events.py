"""Progress events a training run emits, in order, to whoever watches it.

The engine calls an :data:`EventSink` with these plain dataclasses; the CLI renders them as a
progress bar, and the daemon will persist and stream them. They hold only JSON-friendly values.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass(frozen=True)
class Event:
    """Base of all events; ``kind`` names the event for logs and the wire."""

    @property
    def kind(self) -> str:
        return type(self).__name__

    def to_dict(self) -> dict[str, Any]:
        """The event's fields plus its kind."""
        return {"kind": self.kind, **asdict(self)}


@dataclass(frozen=True)
class DataReported(Event):
    """The data scan finished; ``report`` is DataReport.to_dict(), ``text`` its rendering."""

    report: dict[str, Any]
    text: str


@dataclass(frozen=True)
class ModelLoaded(Event):
    """The base model is ready. ``resident`` is True when it was already in memory."""

    source: str
    model_version: str
    seconds: float
    resident: bool = False


@dataclass(frozen=True)
class LatentsCached(Event):
    """Latents are ready: how many came from the cache and how many were encoded now."""

    cached: int
    encoded: int
    seconds: float


@dataclass(frozen=True)
class TrainingStarted(Event):
    """The loop starts (or resumes at ``start_step``, from the checkpoint ``resumed_from``) towards ``total_steps``."""

    total_steps: int
    start_step: int
    epochs: int
    trainable_params: int
    device: str
    precision: str
    resumed_from: str = ""
    devices: int = 1  # ranks of a data-parallel run (one device each)


@dataclass(frozen=True)
class StepDone(Event):
    """One optimizer step finished."""

    step: int
    total_steps: int
    epoch: int
    loss: float
    lr: float
    steps_per_second: float
    eta_seconds: float


@dataclass(frozen=True)
class CheckpointSaved(Event):
    """A resumable checkpoint was written at ``path``."""

    step: int
    path: str


@dataclass(frozen=True)
class MemoryRecovered(Event):
    """A step ran out of memory and the run made itself leaner, then redid that step.

    ``change`` is the line for people ("batch 4 → 2 × accumulation 2 after out-of-memory at step 37");
    ``micro_batch`` and ``gradient_accumulation_steps`` are the settings now (their product is the
    configured effective batch), ``error`` the first line of the out-of-memory error.
    """

    step: int
    change: str
    micro_batch: int
    gradient_accumulation_steps: int
    gradient_checkpointing: bool
    error: str = ""


@dataclass(frozen=True)
class LogLine(Event):
    """A human-readable message worth showing (warnings, decisions made for the user)."""

    message: str
    level: str = "info"


@dataclass(frozen=True)
class EvalDone(Event):
    """Eval loss (token-weighted mean over ``samples`` held-out records) after ``step`` (LLM runs)."""

    step: int
    loss: float
    samples: int


@dataclass(frozen=True)
class SampleGenerated(Event):
    """The adapter's answer to one of the config's sample prompts (LLM runs), after ``step`` (0: before
    training, without the adapter; the final step at the end).

    ``stopped`` is "eos" when the model ended the answer itself, "length" when it hit the limit.
    """

    prompt: str
    output: str
    stopped: str
    step: int = 0


@dataclass(frozen=True)
class SampleImage(Event):
    """A sample image was written: prompt number ``prompt_index`` (from 0, in the config's order) drawn
    after ``step`` (0: the baseline before training, without the LoRA) with ``seed``, as the PNG ``path``."""

    step: int
    prompt_index: int
    prompt: str
    seed: int
    path: str
    width: int
    height: int


@dataclass(frozen=True)
class TrainingFinished(Event):
    """Every output is written; ``outputs`` maps a role (kohya, diffusers, summary) to a path."""

    outputs: dict[str, str] = field(default_factory=dict)
    steps: int = 0
    final_loss: float = float("nan")
    seconds: float = 0.0


EventSink = Callable[[Event], None]


def ignore_events(event: Event) -> None:
    """An EventSink that drops everything (for library use and tests that don't watch)."""
