"""The job store's plain values: a job's state, a job, one event of a job, and the not-found error.

These are frozen snapshots of what was committed at the time they were read; the store never
changes a record after handing it out. Mapping fields hold plain dicts decoded from JSON, typed as
``Mapping`` to say that callers must not mutate them.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from enum import Enum
from typing import Any

from lorad.errors import LoradError


class JobState(str, Enum):
    """Where a job is in its life. Stored by value, so the values never change."""

    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"
    # Stopped by a daemon restart or crash; not final, because the job can be resumed.
    INTERRUPTED = "interrupted"

    @property
    def final(self) -> bool:
        """True once the job can never run again (succeeded, failed or cancelled)."""
        return self in _FINAL_STATES


_FINAL_STATES = frozenset({JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED})


@dataclass(frozen=True)
class JobRecord:
    """One job as committed in the store.

    ``config_yaml`` is the config text exactly as submitted and ``base_dir`` the folder its
    relative paths resolve against. ``outputs`` maps an output's kind to its file path;
    ``progress`` is the latest progress figures (e.g. step, total_steps, loss) or None before the
    first step. ``error``/``hint`` are empty unless the job failed. ``attempt`` counts resumes
    (0 on the first run) and ``checkpoint`` is the folder to resume from ("" if none).
    ``keep_alive_seconds`` is how long the base model stays loaded after the job ends.
    Timestamps are unix seconds.
    """

    job_id: str
    name: str
    state: JobState
    created_at: float
    started_at: float | None
    finished_at: float | None
    config_yaml: str
    base_dir: str
    source_name: str
    base_model: str
    output_dir: str
    outputs: Mapping[str, str]
    error: str
    hint: str
    progress: Mapping[str, float] | None
    attempt: int
    checkpoint: str
    keep_alive_seconds: float


@dataclass(frozen=True)
class EventRecord:
    """One event of a job. ``seq`` counts from 1 per job with no gaps; ``payload`` is JSON data."""

    job_id: str
    seq: int
    time: float
    kind: str
    payload: Mapping[str, Any]


class JobNotFound(LoradError):
    """No job has the given id (or the given id prefix matches none, or more than one)."""

    def __init__(self, message: str, hint: str = "Run `lorad jobs` to list jobs and their ids.") -> None:
        super().__init__(message, hint)
