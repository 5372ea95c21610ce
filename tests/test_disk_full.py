"""A full disk: a clear error naming the disk and the room needed, the previous checkpoint kept,
partial files removed, and the run resumable once there is room again.

Real full disks come from a small tmpfs (mounting needs root, as in CI; skipped with the reason
elsewhere); the same code paths are also driven by an injected ENOSPC, so they are checked everywhere.
"""

from __future__ import annotations

import errno
import os
import sqlite3
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from safetensors.torch import load_file

from lorad.config import parse_config
from lorad.errors import OutputError
from lorad.events import CheckpointSaved, Event, StepDone
from lorad.training.checkpoints import load_checkpoint
from lorad.training.loop import train as train_sd_lora
from tests.support.daemons import in_process_dispatcher
from tests.support.datasets import tiny_train_values

COMMON = {"save_steps": 1, "max_train_steps": 4, "keep_checkpoints": 1, "save_precision": "fp32"}


def config_for(tmp_path: Path, tiny_sd: Path, dataset: Path, out: Path, **overrides: object):
    return parse_config(tiny_train_values(tiny_sd, dataset, out, **overrides), base_dir=tmp_path)


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 4 MiB tmpfs: room for a tiny run, and quickly filled."""
    disk = tmp_path / "small-disk"
    disk.mkdir()
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root (CI runs as root); the injected-ENOSPC tests cover the path")
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(disk)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.decode().strip()}")
    try:
        yield disk
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=False)


def fill(disk: Path) -> Path:
    """Write a ballast file until the disk is full; return it (delete it to make room again)."""
    ballast = disk / "ballast"
    fd = os.open(ballast, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        chunk = b"\0" * 65536
        while True:
            try:
                os.write(fd, chunk)
            except OSError as err:
                assert err.errno == errno.ENOSPC
                if len(chunk) == 1:
                    return ballast
                chunk = chunk[: len(chunk) // 2]
    finally:
        os.close(fd)


def hidden(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith(".") and p.name != ".lorad-run.lock")


def step_names(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("step-"))


def same_lora(a: str, b: str) -> bool:
    ta, tb = load_file(a), load_file(b)
    return ta.keys() == tb.keys() and all(ta[k].equal(tb[k]) for k in ta)


@pytest.mark.slow
def test_a_full_disk_at_a_checkpoint_names_the_disk_and_keeps_the_previous_one(
    tmp_path: Path, tiny_sd: Path, dataset: Path, small_disk: Path
) -> None:
    reference = train_sd_lora(config_for(tmp_path, tiny_sd, dataset, tmp_path / "ref", **COMMON))
    out = small_disk / "out"
    ballast: list[Path] = []

    def fill_after_step_3(event: Event) -> None:
        if isinstance(event, StepDone) and event.step == 3:
            ballast.append(fill(small_disk))

    with pytest.raises(OutputError) as err:
        train_sd_lora(config_for(tmp_path, tiny_sd, dataset, out, **COMMON), on_event=fill_after_step_3)
    text = str(err.value)
    assert f"the disk at {small_disk} is full" in text and "checkpoint step-000003 needs about" in text
    assert "bug" not in text + err.value.hint and "step-000002 is kept" in err.value.hint
    assert step_names(out / "checkpoints") == ["step-000002"] and hidden(out / "checkpoints") == []
    assert load_checkpoint(out / "checkpoints" / "step-000002").step == 2

    ballast[0].unlink()
    resumed = train_sd_lora(config_for(tmp_path, tiny_sd, dataset, out, resume_from="latest", **COMMON))
    assert resumed.steps == 4 and same_lora(resumed.outputs["kohya"], reference.outputs["kohya"])


@pytest.mark.slow
def test_a_full_disk_at_export_keeps_the_training_and_resume_only_writes_the_outputs(
    tmp_path: Path, tiny_sd: Path, dataset: Path, small_disk: Path
) -> None:
    settings = {**COMMON, "save_steps": None}  # no checkpoints asked for: the export guard is the only one
    reference = train_sd_lora(config_for(tmp_path, tiny_sd, dataset, tmp_path / "ref", **settings))
    out = small_disk / "out"
    ballast: list[Path] = []

    def fill_at_the_guard(event: Event) -> None:
        if isinstance(event, CheckpointSaved) and event.step == 4:
            ballast.append(fill(small_disk))

    with pytest.raises(OutputError) as err:
        train_sd_lora(config_for(tmp_path, tiny_sd, dataset, out, **settings), on_event=fill_at_the_guard)
    assert f"the disk at {small_disk} is full" in str(err.value) and "LoRA files" in str(err.value)
    assert "resume_from: latest" in err.value.hint
    assert step_names(out / "checkpoints") == ["step-000004"] and not list(out.glob("*.safetensors"))
    assert hidden(out) == []

    ballast[0].unlink()
    steps: list[StepDone] = []
    resumed = train_sd_lora(
        config_for(tmp_path, tiny_sd, dataset, out, resume_from="latest", **settings),
        on_event=lambda e: steps.append(e) if isinstance(e, StepDone) else None,
    )
    assert steps == [] and same_lora(resumed.outputs["kohya"], reference.outputs["kohya"])
    assert step_names(out / "checkpoints") == []  # the guard goes once the outputs are written


@pytest.mark.slow
def test_an_injected_enospc_mid_checkpoint_removes_the_partial_folder(
    tmp_path: Path, tiny_sd: Path, dataset: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The same path as a real full disk in the middle of a write (CI without mount rights checks it too)."""
    from lorad.training import checkpoints as checkpoint

    real_write = checkpoint._write_file
    calls = {"n": 0}

    def write_then_fill(path: Path, data: bytes) -> None:
        calls["n"] += 1
        if calls["n"] > 3:  # the second checkpoint: half of its first file, then the disk is full
            path.write_bytes(data[: len(data) // 2])
            raise OSError(errno.ENOSPC, "No space left on device")
        real_write(path, data)

    monkeypatch.setattr(checkpoint, "_write_file", write_then_fill)
    out = tmp_path / "out"
    with pytest.raises(OutputError) as err:
        train_sd_lora(config_for(tmp_path, tiny_sd, dataset, out, **COMMON))
    assert "is full: writing checkpoint step-000002 needs about" in str(err.value)
    assert "step-000001 is kept" in err.value.hint
    assert step_names(out / "checkpoints") == ["step-000001"] and hidden(out / "checkpoints") == []
    load_checkpoint(out / "checkpoints" / "step-000001")


@pytest.mark.slow
def test_an_injected_storage_full_at_export_is_a_clear_error(
    tmp_path: Path, tiny_sd: Path, dataset: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """safetensors says "StorageFull"; the user sees the full disk, not a SafetensorError or a "bug"."""
    from lorad.lora import kohya_format

    def full_disk(tensors: object, filename: str, metadata: object = None) -> None:
        Path(filename).write_bytes(b"half a file")
        raise RuntimeError(
            'Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: "No space left on device" })'
        )

    monkeypatch.setattr(kohya_format, "save_file", full_disk)
    out = tmp_path / "out"
    with pytest.raises(OutputError) as err:
        train_sd_lora(config_for(tmp_path, tiny_sd, dataset, out, **COMMON))
    assert "is full: writing the LoRA files of `out`" in str(err.value)
    assert hidden(out) == [] and not list(out.glob("*.safetensors"))
    # The guard of the last step is kept (beside the newest regular one: the guard never prunes).
    assert step_names(out / "checkpoints") == ["step-000003", "step-000004"]


def test_a_store_that_cannot_be_written_fails_the_job_with_the_reason(
    tmp_path: Path, tiny_sd: Path, dataset: Path
) -> None:
    """A full disk under LORAD_HOME: the job must not stay RUNNING with no worker. It fails with the
    reason (shown at once by the worker, recorded as soon as the store takes writes again), and the
    worker goes on with the next job."""
    from lorad.jobs.records import JobState
    from lorad.jobs.store import JobStore

    class FillingStore(JobStore):
        full = False

        def update(self, job_id: str, /, **changes: object):  # type: ignore[override]
            if self.full:
                raise sqlite3.OperationalError("database or disk is full")
            return super().update(job_id, **changes)

        def append_event(self, *args: object, **kwargs: object):  # type: ignore[override]
            if self.full:
                raise sqlite3.OperationalError("database or disk is full")
            return super().append_event(*args, **kwargs)  # type: ignore[arg-type]

    store = FillingStore(tmp_path / "home" / "jobs.sqlite3")
    runs: list[str] = []

    def train(config, *, on_event, stop, models, **hooks):
        runs.append(str(config.output_dir))
        if len(runs) == 1:
            store.full = True  # the disk fills while the first job trains
            on_event(CheckpointSaved(step=1, path=str(config.output_dir / "checkpoints" / "step-000001")))
        from lorad.events import TrainingFinished

        on_event(TrainingFinished(outputs={"kohya": "x"}, steps=1))

    dispatcher = in_process_dispatcher(store, tmp_path / "home", train)
    text = yaml.safe_dump({k: str(v) for k, v in tiny_train_values(tiny_sd, dataset, tmp_path / "o").items()})
    jobs = [
        store.create_job(
            name="o",
            config_yaml=text,
            base_dir=str(tmp_path),
            source_name="t",
            base_model=str(tiny_sd),
            output_dir=str(tmp_path / "o"),
        )
        for _ in range(2)
    ]
    dispatcher.start()
    dispatcher.wake()
    try:
        ended = threading.Event()

        def first_job_ended() -> bool:
            return dispatcher.pending_outcome(jobs[0].job_id) is not None

        for _ in range(200):
            if first_job_ended():
                ended.set()
                break
            threading.Event().wait(0.05)
        assert ended.is_set()
        pending = dispatcher.pending_outcome(jobs[0].job_id) or {}
        assert pending["state"] == JobState.FAILED
        assert "job store" in pending["error"] and "is full" in pending["error"] and "bug" not in pending["hint"]
        assert len(runs) == 1  # no next job while the store refuses writes

        store.full = False  # room again
        for _ in range(200):
            if store.get(jobs[1].job_id).state == JobState.SUCCEEDED:
                break
            threading.Event().wait(0.05)
        first = store.get(jobs[0].job_id)
        assert first.state == JobState.FAILED and "is full" in first.error
        assert [e.kind for e in store.events(jobs[0].job_id)][-1] == "failed"
        assert store.get(jobs[1].job_id).state == JobState.SUCCEEDED and len(runs) == 2
    finally:
        dispatcher.shutdown(timeout=10)
        store.close()
