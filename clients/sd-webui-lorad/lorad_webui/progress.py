"""Folding a WatchJob stream into what the tab shows: a status line, live progress and recent events."""

from __future__ import annotations

from typing import Any

from lorad_webui.api.v1 import jobs_pb2
from lorad_webui.vendored.format import describe_event, format_progress, job_state_name

FINAL_STATES = frozenset(
    {
        jobs_pb2.JOB_STATE_SUCCEEDED,
        jobs_pb2.JOB_STATE_FAILED,
        jobs_pb2.JOB_STATE_CANCELLED,
        jobs_pb2.JOB_STATE_INTERRUPTED,
    }
)
# The events that end a job (the stream may end with them, before any newer job snapshot).
_FINAL_EVENTS = {
    "finished": jobs_pb2.JOB_STATE_SUCCEEDED,
    "failed": jobs_pb2.JOB_STATE_FAILED,
    "cancelled": jobs_pb2.JOB_STATE_CANCELLED,
    "interrupted": jobs_pb2.JOB_STATE_INTERRUPTED,
}
# How many event lines the progress box keeps (older ones scroll away; `lorad logs` has them all).
MAX_LINES = 12
# How many sample images the gallery shows (the newest; `lorad samples JOB` lists them all).
MAX_SAMPLES = 24


class JobProgress:
    """The state of one job as seen through its WatchJob messages (``apply`` each, in order)."""

    def __init__(self, job: jobs_pb2.Job | None = None) -> None:
        self.job = job
        self.progress: Any = None
        self.lines: list[str] = []
        self.outputs: dict[str, str] = {}
        self.samples: dict[tuple[int, int], tuple[str, str]] = {}  # (step, prompt) → (path, caption)

    @property
    def state(self) -> int:
        """The job's JobState value (UNSPECIFIED before the first message)."""
        return self.job.state if self.job is not None else jobs_pb2.JOB_STATE_UNSPECIFIED

    @property
    def done(self) -> bool:
        """True once the job reached a final state."""
        return self.state in FINAL_STATES

    def apply(self, message: Any) -> None:
        """Take one WatchJobResponse: a job snapshot or an event."""
        item = message.WhichOneof("item")
        if item == "job":
            self.job = message.job
            if message.job.HasField("progress") and message.job.progress.total_steps:
                self.progress = message.job.progress
            self.outputs.update(message.job.outputs)
            return
        if item != "event":
            return  # an item a newer daemon sends: nothing to show
        event = message.event
        kind = event.WhichOneof("kind")
        if kind == "step":
            self.progress = event.step.progress
            return
        if kind == "sample_image":
            shot = event.sample_image
            when = f"step {shot.step}" if shot.step else "base model"
            self.samples[(shot.step, shot.prompt_index)] = (shot.path, f"{when} · #{shot.prompt_index} {shot.prompt}")
            return  # the gallery shows it; no log line
        if kind == "finished":
            self.outputs.update(event.finished.outputs)
        if kind in _FINAL_EVENTS and self.job is not None:
            job = jobs_pb2.Job()
            job.CopyFrom(self.job)
            job.state = _FINAL_EVENTS[kind]
            self.job = job
        line = describe_event(event)
        if line:
            self.lines = [*self.lines, *line.splitlines()][-MAX_LINES:]

    def gallery(self) -> list[tuple[str, str]]:
        """The sample images as (path, caption), newest step first, at most MAX_SAMPLES."""
        newest = sorted(self.samples, key=lambda key: (-key[0], key[1]))[:MAX_SAMPLES]
        return [self.samples[key] for key in newest]

    def text(self) -> str:
        """Status line, progress line (step, loss, ETA) and the latest event lines."""
        if self.job is None:
            return "waiting for the daemon…"
        head = f"job {self.job.job_id[:8]} ({self.job.name}): {job_state_name(self.state)}"
        if self.state == jobs_pb2.JOB_STATE_QUEUED and self.job.queue_position:
            head += f", position {self.job.queue_position} in the queue"
        parts = [head]
        if self.progress is not None:
            parts.append(format_progress(self.progress))
        if self.job.error:
            parts.append(f"error: {self.job.error}" + (f"\nhint: {self.job.hint}" if self.job.hint else ""))
        return "\n".join([*parts, *(["", *self.lines] if self.lines else [])])
