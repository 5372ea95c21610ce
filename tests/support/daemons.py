"""Daemons the tests start, and reading their jobs' events."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import yaml

from lorad.jobs.dispatcher import Dispatcher
from lorad.jobs.hub import EventHub
from lorad.jobs.scheduling import Slot
from lorad.jobs.store import JobStore
from lorad.server.daemon import RunningDaemon
from lorad.workers.host import WorkerSpec
from lorad_api.v1 import jobs_pb2
from lorad_client import LoradClient
from tests.support.datasets import tiny_train_values

if TYPE_CHECKING:
    from lorad.models.registry import ModelRegistry


def run_daemon(home: Path, **settings: object) -> RunningDaemon:
    """A real daemon in this process on a free port and a Unix socket in ``home``; its jobs run in worker
    processes (``in_process=True``: in threads of this process, where a test can look at the resident
    models; ``cpu_workers=2``: two CPU workers)."""
    from lorad.server.daemon import start_daemon
    from lorad.server.settings import daemon_settings

    return start_daemon(daemon_settings(["127.0.0.1:0", f"unix:{home}/lorad.sock"], home=home, **settings))


def config_yaml(tiny_sd: Path, data: Path, out: Path, **overrides: object) -> str:
    values = tiny_train_values(tiny_sd, data, out, **overrides)
    return yaml.safe_dump({k: str(v) if isinstance(v, Path) else v for k, v in values.items()})


def watch_all(client: LoradClient, job_id: str, after_seq: int = 0) -> tuple[jobs_pb2.Job, list[jobs_pb2.JobEvent]]:
    first, events = None, []
    for message in client.watch_job(job_id, after_seq=after_seq):
        if message.WhichOneof("item") == "job":
            first = message.job
        else:
            events.append(message.event)
    return first, events


def kinds(events: list[jobs_pb2.JobEvent]) -> list[str]:
    return [e.WhichOneof("kind") for e in events]


def worker_registry(daemon: RunningDaemon, index: int = 0) -> ModelRegistry:
    """The resident models of an in-process daemon's worker ``index`` (its base models live there)."""
    return daemon.service.dispatcher.handles[index].host.registry


def in_process_dispatcher(store: JobStore, home: Path, train) -> Dispatcher:
    """The daemon's dispatcher with one CPU worker in this process, running ``train``."""
    return Dispatcher(
        store,
        EventHub(store),
        [Slot(0, "cpu")],
        lambda slot: WorkerSpec(slot.index, slot.device, str(home), default_keep_alive=0.0, memory_budget_bytes=None),
        in_process=True,
        train=train,
    )


def wait_for_step(client: LoradClient, job_id: str) -> None:
    for message in client.watch_job(job_id):
        if message.WhichOneof("item") == "event" and message.event.HasField("step"):
            return
