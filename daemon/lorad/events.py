"""Progress events a training run emits, in order, to whoever watches it.

The engine calls an :data:`EventSink` with these plain dataclasses. They are the one source of the
event schema: each names the ``JobEvent.kind`` field that carries it (``wire_kind``), its fields are
that proto message's fields by name, :meth:`Event.payload` is the job-history row and
:meth:`Event.from_payload` reads one back (tests/test_event_schema.py checks the proto agrees). They
hold only JSON-friendly values.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field, fields
from typing import Any, ClassVar, TypeVar

_E = TypeVar("_E", bound="Event")


@dataclass(frozen=True)
class Event:
    """Base of all events; ``kind`` names the event for logs, ``wire_kind`` the JobEvent field that carries it."""

    wire_kind: ClassVar[str] = ""

    @property
    def kind(self) -> str:
        return type(self).__name__

    def to_dict(self) -> dict[str, Any]:
        """The event's fields plus its kind."""
        return {"kind": self.kind, **asdict(self)}

    def payload(self) -> dict[str, Any]:
        """The job-history row's payload: the wire message's fields by name."""
        return asdict(self)

    @classmethod
    def from_payload(cls: type[_E], payload: Mapping[str, Any]) -> _E:
        """The event a payload (or a wire message read field by field) describes; unknown keys (from a
        newer daemon) are ignored, missing ones take the field's default."""
        names = {f.name for f in fields(cls)}
        return cls(**{key: value for key, value in payload.items() if key in names})


@dataclass(frozen=True)
class DataReported(Event):
    """The data scan finished; ``report`` is DataReport.to_dict(), ``text`` its rendering."""

    wire_kind: ClassVar[str] = "data_report"

    report: dict[str, Any]
    text: str

    def payload(self) -> dict[str, Any]:
        """The wire's DataReport: the counts a table shows, the text, and the whole report as JSON."""
        report = self.report
        return {
            "images_found": report.get("images_found", 0),
            "images_used": report.get("images_used", 0),
            "images_skipped": len(report.get("skipped", ())),
            "captions_generated": report.get("captions_generated", 0),
            "text": self.text,
            "report_json": json.dumps(report),
        }

    @classmethod
    def from_payload(cls, payload: Mapping[str, Any]) -> Event:
        return cls(report=json.loads(payload.get("report_json") or "{}"), text=payload.get("text", ""))


@dataclass(frozen=True)
class ModelLoaded(Event):
    """The base model is ready. ``resident`` is True when it was already in memory."""

    wire_kind: ClassVar[str] = "model_loaded"

    source: str
    model_version: str
    seconds: float
    resident: bool = False


@dataclass(frozen=True)
class LatentsCached(Event):
    """Latents are ready: how many came from the cache and how many were encoded now."""

    wire_kind: ClassVar[str] = "latents_cached"

    cached: int
    encoded: int
    seconds: float


@dataclass(frozen=True)
class TrainingStarted(Event):
    """The loop starts (or resumes at ``start_step``, from the checkpoint ``resumed_from``) towards ``total_steps``."""

    wire_kind: ClassVar[str] = "training_started"

    total_steps: int
    start_step: int
    epochs: int
    trainable_params: int
    device: str
    precision: str
    resumed_from: str = ""
    devices: int = 1  # ranks of a data-parallel run (one device each)

    @classmethod
    def from_payload(cls, payload: Mapping[str, Any]) -> Event:
        # A daemon from before data-parallel runs sent no device count: it trained on one.
        return super().from_payload({**payload, "devices": payload.get("devices") or 1})


@dataclass(frozen=True)
class StepDone(Event):
    """One optimizer step finished."""

    wire_kind: ClassVar[str] = "step"

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

    wire_kind: ClassVar[str] = "checkpoint_saved"

    step: int
    path: str


@dataclass(frozen=True)
class MemoryRecovered(Event):
    """A step ran out of memory and the run made itself leaner, then redid that step.

    ``change`` is the line for people ("batch 4 → 2 × accumulation 2 after out-of-memory at step 37");
    ``micro_batch`` and ``gradient_accumulation_steps`` are the settings now (their product is the
    configured effective batch), ``error`` the first line of the out-of-memory error.
    """

    wire_kind: ClassVar[str] = "memory_recovered"

    step: int
    change: str
    micro_batch: int
    gradient_accumulation_steps: int
    gradient_checkpointing: bool
    error: str = ""


@dataclass(frozen=True)
class LogLine(Event):
    """A human-readable message worth showing (warnings, decisions made for the user)."""

    wire_kind: ClassVar[str] = "log"

    message: str
    level: str = "info"

    @classmethod
    def from_payload(cls, payload: Mapping[str, Any]) -> Event:
        return super().from_payload({**payload, "level": payload.get("level") or "info"})


@dataclass(frozen=True)
class EvalDone(Event):
    """Eval loss (token-weighted mean over ``samples`` held-out records) after ``step`` (LLM runs)."""

    wire_kind: ClassVar[str] = "eval"

    step: int
    loss: float
    samples: int


@dataclass(frozen=True)
class SampleGenerated(Event):
    """The adapter's answer to one of the config's sample prompts (LLM runs), after ``step`` (0: before
    training, without the adapter; the final step at the end).

    ``stopped`` is "eos" when the model ended the answer itself, "length" when it hit the limit.
    """

    wire_kind: ClassVar[str] = "sample"

    prompt: str
    output: str
    stopped: str
    step: int = 0


@dataclass(frozen=True)
class SampleImage(Event):
    """A sample image was written: prompt number ``prompt_index`` (from 0, in the config's order) drawn
    after ``step`` (0: the baseline before training, without the LoRA) with ``seed``, as the PNG ``path``."""

    wire_kind: ClassVar[str] = "sample_image"

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

    wire_kind: ClassVar[str] = "finished"

    outputs: dict[str, str] = field(default_factory=dict)
    steps: int = 0
    final_loss: float = float("nan")
    seconds: float = 0.0


EventSink = Callable[[Event], None]


def event_class(wire_kind: str) -> type[Event] | None:
    """The engine event a ``JobEvent.kind`` field carries; None for job-level kinds (queued, started,
    failed, cancelled, interrupted) and kinds this daemon does not know."""
    return next((cls for cls in Event.__subclasses__() if cls.wire_kind == wire_kind), None)


def ignore_events(event: Event) -> None:
    """An EventSink that drops everything (for library use and tests that don't watch)."""
