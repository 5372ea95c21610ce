"""One worker process per device: jobs side by side, a dead worker takes only its own job, and the
daemon shows each device's worker, memory and residents. Two CPU workers stand in for two GPUs."""

from __future__ import annotations

import os
import signal
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import yaml

from lorad.cli.daemon_commands import print_models, print_status
from lorad.server.daemon import RunningDaemon
from lorad_api.v1 import jobs_pb2
from lorad_client import LoradClient
from tests.support.daemons import kinds, run_daemon, watch_all
from tests.support.datasets import tiny_train_values

pytestmark = pytest.mark.slow


@pytest.fixture
def two_workers(short_dir: Path) -> Iterator[RunningDaemon]:
    running = run_daemon(short_dir, cpu_workers=2)
    yield running
    running.stop(grace=0)


@pytest.fixture
def client2(two_workers: RunningDaemon) -> Iterator[LoradClient]:
    with LoradClient.connect(two_workers.addresses[0], home=two_workers.settings.home) as connected:
        yield connected


def submit(client: LoradClient, tiny_sd: Path, data: Path, out: Path, **overrides: object) -> jobs_pb2.Job:
    values = tiny_train_values(tiny_sd, data, out, **overrides)
    text = yaml.safe_dump({k: str(v) if isinstance(v, Path) else v for k, v in values.items()})
    return client.submit_training(text, base_dir=out.parent)


def wait_for_event(client: LoradClient, job_id: str, wanted: Callable[[jobs_pb2.JobEvent], bool]) -> None:
    """Follow the job's events until one is ``wanted`` (the stream ends with the job: then it never came)."""
    for message in client.watch_job(job_id):
        if message.WhichOneof("item") == "event" and wanted(message.event):
            return
    raise AssertionError(f"job {job_id} ended before the event came")


def is_step(event: jobs_pb2.JobEvent) -> bool:
    return event.HasField("step")


def is_checkpoint_at_2(event: jobs_pb2.JobEvent) -> bool:
    # Recorded in the store before the event is published (and before the loop prunes older ones).
    return event.HasField("checkpoint_saved") and event.checkpoint_saved.path.endswith("step-000002")


def step_times(daemon: RunningDaemon, job_id: str) -> list[float]:
    return [e.time for e in daemon.service.store.events(job_id) if e.kind == "step"]


def worker_pid(client: LoradClient, job_id: str) -> int:
    (device,) = [d for d in client.status().devices if d.running_job_id == job_id]
    assert device.worker_pid > 0
    return device.worker_pid


def test_two_jobs_on_two_workers_train_at_the_same_time(
    two_workers: RunningDaemon, client2: LoradClient, tiny_sd: Path, dataset: Path, tmp_path: Path
) -> None:
    first = submit(client2, tiny_sd, dataset, tmp_path / "first", max_train_steps=100_000)
    second = submit(client2, tiny_sd, dataset, tmp_path / "second", max_train_steps=100_000)
    for job in (first, second):
        wait_for_event(client2, job.job_id, is_step)

    on = {d.running_job_id: d for d in client2.status().devices if d.running_job_id}
    assert set(on) == {first.job_id, second.job_id}
    assert {d.worker for d in on.values()} == {0, 1} and len({d.worker_pid for d in on.values()}) == 2
    for job in (first, second):
        client2.cancel_job(job.job_id)
        _, events = watch_all(client2, job.job_id)
        assert kinds(events)[-1] == "cancelled"
    a, b = step_times(two_workers, first.job_id), step_times(two_workers, second.job_id)
    assert b[0] < a[-1] and a[0] < b[-1]  # the second trained while the first did: it did not wait


