"""Watches that recover and never clobber: a template typo fixed is picked up (by itself, and with
`lorad watch retry`), two watches on one template cannot overwrite each other's versions, and files
training would skip do not train a new version on unchanged data. Real daemon, real observers."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import pytest

from lorad.cli import main
from lorad.server.daemon import RunningDaemon
from lorad_api.v1 import watch_pb2
from lorad_client import LoradClient, LoradRpcError
from tests.support.watching import QUIET, drop, finished_job, template, wait_for, watch_jobs, watch_of


def state_of(client: LoradClient, watch_id: str) -> int:
    return watch_of(client, watch_id).state


@pytest.mark.slow
def test_a_fixed_template_typo_is_picked_up_without_touching_the_folder(
    client: LoradClient,
    stock: Path,
    tiny_sd: Path,
    tmp_path: Path,
) -> None:
    folder = tmp_path / "incoming"
    folder.mkdir()
    config = template(tmp_path, tiny_sd)
    good = config.read_text()
    watch = client.add_watch(str(folder), str(config), quiet_seconds=QUIET)
    config.write_text(good + "lora_rnak: 8\n")  # a typo, made after the watch was added
    for i in range(2):
        drop(stock, folder, i)
    broken = wait_for(
        lambda: (w := watch_of(client, watch.watch_id)).state == watch_pb2.WATCH_STATE_ERROR and w, "ERROR"
    )
    assert "lora_rnak" in broken.error and watch_jobs(client, folder) == []

    config.write_text(good)  # fixed; nothing in the folder changes
    (job,) = wait_for(lambda: watch_jobs(client, folder), "the job of the fixed template")
    finished_job(client, job.job_id)
    assert wait_for(lambda: watch_of(client, watch.watch_id).version == 1, "version 1")
    assert "lorad watch retry" in broken.hint  # and the error said how to retry at once


@pytest.mark.slow
def test_watch_retry_reads_the_template_again_and_queues_the_job(
    daemon: RunningDaemon,
    client: LoradClient,
    stock: Path,
    tiny_sd: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    folder = tmp_path / "incoming"
    folder.mkdir()
    config = template(tmp_path, tiny_sd)
    good = config.read_text()
    config.write_text(good.replace("lora_rank: 4", "lora_rank: four"))
    with pytest.raises(LoradRpcError):
        client.add_watch(str(folder), str(config), quiet_seconds=QUIET)  # refused while broken
    config.write_text(good)
    watch = client.add_watch(str(folder), str(config), quiet_seconds=QUIET)
    config.write_text(good.replace("lora_rank: 4", "lora_rank: four"))
    drop(stock, folder, 0)
    wait_for(lambda: state_of(client, watch.watch_id) == watch_pb2.WATCH_STATE_ERROR, "ERROR")

    monkeypatch.setenv("LORAD_HOME", str(daemon.settings.home))  # where the CLI finds the daemon and its token
    monkeypatch.setenv("LORAD_ADDRESS", client.target.target)
    monkeypatch.chdir(tmp_path)
    code = main(["watch", "retry", "incoming"])
    err = capsys.readouterr().err
    assert code == 2, err  # still broken: it says why, by key (a config error)
    assert "`lora_rank`: got 'four'" in err
    with pytest.MonkeyPatch.context() as quiet:
        quiet.setattr("lorad.watching.manager.TICK_SECONDS", 3600.0)  # no automatic pick-up: the command does it
        time.sleep(0.5)  # the thread's current wait (the old tick) ends
        config.write_text(good)
        assert main(["watch", "retry", "incoming"]) == 0, capsys.readouterr().err
    (job,) = wait_for(lambda: watch_jobs(client, folder), "the retried job")
    finished_job(client, job.job_id)


def test_a_second_watch_on_the_same_template_is_refused_naming_the_clash(
    client: LoradClient, tiny_sd: Path, tmp_path: Path
) -> None:
    first, second = tmp_path / "cats", tmp_path / "dogs"
    first.mkdir()
    second.mkdir()
    config = template(tmp_path, tiny_sd)
    client.add_watch(str(first), str(config), quiet_seconds=QUIET)
    with pytest.raises(LoradRpcError) as err:
        client.add_watch(str(second), str(config), quiet_seconds=QUIET)
    text = str(err.value)
    assert str(first) in text and "mystyle_v1" in text and "output_name: mystyle_dogs" in text
    # A template of its own (another output_name) is fine.
    own = tmp_path / "dogs.yaml"
    own.write_text(config.read_text() + "output_name: dogs\n")
    assert client.add_watch(str(second), str(own), quiet_seconds=QUIET).state != watch_pb2.WATCH_STATE_ERROR


@pytest.mark.slow
def test_dropping_only_files_training_skips_trains_no_new_version(
    client: LoradClient,
    stock: Path,
    tiny_sd: Path,
    tmp_path: Path,
) -> None:
    folder = tmp_path / "incoming"
    folder.mkdir()
    watch = client.add_watch(str(folder), str(template(tmp_path, tiny_sd)), quiet_seconds=QUIET)
    for i in range(2):
        drop(stock, folder, i)
    (first,) = wait_for(lambda: watch_jobs(client, folder), "version 1's job")
    finished_job(client, first.job_id)
    wait_for(lambda: watch_of(client, watch.watch_id).version == 1, "version 1")

    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"cut short")  # corrupt
    shutil.copyfile(stock / "img_05.png", folder / "uncaptioned.png")  # no caption, no captioner
    # images_seen is counted when the folder settles, in the same pass that decides on a job: once the
    # watch shows 4 images, IDLE and nothing pending, that decision was made.
    wait_for(
        lambda: (
            (w := watch_of(client, watch.watch_id)).images_seen == 4
            and w.state == watch_pb2.WATCH_STATE_IDLE
            and not w.pending_files
        ),
        "the two files seen and the folder settled",
    )
    assert len(watch_jobs(client, folder)) == 1

    (folder / "uncaptioned.txt").write_text("mystyle, a late caption")
    drop(stock, folder, 7)  # one usable image: now there is new data
    jobs = wait_for(lambda: len(jobs := watch_jobs(client, folder)) == 2 and jobs, "version 2's job")
    finished_job(client, jobs[1].job_id)
