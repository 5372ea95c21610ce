"""Watch folders over the real daemon: real watchdog observers on temporary folders, the tiny model.

Every wait is on a condition with a deadline (the daemon's state, polled); the only sleep paces a slow copy.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import threading
import time
from pathlib import Path

import pytest

from lorad.server.daemon import RunningDaemon
from lorad_api.v1 import jobs_pb2, watch_pb2
from lorad_client import LoradClient, LoradRpcError
from tests.support.daemons import run_daemon
from tests.support.datasets import tiny_train_values, write_config
from tests.support.watching import (
    BURST_QUIET,
    DEADLINE,
    QUIET,
    drop,
    finished_job,
    job_event,
    job_logs,
    template,
    wait_for,
    watch_jobs,
    watch_of,
)


@pytest.mark.slow
def test_images_copied_slowly_make_one_job_after_the_quiet_period(
    client: LoradClient, stock: Path, tiny_sd: Path, tmp_path: Path
) -> None:
    folder = tmp_path / "incoming"
    folder.mkdir()
    watch = client.add_watch(str(folder), str(template(tmp_path, tiny_sd)), quiet_seconds=BURST_QUIET)
    assert watch.state == watch_pb2.WATCH_STATE_IDLE and watch.policy.quiet_seconds == BURST_QUIET
    last_write = 0.0
    for i in range(6):
        shutil.copyfile(stock / f"img_{i:02d}.txt", folder / f"img_{i:02d}.txt")
        data = (stock / f"img_{i:02d}.png").read_bytes()
        with open(folder / f"img_{i:02d}.png", "wb") as out:  # a slow copy: chunks, pauses shorter than quiet
            for start in range(0, len(data), len(data) // 3 + 1):
                out.write(data[start : start + len(data) // 3 + 1])
                out.flush()
                os.fsync(out.fileno())
                time.sleep(0.1)
            last_write = time.time()
        assert not watch_jobs(client, folder), "a job was queued while images were still arriving"
    jobs = wait_for(lambda: watch_jobs(client, folder), "the watch's job")
    job = finished_job(client, jobs[0].job_id)
    assert len(watch_jobs(client, folder)) == 1
    assert job.created_at.ToNanoseconds() / 1e9 >= last_write + BURST_QUIET
    # Every image was read whole: all six usable, none skipped as unreadable.
    report = json.loads(job_event(client, job.job_id, "data_report").report_json)
    assert (report["images_found"], report["images_used"], report["skipped"]) == (6, 6, [])
    watch = wait_for(lambda: (w := watch_of(client, watch.watch_id)).version == 1 and w, "version 1")
    assert watch.images_seen == 6 and watch.new_images == 0 and watch.last_job_id == job.job_id
    assert Path(watch.latest_output).name == "mystyle_v1.safetensors"


@pytest.mark.slow
def test_a_burst_makes_one_job_and_more_images_one_continue_job_encoding_only_them(
    client: LoradClient, stock: Path, tiny_sd: Path, tmp_path: Path
) -> None:
    folder, publish = tmp_path / "burst", tmp_path / "webui" / "models" / "Lora"
    folder.mkdir()
    watch = client.add_watch(
        str(folder),
        str(template(tmp_path, tiny_sd)),
        quiet_seconds=BURST_QUIET,
        continue_steps=1,
        publish_dir=str(publish),
    )
    for i in range(20):
        drop(stock, folder, i)
    first = wait_for(lambda: watch_jobs(client, folder), "the burst's job")
    finished_job(client, first[0].job_id)
    v1 = wait_for(lambda: (w := watch_of(client, watch.watch_id)).version == 1 and w, "version 1")
    assert len(watch_jobs(client, folder)) == 1
    assert Path(v1.published_path) == publish / "mystyle.safetensors"
    assert Path(v1.published_path).read_bytes() == Path(v1.latest_output).read_bytes()

    (folder / "img_00.png").unlink()  # deleted images drop out of the next job's data
    for i in range(20, 23):
        drop(stock, folder, i)
    jobs = wait_for(lambda: len(jobs := watch_jobs(client, folder)) == 2 and jobs, "the continue job")
    second = finished_job(client, jobs[1].job_id)
    assert "init_lora" in second.config_yaml and v1.latest_output in second.config_yaml
    assert job_event(client, second.job_id, "training_started").total_steps == 1  # continue_steps
    assert json.loads(job_event(client, second.job_id, "data_report").report_json)["images_used"] == 22
    cached = job_event(client, second.job_id, "latents_cached")
    assert (cached.encoded, cached.cached) == (3, 19)
    v2 = wait_for(lambda: (w := watch_of(client, watch.watch_id)).version == 2 and w, "version 2")
    assert Path(v2.latest_output).name == "mystyle_v2.safetensors"
    assert Path(v2.published_path).read_bytes() == Path(v2.latest_output).read_bytes()
    assert Path(v1.latest_output).is_file()  # versions are kept


@pytest.mark.slow
def test_partial_downloads_and_hidden_files_are_ignored_until_renamed(
    client: LoradClient, stock: Path, tiny_sd: Path, tmp_path: Path
) -> None:
    folder = tmp_path / "downloads"
    folder.mkdir()
    watch = client.add_watch(str(folder), str(template(tmp_path, tiny_sd)), quiet_seconds=BURST_QUIET)
    shutil.copyfile(stock / "img_00.txt", folder / "x.txt")
    shutil.copyfile(stock / "img_00.png", folder / "x.part")
    shutil.copyfile(stock / "img_01.png", folder / "y.png.crdownload")
    shutil.copyfile(stock / "img_02.png", folder / ".hidden.png")
    drop(stock, folder, 3, name="w")  # one real image in the same burst
    (first,) = wait_for(lambda: watch_jobs(client, folder), "the burst's job")
    finished_job(client, first.job_id)
    report = json.loads(job_event(client, first.job_id, "data_report").report_json)
    assert (report["images_found"], report["images_used"]) == (1, 1)
    assert wait_for(lambda: (w := watch_of(client, watch.watch_id)).version == 1 and w, "v1").images_seen == 1

    os.rename(folder / "x.part", folder / "x.png")
    jobs = wait_for(lambda: len(jobs := watch_jobs(client, folder)) == 2 and jobs, "a job for the renamed image")
    finished_job(client, jobs[1].job_id)
    assert json.loads(job_event(client, jobs[1].job_id, "data_report").report_json)["images_used"] == 2
    seen = wait_for(lambda: (w := watch_of(client, watch.watch_id)).version == 2 and w, "version 2")
    assert seen.images_seen == 2


@pytest.mark.slow
def test_images_added_while_the_daemon_was_down_are_found(
    short_dir: Path, stock: Path, tiny_sd: Path, tmp_path: Path
) -> None:
    folder = tmp_path / "offline"
    folder.mkdir()
    daemon = run_daemon(short_dir)
    try:
        with LoradClient.connect(daemon.addresses[0], home=daemon.settings.home) as client:
            watch = client.add_watch(str(folder), str(template(tmp_path, tiny_sd)), quiet_seconds=QUIET)
    finally:
        daemon.stop(grace=0)
    for i in range(3):
        drop(stock, folder, i)
    daemon = run_daemon(short_dir)
    try:
        with LoradClient.connect(daemon.addresses[0], home=daemon.settings.home) as client:
            (back,) = client.list_watches()
            assert back.watch_id == watch.watch_id and back.folder == str(folder)
            jobs = wait_for(lambda: watch_jobs(client, folder), "a job for the images added while down")
            finished_job(client, jobs[0].job_id)
            found = wait_for(lambda: (w := watch_of(client, watch.watch_id)).version == 1 and w, "version 1")
            assert found.images_seen == 3
    finally:
        daemon.stop(grace=0)


@pytest.mark.slow
def test_a_vanished_folder_errors_alone(
    client: LoradClient, daemon: RunningDaemon, stock: Path, tiny_sd: Path, tmp_path: Path
) -> None:
    doomed, healthy = tmp_path / "doomed", tmp_path / "healthy"
    doomed.mkdir()
    healthy.mkdir()
    config = str(template(tmp_path, tiny_sd))
    lost = client.add_watch(str(doomed), config, quiet_seconds=QUIET)
    # A template of its own: two watches on one template would write the same NAME_vN (refused).
    other = str(template(tmp_path, tiny_sd, name="healthy"))
    kept = client.add_watch(str(healthy), other, quiet_seconds=QUIET, mode="retrain")
    shutil.rmtree(doomed)
    broken = wait_for(
        lambda: (w := watch_of(client, lost.watch_id)).state == watch_pb2.WATCH_STATE_ERROR and w, "the error state"
    )
    assert str(doomed) in broken.error and "lorad watch rm" in broken.hint
    drop(stock, healthy, 0)  # the other watch carries on
    jobs = wait_for(lambda: watch_jobs(client, healthy), "the healthy watch's job")
    finished_job(client, jobs[0].job_id)
    assert watch_of(client, kept.watch_id).state != watch_pb2.WATCH_STATE_ERROR
    assert client.status().version

    doomed.mkdir()  # the folder is back: the watch resumes
    wait_for(lambda: watch_of(client, lost.watch_id).state == watch_pb2.WATCH_STATE_IDLE, "the watch to resume")
    client.remove_watch(str(doomed))
    assert [w.watch_id for w in client.list_watches()] == [kept.watch_id]


def test_add_watch_errors_name_the_field(client: LoradClient, tiny_sd: Path, tmp_path: Path) -> None:
    folder = tmp_path / "pics"
    folder.mkdir()
    config = str(template(tmp_path, tiny_sd))
    with pytest.raises(LoradRpcError) as missing:
        client.add_watch(str(tmp_path / "nope"), config)
    assert missing.value.code.name == "INVALID_ARGUMENT" and "folder" in str(missing.value)
    with pytest.raises(LoradRpcError) as no_config:
        client.add_watch(str(folder), str(tmp_path / "missing.yaml"))
    assert no_config.value.code.name == "INVALID_ARGUMENT" and "config_path" in str(no_config.value)
    bad = write_config(tmp_path / "bad.yaml", base_model=str(tiny_sd), lora_rank=-3, output_dir="out")
    with pytest.raises(LoradRpcError) as invalid:
        client.add_watch(str(folder), str(bad))
    assert invalid.value.code.name == "INVALID_ARGUMENT" and "lora_rank" in str(invalid.value)
    with pytest.raises(LoradRpcError) as policy:
        client.add_watch(str(folder), config, quiet_seconds=-1, continue_steps=-2, mode="sometimes")
    assert all(name in str(policy.value) for name in ("quiet_seconds", "continue_steps", "mode"))

    added = client.add_watch("pics", config, base_dir=str(tmp_path))  # relative to base_dir
    assert added.folder == str(folder) and added.policy.quiet_seconds == 10 and added.policy.min_new_images == 1
    assert added.policy.mode == watch_pb2.WATCH_MODE_CONTINUE
    with pytest.raises(LoradRpcError) as twice:
        client.add_watch(str(folder), config)
    assert twice.value.code.name == "ALREADY_EXISTS"
    assert client.remove_watch(added.watch_id).folder == str(folder)
    with pytest.raises(LoradRpcError) as gone:
        client.remove_watch(str(folder))
    assert gone.value.code.name == "NOT_FOUND"


def test_follow_watches_streams_the_list_then_changes(client: LoradClient, tiny_sd: Path, tmp_path: Path) -> None:
    folder = tmp_path / "followed"
    folder.mkdir()
    stream = client.follow_watches()
    first = next(stream)
    assert first.WhichOneof("item") == "snapshot" and list(first.snapshot.watches) == []
    added = client.add_watch(str(folder), str(template(tmp_path, tiny_sd)), quiet_seconds=QUIET)
    changed = next(stream)
    assert changed.WhichOneof("item") == "changed" and changed.changed.watch_id == added.watch_id
    client.remove_watch(added.watch_id)
    while (message := next(stream)).WhichOneof("item") != "removed_watch_id":
        pass
    assert message.removed_watch_id == added.watch_id
    stream.cancel()
    assert list(stream) == []


def test_cli_watch_add_ls_rm(
    client: LoradClient,
    daemon: RunningDaemon,
    tiny_sd: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    from lorad.cli import main

    monkeypatch.setenv("LORAD_ADDRESS", daemon.addresses[0])
    monkeypatch.setenv("LORAD_HOME", str(daemon.settings.home))
    monkeypatch.chdir(tmp_path)
    (tmp_path / "cli-pics").mkdir()
    template(tmp_path, tiny_sd, name="clistyle")
    assert (
        main(
            [
                "watch",
                "add",
                "cli-pics",
                "--config",
                "clistyle.yaml",
                "--quiet-seconds",
                "3",
                "--min-new-images",
                "5",
                "--mode",
                "retrain",
            ]
        )
        == 0
    )
    assert "watching" in capsys.readouterr().out
    (watch,) = client.list_watches()
    assert watch.policy.min_new_images == 5 and watch.policy.mode == watch_pb2.WATCH_MODE_RETRAIN
    assert main(["watch", "ls"]) == 0
    out = capsys.readouterr().out
    assert watch.watch_id in out and "cli-pics" in out and "retrain" in out
    assert main(["watch", "rm", "cli-pics"]) == 0
    assert client.list_watches() == []
    assert main(["watch", "rm", "cli-pics"]) == 1
    assert "no watch" in capsys.readouterr().err


def wait_job_state(client: LoradClient, job_id: str, state: int) -> jobs_pb2.Job:
    return wait_for(
        lambda: (job := client.get_job(job_id)).state == state and job,
        f"job {job_id} in {jobs_pb2.JobState.Name(state)}",
    )


@pytest.mark.slow
def test_bursts_coalesce_into_the_queued_job_and_one_follow_up(
    client: LoradClient, stock: Path, tiny_sd: Path, tmp_path: Path
) -> None:
    folder = tmp_path / "coalesce"
    folder.mkdir()
    # A long job of the watch's own: it runs while more images arrive (cancelled when seen).
    config = template(tmp_path, tiny_sd, max_train_steps=100_000)
    blocker_data = tmp_path / "blocker"
    blocker_data.mkdir()
    drop(stock, blocker_data, 29)
    blocker = client.submit_training_fields(
        {
            **{
                k: str(v)
                for k, v in tiny_train_values(
                    tiny_sd, blocker_data, tmp_path / "blocker-out", max_train_steps=100_000
                ).items()
                if k != "metadata_path"
            },
            "unet_target_modules": ["q_proj", "v_proj"],
        },
        base_dir=tmp_path,
    )
    wait_job_state(client, blocker.job_id, jobs_pb2.JOB_STATE_RUNNING)
    watch = client.add_watch(str(folder), str(config), quiet_seconds=QUIET)

    # Queued behind the blocker: a second batch updates the queued job instead of adding one.
    drop(stock, folder, 0)
    (queued,) = wait_for(lambda: watch_jobs(client, folder), "the first batch's job")
    wait_for(lambda: watch_of(client, watch.watch_id).new_images == 0, "the first batch to be taken")
    drop(stock, folder, 1)
    wait_for(
        lambda: any("more images arrived" in m for m in job_logs(client, queued.job_id)), "the queued job to be updated"
    )
    wait_for(
        lambda: (w := watch_of(client, watch.watch_id)).images_seen == 2 and w.new_images == 0,
        "the watch to count both batches as taken",
    )
    assert [j.job_id for j in watch_jobs(client, folder)] == [queued.job_id]

    # Running: later batches wait as one follow-up, queued when the run ends.
    client.cancel_job(blocker.job_id)
    wait_job_state(client, queued.job_id, jobs_pb2.JOB_STATE_RUNNING)
    drop(stock, folder, 2)
    wait_for(
        lambda: (
            watch_of(client, watch.watch_id).new_images == 1 and watch_of(client, watch.watch_id).pending_files == 0
        ),
        "the second batch to settle",
    )
    drop(stock, folder, 3)
    wait_for(
        lambda: (
            watch_of(client, watch.watch_id).new_images == 2 and watch_of(client, watch.watch_id).pending_files == 0
        ),
        "the third batch to settle",
    )
    assert [j.job_id for j in watch_jobs(client, folder)] == [queued.job_id]
    client.cancel_job(queued.job_id)
    jobs = wait_for(lambda: len(jobs := watch_jobs(client, folder)) == 2 and jobs, "the follow-up job")
    follow_up = jobs[1]
    wait_for(
        lambda: (w := watch_of(client, watch.watch_id)).last_job_id == follow_up.job_id and w.new_images == 0,
        "the watch to take the follow-up",
    )
    client.cancel_job(follow_up.job_id)
    wait_for(lambda: client.get_job(follow_up.job_id).state == jobs_pb2.JOB_STATE_CANCELLED, "the cancel")
    assert len(watch_jobs(client, folder)) == 2


@pytest.mark.slow
def test_new_images_without_captions_are_captioned_before_the_job(
    client: LoradClient, stock: Path, tiny_sd: Path, tmp_path: Path
) -> None:
    from lorad.models.tiny_captioners import build_tiny_blip

    blip = build_tiny_blip(tmp_path / "blip")
    folder = tmp_path / "uncaptioned"
    folder.mkdir()
    config = template(tmp_path, tiny_sd, captioner="blip", captioner_model=str(blip), caption_max_length=6)
    watch = client.add_watch(str(folder), str(config), quiet_seconds=QUIET)
    for i in range(3):
        shutil.copyfile(stock / f"img_{i:02d}.png", folder / f"img_{i:02d}.png")  # no captions
    (job,) = wait_for(lambda: watch_jobs(client, folder), "the job")
    # Captioned before the job was queued, beside the images (the config reads sidecars).
    assert all((folder / f"img_{i:02d}.txt").read_text().strip() for i in range(3))
    finished_job(client, job.job_id)
    report = json.loads(job_event(client, job.job_id, "data_report").report_json)
    assert (report["images_used"], report["captions_from_sidecars"], report["captions_generated"]) == (3, 3, 0)
    wait_for(lambda: watch_of(client, watch.watch_id).version == 1, "version 1")


@pytest.mark.slow
def test_a_polling_watch_picks_up_images(client: LoradClient, stock: Path, tiny_sd: Path, tmp_path: Path) -> None:
    folder = tmp_path / "network-drive"
    (folder / "sub").mkdir(parents=True)
    watch = client.add_watch(str(folder), str(template(tmp_path, tiny_sd)), quiet_seconds=QUIET, polling=True)
    assert watch.policy.polling
    drop(stock, folder / "sub", 0)  # subfolders count
    (job,) = wait_for(lambda: watch_jobs(client, folder), "the polled job")
    finished_job(client, job.job_id)
    assert wait_for(lambda: (w := watch_of(client, watch.watch_id)).version == 1 and w, "v1").images_seen == 1


@pytest.mark.slow
def test_a_slow_captioning_pass_does_not_hold_up_other_watches(
    client: LoradClient, daemon: RunningDaemon, stock: Path, tiny_sd: Path, tmp_path: Path
) -> None:
    """One folder's captioner is held mid-pass (a gate in front of the real one): meanwhile another
    watched folder settles and gets its job; released, the first folder's job follows."""
    from lorad.models.tiny_captioners import build_tiny_blip

    manager = daemon.service.watches
    real_caption, gate, entered = manager.gateway.caption, threading.Event(), threading.Event()

    def gated_caption(fields: object, base_dir: str) -> int:
        entered.set()
        assert gate.wait(DEADLINE), "the test never opened the gate"
        return real_caption(fields, base_dir)

    manager.gateway = dataclasses.replace(manager.gateway, caption=gated_caption)
    blip = build_tiny_blip(tmp_path / "blip")
    slow, quick = tmp_path / "uncaptioned", tmp_path / "captioned"
    slow.mkdir()
    quick.mkdir()
    slow_watch = client.add_watch(
        str(slow),
        str(template(tmp_path, tiny_sd, "slow", captioner="blip", captioner_model=str(blip), caption_max_length=6)),
        quiet_seconds=QUIET,
    )
    client.add_watch(str(quick), str(template(tmp_path, tiny_sd, "quick")), quiet_seconds=QUIET)
    for i in range(2):
        shutil.copyfile(stock / f"img_{i:02d}.png", slow / f"img_{i:02d}.png")  # no captions
    assert entered.wait(DEADLINE), "captioning never started"
    assert watch_of(client, slow_watch.watch_id).state == watch_pb2.WATCH_STATE_CAPTIONING

    drop(stock, quick, 5)
    wait_for(lambda: watch_jobs(client, quick), "the other folder's job, while the first is still captioning")
    assert watch_of(client, slow_watch.watch_id).state == watch_pb2.WATCH_STATE_CAPTIONING
    assert not watch_jobs(client, slow)

    gate.set()
    (job,) = wait_for(lambda: watch_jobs(client, slow), "the captioned folder's job")
    assert all((slow / f"img_{i:02d}.txt").read_text().strip() for i in range(2))
    finished_job(client, job.job_id)
