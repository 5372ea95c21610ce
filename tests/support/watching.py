"""Watch-folder tests' helpers: dropping stock images into a folder, a watch's template config, waiting on its jobs."""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from lorad_api.v1 import jobs_pb2, watch_pb2
from lorad_client import LoradClient
from tests.support.datasets import tiny_train_values, write_config

QUIET = 0.4


# Tests that count jobs after a burst use a longer quiet period: a test thread stalled for longer than
# it on a busy machine would really be a pause between two bursts.
BURST_QUIET = 1.0


DEADLINE = 90.0


_T = TypeVar("_T")


def wait_for(condition: Callable[[], _T], what: str, timeout: float = DEADLINE) -> _T:
    """Poll ``condition`` until it returns something truthy; fail naming ``what`` after ``timeout``."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        value = condition()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def drop(stock: Path, folder: Path, index: int, name: str | None = None) -> Path:
    """Copy stock image ``index`` (caption first) into ``folder`` as ``name``."""
    stem = name or f"img_{index:02d}"
    shutil.copyfile(stock / f"img_{index:02d}.txt", folder / f"{stem}.txt")
    target = folder / f"{stem}.png"
    shutil.copyfile(stock / f"img_{index:02d}.png", target)
    return target


def template(tmp_path: Path, tiny_sd: Path, name: str = "mystyle", **overrides: object) -> Path:
    """A template training config: the tiny model, two steps, sidecar captions."""
    values = tiny_train_values(
        tiny_sd, tmp_path / "unused", tmp_path / "output" / name, **{"max_train_steps": 2, **overrides}
    )
    values.pop("metadata_path")
    return write_config(tmp_path / f"{name}.yaml", **values)


def watch_of(client: LoradClient, watch_id: str) -> watch_pb2.Watch:
    return next(w for w in client.list_watches() if w.watch_id == watch_id)


def watch_jobs(client: LoradClient, folder: Path) -> list[jobs_pb2.Job]:
    """Jobs a watch of ``folder`` queued, oldest first."""
    return [j for j in reversed(client.list_jobs(limit=100)) if j.source_name == f"watch {folder}"]


def finished_job(client: LoradClient, job_id: str) -> jobs_pb2.Job:
    def done() -> jobs_pb2.Job | None:
        job = client.get_job(job_id)
        return job if job.state in (jobs_pb2.JOB_STATE_SUCCEEDED, jobs_pb2.JOB_STATE_FAILED) else None

    job = wait_for(done, f"job {job_id} to finish")
    assert job.state == jobs_pb2.JOB_STATE_SUCCEEDED, f"{job.error}\n{job.hint}"
    return job


def job_event(client: LoradClient, job_id: str, kind: str):
    for message in client.watch_job(job_id, history_only=True):
        if message.WhichOneof("item") == "event" and message.event.WhichOneof("kind") == kind:
            return getattr(message.event, kind)
    raise AssertionError(f"job {job_id} has no {kind} event")


def job_logs(client: LoradClient, job_id: str) -> list[str]:
    return [
        m.event.log.message
        for m in client.watch_job(job_id, history_only=True)
        if m.WhichOneof("item") == "event" and m.event.WhichOneof("kind") == "log"
    ]
