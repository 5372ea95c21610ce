"""Daemons the tests start, and reading their jobs' events."""

from __future__ import annotations

from pathlib import Path

import yaml

from lorad.server.daemon import RunningDaemon
from lorad_api.v1 import jobs_pb2
from lorad_client import LoradClient
from tests.support.datasets import (
    tiny_train_values,
)


def run_daemon(home: Path) -> RunningDaemon:
    """A real daemon in this process on a free port and a Unix socket in ``home``."""
    from lorad.server.daemon import start_daemon
    from lorad.server.settings import daemon_settings

    settings = daemon_settings(["127.0.0.1:0", f"unix:{home}/lorad.sock"], home=home)
    return start_daemon(settings)


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
