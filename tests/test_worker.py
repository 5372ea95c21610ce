"""The dispatcher and its workers outlive every job: failures end as FAILED with a hint, and the next job runs."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
import torch
import yaml

from lorad.errors import DataError
from lorad.events import TrainingFinished
from lorad.jobs.records import JobState
from lorad.jobs.store import JobStore
from tests.support.daemons import in_process_dispatcher
from tests.support.datasets import tiny_train_values


def scripted_train(outcomes: list[BaseException | None]):
    """A train function that fails or succeeds in the given order, like the engine would."""

    def train(config, *, on_event, stop, models, **hooks):
        outcome = outcomes.pop(0)
        if outcome is not None:
            raise outcome
        on_event(TrainingFinished(outputs={"kohya": str(config.output_dir / "x.safetensors")}, steps=3))

    return train


def run_jobs(tmp_path: Path, dataset: Path, tiny_sd: Path, outcomes: list[BaseException | None], **overrides):
    store = JobStore(tmp_path / "jobs.sqlite3")
    dispatcher = in_process_dispatcher(store, tmp_path / "home", scripted_train(outcomes))
    hub = dispatcher.hub
    values = tiny_train_values(tiny_sd, dataset, tmp_path / "out", **overrides)
    text = yaml.safe_dump({k: str(v) if isinstance(v, Path) else v for k, v in values.items()})
    jobs = [
        store.create_job(
            name="out",
            config_yaml=text,
            base_dir=str(tmp_path),
            source_name="t.yaml",
            base_model=str(tiny_sd),
            output_dir=str(tmp_path / "out"),
        )
        for _ in outcomes
    ]
    done = threading.Event()
    last = jobs[-1].job_id

    def wait_last() -> None:
        for record in hub.follow(last):
            if record.kind in ("finished", "failed", "cancelled"):
                done.set()

    threading.Thread(target=wait_last, daemon=True).start()
    dispatcher.start()
    dispatcher.wake()
    assert done.wait(timeout=60)
    dispatcher.shutdown(timeout=10)
    return store, jobs


def test_failures_are_reported_and_the_next_job_runs(tmp_path: Path, dataset: Path, tiny_sd: Path) -> None:
    outcomes: list[BaseException | None] = [
        torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"),
        DataError("`train_data_dir`: no usable image", "add images"),
        ZeroDivisionError("boom"),
        None,
    ]
    store, jobs = run_jobs(tmp_path, dataset, tiny_sd, outcomes, batch_size=4, lora_rank=32, resolution=768)
    oom, data, crash, ok = (store.get(j.job_id) for j in jobs)
    assert oom.state == JobState.FAILED and oom.error.startswith("out of memory")
    assert "batch_size: 2 (now 4)" in oom.hint and "gradient_checkpointing: true" in oom.hint
    assert "resolution: 512 (now 768)" in oom.hint and "lora_rank: 16 (now 32)" in oom.hint
    assert data.state == JobState.FAILED and data.hint == "add images"
    assert crash.state == JobState.FAILED and "ZeroDivisionError" in crash.error and "bug" in crash.hint
    assert ok.state == JobState.SUCCEEDED and ok.outputs["kohya"].endswith("x.safetensors")
    kinds = [e.kind for e in store.events(oom.job_id)]
    assert kinds == ["started", "failed"]


def test_state_is_stored_before_the_final_event(tmp_path: Path, dataset: Path, tiny_sd: Path) -> None:
    store, (job,) = run_jobs(tmp_path, dataset, tiny_sd, [None])
    final = store.events(job.job_id)[-1]
    assert final.kind == "finished" and store.get(job.job_id).state == JobState.SUCCEEDED


@pytest.mark.parametrize("resume", [True, False])
def test_restart_requeues_or_fails_interrupted_jobs(tmp_path: Path, resume: bool) -> None:
    from lorad.server.service import LoradService
    from lorad.server.settings import daemon_settings

    home = tmp_path / "home"
    store = JobStore(home / "jobs.sqlite3")
    job = store.create_job(
        name="n",
        config_yaml="{}",
        base_dir=str(tmp_path),
        source_name="",
        base_model="m",
        output_dir=str(tmp_path / "o"),
    )
    store.transition(job.job_id, expect={JobState.QUEUED}, to=JobState.RUNNING, attempt=1)
    store.update(job.job_id, checkpoint=str(tmp_path / "o" / "checkpoints" / "step-000010"))
    store.close()

    service = LoradService(daemon_settings(["127.0.0.1:0"], home=home, resume_interrupted=resume))
    service._recover_interrupted()  # what start() does first, without starting the worker
    recovered = service.store.get(job.job_id)
    last = service.store.events(job.job_id)[-1]
    if resume:
        assert recovered.state == JobState.QUEUED and last.kind == "interrupted" and last.payload["will_resume"]
    else:
        assert recovered.state == JobState.FAILED and "resume_from:" in recovered.hint and last.kind == "failed"
    service.store.close()