def test_resident_first_and_what_status_and_models_show(
    two_workers: RunningDaemon, client2: LoradClient, tiny_sd: Path, dataset: Path, tmp_path: Path, capsys
) -> None:
    first = submit(client2, tiny_sd, dataset, tmp_path / "one", max_train_steps=2)
    _, events = watch_all(client2, first.job_id)
    assert not next(e.model_loaded for e in events if e.HasField("model_loaded")).resident
    # Both workers are free; the next job on the same model goes where it is resident, not to a new load.
    second = submit(client2, tiny_sd, dataset, tmp_path / "two", max_train_steps=2)
    _, events = watch_all(client2, second.job_id)
    assert next(e.model_loaded for e in events if e.HasField("model_loaded")).resident
    (model,) = client2.list_models()
    status = client2.status()
    workers = [d for d in status.devices if d.worker >= 0]
    holder = next(d for d in workers if d.worker == model.worker)
    assert holder.name == "cpu" and holder.worker_state == "idle" and holder.worker_pid > 0
    assert holder.resident_models == 1 and holder.resident_bytes == model.memory_bytes > 0
    assert holder.memory_total_bytes > holder.memory_used_bytes == holder.worker_rss_bytes > 0
    other = next(d for d in workers if d.worker != model.worker)
    assert other.resident_models == 0 and other.worker_state in ("idle", "not started")
    assert status.resident_models == 1 and not status.in_process

    print_status(client2)
    print_models(client2)
    out = capsys.readouterr().out
    assert f"worker {model.worker} (idle, pid {holder.worker_pid})" in out and "1 resident model (" in out
    assert "WORKER" in out and model.model_id in out


def test_a_sigkilled_worker_resumes_its_job_and_the_other_job_goes_on(
    two_workers: RunningDaemon, client2: LoradClient, tiny_sd: Path, dataset: Path, tmp_path: Path
) -> None:
    victim = submit(client2, tiny_sd, dataset, tmp_path / "victim", max_train_steps=40, save_steps=2)
    other = submit(client2, tiny_sd, dataset, tmp_path / "other", max_train_steps=40)
    wait_for_event(client2, victim.job_id, is_checkpoint_at_2)
    pid = worker_pid(client2, victim.job_id)
    recorded = client2.get_job(victim.job_id).checkpoint
    os.kill(pid, signal.SIGKILL)

    _, events = watch_all(client2, victim.job_id)
    seen = kinds(events)
    assert seen[-1] == "finished" and "interrupted" in seen
    interrupted = next(e.interrupted for e in events if e.HasField("interrupted"))
    assert "died (killed by SIGKILL)" in interrupted.reason and interrupted.checkpoint.startswith(recorded[:-6])
    attempts = [e.started for e in events if e.HasField("started")]
    assert [s.attempt for s in attempts] == [1, 2] and "checkpoints/step-" in attempts[1].resumed_from
    resumed = [e.training_started for e in events if e.HasField("training_started")][-1]
    assert resumed.start_step >= 2 and resumed.devices == 1  # from its checkpoint, on as many devices
    assert client2.get_job(victim.job_id).state == jobs_pb2.JOB_STATE_SUCCEEDED

    _, events = watch_all(client2, other.job_id)
    assert kinds(events)[-1] == "finished" and "interrupted" not in kinds(events)
    assert [e.started.attempt for e in events if e.HasField("started")] == [1]  # never touched

    status = client2.status()  # the daemon is up, and the dead worker was started again
    assert sum(d.worker_restarts for d in status.devices) == 1
    assert pid not in {d.worker_pid for d in status.devices}
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)


def test_a_sigkilled_rank_ends_its_job_s_other_rank_and_the_job_resumes_on_two_devices(
    two_workers: RunningDaemon, client2: LoradClient, tiny_sd: Path, dataset: Path, tmp_path: Path
) -> None:
    job = submit(client2, tiny_sd, dataset, tmp_path / "pair", max_train_steps=24, save_steps=2, devices=2)
    wait_for_event(client2, job.job_id, is_checkpoint_at_2)
    ranks = {d.worker: d.worker_pid for d in client2.status().devices if d.running_job_id == job.job_id}
    assert len(ranks) == 2
    os.kill(ranks[1], signal.SIGKILL)  # rank 1 (worker 1); rank 0 waits for it in the next all-reduce

    _, events = watch_all(client2, job.job_id)
    seen = kinds(events)
    assert seen[-1] == "finished" and seen.count("interrupted") == 1
    resumed = [e.training_started for e in events if e.HasField("training_started")][-1]
    assert resumed.start_step >= 2 and resumed.devices == 2
    # No rank process is left behind: both workers of the job are new processes; the old ones are gone.
    new_pids = {d.worker_pid for d in client2.status().devices}
    for pid in ranks.values():
        assert pid not in new_pids
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
