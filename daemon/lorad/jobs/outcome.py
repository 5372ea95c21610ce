"""How a job's run ended, as the worker that ran it tells the daemon: finished, stopped, or failed and why.

The worker turns whatever ``train`` raised into an :class:`Outcome` (a person's message and hint, never
a traceback; the traceback goes to the log); the daemon records it in the job store.
"""

from __future__ import annotations

import logging
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lorad.config.schema import TrainingKeys
from lorad.disk_space import disk_full_error, is_disk_full
from lorad.errors import LoradError, TrainingInterrupted, is_out_of_memory
from lorad.families.registry import spec_for

log = logging.getLogger("lorad.jobs.outcome")

BUG_HINT = "This looks like a bug in lorad; the daemon log has the traceback."


@dataclass(frozen=True)
class Outcome:
    """The end of one rank's run of a job.

    ``state``: "succeeded" (``finished`` holds the TrainingFinished payload; None on a rank that does not
    report), "stopped" (on request: ``checkpoint`` and ``partial`` as TrainingInterrupted says) or
    "failed" (``error`` and ``hint``). ``peer_lost`` marks a failure that only says another rank of the
    job went away: the daemon records that rank's own reason instead."""

    state: str
    finished: dict[str, Any] | None = None
    error: str = ""
    hint: str = ""
    checkpoint: str | None = None
    partial: str | None = None
    peer_lost: bool = False
    details: dict[str, Any] = field(default_factory=dict)


def outcome_of(err: BaseException, config: TrainingKeys | None, output_dir: str) -> Outcome:
    """What ``err`` (raised by a job's run) means for the job: stopped, or failed with a message and a hint."""
    if isinstance(err, TrainingInterrupted):
        return Outcome("stopped", checkpoint=err.checkpoint, partial=err.partial)
    if isinstance(err, LoradError):
        from lorad.training.distributed import OtherRankFailed

        return Outcome("failed", error=str(err), hint=err.hint, peer_lost=isinstance(err, OtherRankFailed))
    if is_disk_full(err):
        full = disk_full_error(Path(output_dir), "the job's outputs")
        return Outcome("failed", error=str(full), hint=full.hint)
    if is_out_of_memory(err):
        hint = spec_for(config).out_of_memory_hint(config) if config is not None else ""
        return Outcome("failed", error=f"out of memory: {err}".splitlines()[0], hint=hint)
    if _is_lost_peer(err):
        return Outcome(
            "failed",
            error=f"another device of this job stopped answering ({type(err).__name__}: {err})".splitlines()[0],
            hint="The daemon log says what happened to it.",
            peer_lost=True,
        )
    log.error("job crashed:\n%s", "".join(traceback.format_exception(err)))
    return Outcome("failed", error=f"{type(err).__name__}: {err}", hint=BUG_HINT)


def _is_lost_peer(err: BaseException) -> bool:
    """A collective that failed because a peer rank went away (torch.distributed's own error types)."""
    import sys

    dist = sys.modules.get("torch.distributed")
    error_type = getattr(dist, "DistError", None) if dist is not None else None
    return error_type is not None and isinstance(err, error_type)
