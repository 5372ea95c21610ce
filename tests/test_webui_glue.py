"""The WebUI extension's glue, without a browser: form → config_fields, WatchJob → progress text,
captions read and written where the folder keeps them, the LoRA placed atomically, and the whole
train action against a real daemon with the tiny model."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from lorad.data.captions import read_metadata_csv
from lorad.server.daemon import RunningDaemon
from lorad_client import LoradClient
from lorad_webui import actions, captions
from lorad_webui.api.v1 import jobs_pb2, training_pb2
from lorad_webui.connection import Daemon, DaemonError
from lorad_webui.form import FormError, TrainForm, config_fields
from lorad_webui.placement import place_lora
from lorad_webui.progress import JobProgress
from lorad_webui.standalone import StandaloneHost
from lorad_webui.vendored import paths
from lorad_webui.vendored.format import lora_snippet
from tests.support.datasets import make_dataset
from tests.support.lora_samples import write_kohya_sample


def test_the_form_becomes_the_config_fields_the_daemon_takes(dataset: Path, tmp_path: Path) -> None:
    form = TrainForm(
        name="my_style",
        data_dir=str(dataset),
        base_model="/models/v1-5.safetensors",
        trigger_word=" ohwx ",
        rank=16,
        length_unit="steps",
        length=300,
        extra="lr_scheduler: cosine\nbatch_size: 2\n",
    )
    fields = config_fields(form, tmp_path / "runs" / "my_style")
    assert fields == {
        "train_data_dir": str(dataset),
        "metadata_path": str(dataset / "metadata.csv"),
        "base_model": "/models/v1-5.safetensors",
        "lora_rank": 16,
        "learning_rate": 1e-4,
        "output_dir": str(tmp_path / "runs" / "my_style"),
        "output_name": "my_style",
        "trigger_word": "ohwx",
        "max_train_steps": 300,
        "lr_scheduler": "cosine",
        "batch_size": 2,
    }
    by_epochs = config_fields(
        TrainForm(name="x", data_dir=str(dataset), base_model="m", length_unit="epochs", length=10), tmp_path
    )
    assert by_epochs["epochs"] == 10 and "max_train_steps" not in by_epochs and "trigger_word" not in by_epochs
    # An explicit resolution is sent; none leaves it to the model family (SD 512, SDXL 1024).
    sized = config_fields(TrainForm(name="x", data_dir=str(dataset), base_model="m", resolution=768), tmp_path)
    assert sized["resolution"] == 768 and "resolution" not in by_epochs


def test_every_form_problem_is_reported_at_once(tmp_path: Path) -> None:
    form = TrainForm(
        name="my lora:2",
        data_dir=str(tmp_path / "nowhere"),
        base_model=" ",
        rank=0,
        length=2.5,
        learning_rate=0,
        extra="- a list",
    )
    with pytest.raises(FormError) as err:
        config_fields(form, tmp_path)
    problems = err.value.problems
    assert [p.split(":")[0] for p in problems] == [
        "`name`",
        "`images`",
        "`base model`",
        "`rank`",
        "`steps`",
        "`learning rate`",
        "`extra settings`",
    ]
    assert "'my lora:2'" in problems[0] and "nowhere" in problems[1] and "got 0" in problems[3]


def _job_message(state: int, **job: object) -> training_pb2.WatchJobResponse:
    return training_pb2.WatchJobResponse(job=jobs_pb2.Job(job_id="0123456789ab", name="my_style", state=state, **job))


def _event_message(**kind: object) -> training_pb2.WatchJobResponse:
    return training_pb2.WatchJobResponse(event=jobs_pb2.JobEvent(job_id="0123456789ab", **kind))


def test_watch_messages_become_progress_text() -> None:
    tracker = JobProgress()
    assert tracker.text() == "waiting for the daemon…"
    tracker.apply(_job_message(jobs_pb2.JOB_STATE_QUEUED, queue_position=2))
    assert tracker.text() == "job 01234567 (my_style): queued, position 2 in the queue"
    tracker.apply(_job_message(jobs_pb2.JOB_STATE_RUNNING))
    tracker.apply(_event_message(training_started=jobs_pb2.TrainingStarted(total_steps=10, epochs=1, device="cpu")))
    progress = jobs_pb2.Progress(step=3, total_steps=10, epoch=1, loss=0.5, steps_per_second=2.0, eta_seconds=3.5)
    tracker.apply(_event_message(step=jobs_pb2.Step(progress=progress)))
    lines = tracker.text().splitlines()
    assert lines[0] == "job 01234567 (my_style): running"
    assert lines[1] == "step 3/10 (30%) · epoch 1 · loss 0.5000 · 2.00 steps/s · ETA 4s"
    assert any("10 steps" in line for line in lines[2:]), lines
    assert not tracker.done

    tracker.apply(
        _event_message(
            finished=jobs_pb2.JobFinished(
                outputs={"kohya": "/out/my_style.safetensors"}, steps=10, final_loss=0.25, seconds=5
            )
        )
    )
    assert tracker.done and tracker.outputs == {"kohya": "/out/my_style.safetensors"}
    assert tracker.text().startswith("job 01234567 (my_style): succeeded")


def test_a_failed_job_shows_its_error_and_hint() -> None:
    tracker = JobProgress()
    tracker.apply(_job_message(jobs_pb2.JOB_STATE_FAILED, error="out of memory", hint="lower batch_size"))
    assert tracker.done
    assert "error: out of memory\nhint: lower batch_size" in tracker.text()


def test_the_lora_is_placed_atomically_and_replaces_an_older_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    source = tmp_path / "run" / "my_style.safetensors"
    source.parent.mkdir()
    source.write_bytes(b"new weights")
    lora_dir = tmp_path / "models" / "Lora"
    lora_dir.mkdir(parents=True)
    (lora_dir / "my_style.safetensors").write_bytes(b"old weights")

    def fail_rename(src: object, dst: object) -> None:
        raise OSError("disk full")

    with monkeypatch.context() as patch:
        patch.setattr(os, "replace", fail_rename)
        with pytest.raises(OSError, match="disk full"):
            place_lora(source, lora_dir, "my_style")
    # A failed copy leaves the old LoRA and no partial file the WebUI could list.
    assert sorted(p.name for p in lora_dir.iterdir()) == ["my_style.safetensors"]
    assert (lora_dir / "my_style.safetensors").read_bytes() == b"old weights"

    placed = place_lora(source, lora_dir, "my_style")
    assert placed == lora_dir / "my_style.safetensors" and placed.read_bytes() == b"new weights"
    assert sorted(p.name for p in lora_dir.iterdir()) == ["my_style.safetensors"]
    assert stat.S_IMODE(placed.stat().st_mode) == 0o644
    with pytest.raises(FileNotFoundError, match=r"gone\.safetensors"):
        place_lora(tmp_path / "gone.safetensors", lora_dir, "x")
    assert lora_snippet("my_style") == "<lora:my_style:0.8>" and lora_snippet("a", 1.0) == "<lora:a:1>"


def test_caption_edits_go_back_into_metadata_csv_keeping_other_columns(tmp_path: Path) -> None:
    folder = make_dataset(tmp_path / "data", count=3)
    (folder / "metadata.csv").write_text("file,caption,source\nimg_00.png,a red circle,web\nimg_01.png,old,cam\n")
    assert captions.read_captions(folder) == {"img_00.png": "a red circle", "img_01.png": "old", "img_02.png": ""}
    changed = captions.write_captions(
        folder,
        {
            "img_00.png": "a red circle",
            "img_01.png": "a green, square",
            "img_02.png": "a blue circle",
            "missing.png": "ignored",
        },
    )
    assert changed == 2
    assert (folder / "metadata.csv").read_text() == (
        'file,caption,source\nimg_00.png,a red circle,web\nimg_01.png,"a green, square",cam\n'
        "img_02.png,a blue circle,\n"
    )
    # What training reads is what the editor wrote.
    assert dict(read_metadata_csv(folder / "metadata.csv").captions) == {
        "img_00.png": "a red circle",
        "img_01.png": "a green, square",
        "img_02.png": "a blue circle",
    }


def test_caption_edits_go_into_sidecar_files_without_metadata_csv(tmp_path: Path) -> None:
    folder = make_dataset(tmp_path / "data", count=2, csv=False)
    (folder / "img_01.txt").unlink()
    rows, message = actions.caption_table(str(folder))
    assert rows == [["img_00.png", "mystyle, a red circle, simple background"], ["img_01.png", ""]]
    assert message == "2 images, 1 without a caption; captions in .txt files beside the images."
    assert actions.save_caption_edits(str(folder), [["img_01.png", "a green square"]]) == "Saved 1 changed caption."
    assert (folder / "img_01.txt").read_text() == "a green square\n"
    assert not [p for p in folder.iterdir() if p.name.startswith(".")]


def test_uploads_are_copied_into_a_new_folder(tmp_path: Path) -> None:
    source = make_dataset(tmp_path / "picked", count=2, csv=False)
    folder = actions.save_uploads(
        [source / "img_00.png", str(source / "img_01.png"), source / "img_00.txt"], tmp_path / "work"
    )
    assert folder.parent == tmp_path / "work" / "uploads"
    assert sorted(p.name for p in folder.iterdir()) == ["img_00.png", "img_01.png"]


def test_the_standalone_page_lists_checkpoints_and_diffusers_folders(tmp_path: Path) -> None:
    models = tmp_path / "models"
    (models / "tiny-sd1").mkdir(parents=True)
    (models / "tiny-sd1" / "model_index.json").write_text("{}")
    (models / "v1-5.safetensors").write_bytes(b"")
    (models / "notes.txt").write_text("not a model")
    (models / "empty-folder").mkdir()
    host = StandaloneHost(tmp_path / "Lora", tmp_path / "work", models_dir=models)
    assert host.checkpoints() == {
        "tiny-sd1": str(models / "tiny-sd1"),
        "v1-5.safetensors": str(models / "v1-5.safetensors"),
    }
    assert actions.base_model_path(host, "tiny-sd1", "") == str(models / "tiny-sd1")
    assert actions.base_model_path(host, "tiny-sd1", " /typed/model.ckpt ") == "/typed/model.ckpt"


def test_the_vendored_home_and_port_match_the_daemons(monkeypatch: pytest.MonkeyPatch) -> None:
    from lorad import paths as daemon_paths

    assert paths.DEFAULT_PORT == daemon_paths.DEFAULT_PORT
    monkeypatch.delenv("LORAD_HOME")
    assert paths.lorad_home() == daemon_paths.lorad_home()
    assert paths._user_data_dir() / "lorad" == daemon_paths.lorad_home()  # the fallback without platformdirs


def test_a_daemon_that_is_not_running_gets_a_message_with_the_start_command(tmp_path: Path) -> None:
    host = StandaloneHost(tmp_path / "Lora", tmp_path / "work", address=f"unix://{tmp_path}/none.sock")
    status = actions.connection_status(host)
    assert "not running" in status and "`lorad serve`" in status
    outputs = list(actions.train(host, TrainForm(name="x", data_dir=str(tmp_path), base_model="m")))
    assert "`lorad serve`" in outputs[-1][0]


def test_the_token_is_found_on_the_same_machine(short_dir: Path, tmp_path: Path) -> None:
    from tests.support.daemons import run_daemon

    running = run_daemon(short_dir)
    try:
        tcp = running.addresses[-1]
        with Daemon.connect(tcp, home=short_dir) as daemon:  # the token file in the daemon's home
            assert daemon.version()
        with Daemon.connect(tcp, home=tmp_path / "other-home") as daemon, pytest.raises(DaemonError) as err:
            daemon.version()
        assert "No token was found on this machine" in str(err.value) and not err.value.unavailable
    finally:
        running.stop(grace=0)


def test_inspect_shows_the_daemons_report(
    daemon: RunningDaemon, client: LoradClient, tiny_sd: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("LORAD_HOME", str(daemon.settings.home))  # where the tab finds the daemon's token
    host = StandaloneHost(tmp_path / "Lora", tmp_path / "work", address=daemon.addresses[0])
    lora = write_kohya_sample(tmp_path / "Lora" / "sample.safetensors", tiny_sd)
    # A bare name is a file in the WebUI's LoRA folder; the vendored rendering is lorad_client.format's.
    text = actions.inspect_lora(host, "sample.safetensors")
    assert text == client.inspect_lora(lora).text
    assert (
        "base model: Stable Diffusion 1.x (sd_v1)" in text and "unet mid_block" in text and "problems:   none" in text
    )
    assert actions.inspect_lora(host, str(lora)) == text
    (tmp_path / "Lora" / "partial.safetensors").write_bytes(b"half a download")
    assert "not a .safetensors file" in actions.inspect_lora(host, "partial.safetensors")
    assert actions.inspect_lora(host, " ").startswith("Enter a LoRA file")
    assert "no job" in actions.inspect_lora(host, "", "0123456789ab")  # the daemon's NOT_FOUND, as text


@pytest.mark.slow
def test_train_places_the_lora_and_gives_the_snippet(
    daemon: RunningDaemon, tiny_sd: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("LORAD_HOME", str(daemon.settings.home))  # where the tab finds the daemon's token
    data = make_dataset(tmp_path / "data", count=4)
    host = StandaloneHost(tmp_path / "Lora", tmp_path / "work", address=daemon.addresses[0], weight=0.7)
    updates = list(actions.train(host, _tiny_form(data, tiny_sd, "webui_lora", 2)))
    text, snippet, job_id, _ = updates[-1]
    assert snippet == "<lora:webui_lora:0.7>", text
    assert job_id and "succeeded" in text and "step 2/2" in text
    placed = tmp_path / "Lora" / "webui_lora.safetensors"
    assert placed.read_bytes() == (tmp_path / "work" / "runs" / "webui_lora" / "webui_lora.safetensors").read_bytes()
    assert [p.name for p in (tmp_path / "Lora").iterdir()] == ["webui_lora.safetensors"]
    assert "already succeeded" in actions.cancel(host, job_id)
    # Inspect with no file named: the job's own LoRA.
    report = actions.inspect_lora(host, "", job_id)
    assert report.startswith(str(tmp_path / "work" / "runs" / "webui_lora" / "webui_lora.safetensors"))
    assert "Stable Diffusion 1.x" in report and "problems:   none" in report


def _tiny_form(data: Path, tiny_sd: Path, name: str, steps: int) -> TrainForm:
    return TrainForm(
        name=name,
        data_dir=str(data),
        base_model=str(tiny_sd),
        rank=4,
        length=steps,
        resolution=64,
        extra="min_bucket_reso: 64\nmax_bucket_reso: 128\nbucket_reso_steps: 16\nbatch_size: 2\ndevice: cpu\n",
    )


@pytest.mark.slow
def test_cancel_stops_the_running_job_and_places_nothing(
    daemon: RunningDaemon, tiny_sd: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("LORAD_HOME", str(daemon.settings.home))  # where the tab finds the daemon's token
    data = make_dataset(tmp_path / "data", count=4)
    host = StandaloneHost(tmp_path / "Lora", tmp_path / "work", address=daemon.addresses[0])
    updates = actions.train(host, _tiny_form(data, tiny_sd, "cancelled_lora", 10_000))
    for text, _, job_id, _ in updates:
        if text.splitlines()[1:2] and text.splitlines()[1].startswith("step "):  # training has begun
            assert actions.cancel(host, job_id).startswith(f"Cancel requested for job {job_id[:8]}")
            break
    text, snippet, _, _ = list(updates)[-1]
    assert "cancelled" in text.splitlines()[0] and snippet == ""
    assert not (tmp_path / "Lora").exists()
