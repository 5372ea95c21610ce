"""Checkpoints belong to a run: a second run never prunes or resumes the first one's, pruning waits
for the record of the new checkpoint, a damaged checkpoint is named and passed over, and what a
killed writer left behind is cleaned up (tiny SD model on the CPU)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from lorad.config import parse_config
from lorad.errors import ConfigError, TrainingInterrupted
from lorad.events import CheckpointSaved, Event, LogLine, StepDone, TrainingStarted
from lorad.training.checkpoints import load_checkpoint
from lorad.training.loop import train as train_sd_lora
from tests.support.datasets import tiny_train_values


def config_for(tmp_path: Path, tiny_sd: Path, dataset: Path, out: str = "out", **overrides: object):
    return parse_config(tiny_train_values(tiny_sd, dataset, tmp_path / out, **overrides), base_dir=tmp_path)


def stop_at(step: int) -> tuple[threading.Event, list[Event], object]:
    """A stop event set once ``step`` is done, the events seen, and the sink that does both."""
    stop, seen = threading.Event(), []

    def sink(event: Event) -> None:
        seen.append(event)
        if isinstance(event, StepDone) and event.step == step:
            stop.set()

    return stop, seen, sink


def step_names(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.is_dir() and p.name.startswith("step-"))


def read_run_id(checkpoint: Path) -> str | None:
    return json.loads((checkpoint / "meta.json").read_text()).get("run_id")


def dead_pid() -> int:
    """The pid of a process that has exited (so no writer owns a temp file named with it)."""
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


@pytest.mark.slow
def test_a_second_run_into_the_same_output_dir_neither_prunes_nor_resumes_the_first(
    tmp_path: Path, tiny_sd: Path, dataset: Path
) -> None:
    common = {"epochs": 3, "save_steps": 2}  # 12 steps; checkpoints at 2..10, the newest 3 kept
    train_sd_lora(config_for(tmp_path, tiny_sd, dataset, **common))
    out = tmp_path / "out"
    first_run = read_run_id(out / "checkpoints" / "step-000010")

    stop, seen, sink = stop_at(3)
    with pytest.raises(TrainingInterrupted) as err:
        train_sd_lora(config_for(tmp_path, tiny_sd, dataset, **common), on_event=sink, stop=stop)
    # The checkpoint a cancel names exists (the first run's higher steps used to win the pruning).
    cancelled_at = Path(err.value.checkpoint or "")
    assert cancelled_at.is_dir() and cancelled_at.name == "step-000003"
    assert step_names(out / "checkpoints") == ["step-000002", "step-000003"]
    assert read_run_id(cancelled_at) not in ("", None, first_run)
    # The first run's checkpoints are all kept, moved aside whole, and the run said where.
    moved = sorted((out / "checkpoints" / "earlier-runs").glob("*/step-*"))
    assert [p.name for p in moved] == ["step-000006", "step-000008", "step-000010"]
    assert {read_run_id(p) for p in moved} == {first_run}
    notes = [e.message for e in seen if isinstance(e, LogLine) and e.level == "warning"]
    assert any("moved to" in n and "resume_from:" in n and "step-000010" in n for n in notes)

    # `resume_from: latest` continues the second run, not the first.
    started: list[TrainingStarted] = []
    train_sd_lora(
        config_for(tmp_path, tiny_sd, dataset, resume_from="latest", **common),
        on_event=lambda e: started.append(e) if isinstance(e, TrainingStarted) else None,
    )
    assert started[0].start_step == 3 and started[0].resumed_from == str(cancelled_at)
    # The first run stays resumable from where it was moved.
    assert load_checkpoint(moved[-1]).step == 10


@pytest.mark.slow
def test_the_previous_checkpoint_outlives_the_record_of_the_next(tmp_path: Path, tiny_sd: Path, dataset: Path) -> None:
    """keep_checkpoints: 1 — while the sink (the daemon's job store) records step 2, step 1 must still
    be on disk: a crash before that record is committed resumes from step 1, not from step 0."""
    out = tmp_path / "out"
    on_disk_when_recorded: dict[int, list[str]] = {}

    def sink(event: Event) -> None:
        if isinstance(event, CheckpointSaved):
            on_disk_when_recorded[event.step] = step_names(out / "checkpoints")

    train_sd_lora(
        config_for(tmp_path, tiny_sd, dataset, keep_checkpoints=1, save_steps=1, max_train_steps=3), on_event=sink
    )
    assert on_disk_when_recorded[2] == ["step-000001", "step-000002"]
    assert on_disk_when_recorded[3] == ["step-000002", "step-000003"]  # the export guard of the last step
    assert step_names(out / "checkpoints") == ["step-000002"]  # pruned after, and the guard removed with the export


def _damage(kind: str, checkpoint: Path) -> None:
    if kind == "truncated lora":
        data = (checkpoint / "lora.safetensors").read_bytes()
        (checkpoint / "lora.safetensors").write_bytes(data[: len(data) // 2])
    elif kind == "garbage state":
        (checkpoint / "state.pt").write_bytes(b"\x80\x04not a torch file" * 50)
    elif kind == "flipped byte":
        data = bytearray((checkpoint / "state.pt").read_bytes())
        data[len(data) // 2] ^= 0xFF
        (checkpoint / "state.pt").write_bytes(bytes(data))
    elif kind == "broken meta":
        (checkpoint / "meta.json").write_text('{"step": 5, "epo')
    elif kind == "missing state":
        (checkpoint / "state.pt").unlink()


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["truncated lora", "garbage state", "flipped byte", "broken meta", "missing state"])
def test_a_damaged_newest_checkpoint_is_named_and_latest_falls_back(
    tmp_path: Path, tiny_sd: Path, dataset: Path, kind: str
) -> None:
    common = {"epochs": 3, "save_steps": 2}
    stop, _, sink = stop_at(5)
    with pytest.raises(TrainingInterrupted):
        train_sd_lora(config_for(tmp_path, tiny_sd, dataset, **common), on_event=sink, stop=stop)
    checkpoints = tmp_path / "out" / "checkpoints"
    _damage(kind, checkpoints / "step-000005")

    seen: list[Event] = []
    train_sd_lora(config_for(tmp_path, tiny_sd, dataset, resume_from="latest", **common), on_event=seen.append)
    started = next(e for e in seen if isinstance(e, TrainingStarted))
    assert started.start_step == 4 and started.resumed_from.endswith("step-000004")
    warning = next(e.message for e in seen if isinstance(e, LogLine) and "damaged" in e.message)
    assert "step-000005" in warning and "resuming from step-000004" in warning
    assert "weights_only" not in warning


@pytest.mark.slow
def test_every_checkpoint_damaged_is_a_config_error_naming_each(tmp_path: Path, tiny_sd: Path, dataset: Path) -> None:
    stop, _, sink = stop_at(3)
    with pytest.raises(TrainingInterrupted):
        train_sd_lora(config_for(tmp_path, tiny_sd, dataset, epochs=2, save_steps=2), on_event=sink, stop=stop)
    checkpoints = tmp_path / "out" / "checkpoints"
    _damage("garbage state", checkpoints / "step-000003")
    _damage("truncated lora", checkpoints / "step-000002")
    with pytest.raises(ConfigError) as err:
        train_sd_lora(config_for(tmp_path, tiny_sd, dataset, epochs=2, save_steps=2, resume_from="latest"))
    text = str(err.value)
    assert "step-000003 is damaged: state.pt" in text and "step-000002 is damaged: lora.safetensors" in text
    assert "remove resume_from" in text and "weights_only" not in text and "Unpickling" not in text


@pytest.mark.slow
def test_an_explicit_damaged_checkpoint_falls_back_within_its_own_run(
    tmp_path: Path, tiny_sd: Path, dataset: Path
) -> None:
    """The daemon resumes an interrupted job from the exact folder it recorded; when that one is
    damaged, the newest complete checkpoint of the same run is next, never another run's."""
    stop, _, sink = stop_at(5)
    with pytest.raises(TrainingInterrupted) as err:
        train_sd_lora(config_for(tmp_path, tiny_sd, dataset, epochs=3, save_steps=2), on_event=sink, stop=stop)
    recorded = Path(err.value.checkpoint or "")
    _damage("flipped byte", recorded)
    seen: list[Event] = []
    train_sd_lora(
        config_for(tmp_path, tiny_sd, dataset, epochs=3, save_steps=2, resume_from=str(recorded)),
        on_event=seen.append,
    )
    assert next(e for e in seen if isinstance(e, TrainingStarted)).start_step == 4


@pytest.mark.slow
def test_temp_files_a_killed_run_left_are_removed_on_the_next_run(tmp_path: Path, tiny_sd: Path, dataset: Path) -> None:
    out = tmp_path / "out"
    checkpoints = out / "checkpoints"
    checkpoints.mkdir(parents=True)
    pid = dead_pid()
    leftovers = [
        checkpoints / f".step-000004.{pid}.k1ll3d_x.tmp",  # atomic_directory's folder, killed mid-save
        checkpoints / ".step-000002.abcd1234.tmp",  # the naming before pids were in it
        checkpoints / ".step-000002.old",  # the replaced copy of a re-saved checkpoint
        out / f".out.safetensors.{pid}.zz9yy8xx.tmp",  # a kohya file killed mid-write
        out / f".diffusers-lora.{pid}.qq1ww2ee.tmp",
    ]
    for path in leftovers[:3] + leftovers[4:]:
        path.mkdir()
        (path / "lora.safetensors").write_bytes(b"x" * 1000)
    leftovers[3].write_bytes(b"partial")
    mine = out / ".keep.me.tmp"  # a hidden file that is not ours (no random part) stays
    mine.write_text("the user's")
    train_sd_lora(config_for(tmp_path, tiny_sd, dataset, max_train_steps=1))
    assert [p for p in leftovers if p.exists()] == []
    assert mine.read_text() == "the user's"


def test_stale_metadata_temp_files_are_removed_by_the_next_scan(tmp_path: Path, dataset: Path) -> None:
    from lorad.data.dataset import scan_dataset

    pid = dead_pid()
    dead_writer = dataset / f".metadata.csv.{pid}.r4nd0m_1.tmp"
    ancient = dataset / ".metadata.csv.abcdefgh.tmp"  # no pid in the name: removed once it is old
    fresh = dataset / ".metadata.csv.ijklmnop.tmp"  # ...and kept while a writer could still own it
    live = dataset / f".metadata.csv.{os.getpid()}.qwertyui.tmp"  # this process may be writing it
    for path in (dead_writer, ancient, fresh, live):
        path.write_text("file,caption\nimg_00.png,half a capt")
    os.utime(ancient, (1_000_000_000, 1_000_000_000))
    scan_dataset(dataset, metadata_path=dataset / "metadata.csv")
    assert not dead_writer.exists() and not ancient.exists()
    assert fresh.exists() and live.exists()


def test_two_runs_cannot_train_into_one_output_dir_at_once(tmp_path: Path) -> None:
    from lorad.training.checkpoints import OutputFolderBusy, open_run

    out = tmp_path / "out"
    first = open_run(out, None)
    try:
        with pytest.raises(OutputFolderBusy) as err:
            open_run(out, None)
        assert f"pid {os.getpid()}" in str(err.value) and "another output_dir" in err.value.hint
    finally:
        first.close()
    open_run(out, None).close()  # free again once the first run ends


@pytest.mark.slow
def test_checkpoint_meta_records_run_and_checksums(tmp_path: Path, tiny_sd: Path, dataset: Path) -> None:
    stop, _, sink = stop_at(2)
    with pytest.raises(TrainingInterrupted) as err:
        train_sd_lora(config_for(tmp_path, tiny_sd, dataset, epochs=2), on_event=sink, stop=stop)
    meta = json.loads((Path(err.value.checkpoint or "") / "meta.json").read_text())
    assert meta["run_id"] and meta["step"] == 2
    assert set(meta["files"]) == {"lora.safetensors", "state.pt"}
    assert all(len(entry["sha256"]) == 64 for entry in meta["files"].values())
