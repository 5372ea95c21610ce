"""The papercuts a first-time user hits in the TUI and the CLI: jobs that came and went between two
refreshes, the keyboard path through the captions screen, errors that do not cover the form being
fixed, a resumed job saying from which step, each failure said once, history not replayed as live,
a quick "no daemon", short id prefixes explained, unloading a model by the path it was loaded with,
and messages free of RPC names."""

from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path

import pytest
from textual.widgets import Select

from lorad.cli import main
from lorad.config import parse_config
from lorad.errors import TrainingInterrupted
from lorad.events import StepDone
from lorad.server.daemon import RunningDaemon
from lorad.training.loop import train as train_sd_lora
from lorad_api.v1 import caption_pb2
from lorad_api.v1.jobs_pb2 import JobCancelled, JobEvent, TrainingStarted
from lorad_client import LoradClient, LoradRpcError
from lorad_tui import LoradApp
from lorad_tui.screens.captions import CaptionsScreen
from lorad_tui.screens.job_detail import JobDetailScreen
from lorad_tui.screens.watches import WatchesScreen
from lorad_tui.state import JobView
from tests.support.cli import run_cli
from tests.support.datasets import tiny_train_values, write_config
from tests.support.tui import screen_text, wait_until
from tests.support.tui_fakes import DONE, FakeClient, FakeStream

# --- TUI ------------------------------------------------------------------------------------------


def test_the_dashboard_lists_jobs_that_came_and_went_between_two_refreshes() -> None:
    class BurstClient(FakeClient):
        def __init__(self) -> None:
            self.jobs: list = []
            self.revision = 0

        def status(self):  # type: ignore[no-untyped-def]
            status = super().status()
            status.queue_length, status.running_job_id = 0, ""  # the same before and after the burst
            status.jobs_revision = self.revision
            return status

        def list_jobs(self, states: object = (), limit: int = 0) -> list:
            return list(self.jobs)

    client = BurstClient()

    async def scenario() -> None:
        app = LoradApp(connect=lambda: client, refresh_seconds=0.1)
        async with app.run_test(size=(120, 30)) as pilot:
            await wait_until(pilot, lambda: "no jobs yet" in screen_text(app), "the empty job table")
            client.jobs, client.revision = [DONE], 3  # submitted, ran and finished between two polls
            await wait_until(pilot, lambda: DONE.name in screen_text(app), "the finished job's row")

    asyncio.run(scenario())


def test_the_captions_screen_works_from_the_keyboard() -> None:
    """Tab never lands in the caption editor while nothing is being edited, and `p` picks the captioner."""
    asked: list[int] = []

    class CaptionClient(FakeClient):
        def caption_images(self, folder, *, base_dir, captioner=0, model=""):  # type: ignore[no-untyped-def]
            asked.append(captioner)
            return super().caption_images(folder, base_dir=base_dir, captioner=captioner, model=model)

    async def scenario() -> None:
        app = LoradApp(connect=CaptionClient, refresh_seconds=3600)
        async with app.run_test(size=(80, 24)) as pilot:
            await wait_until(pilot, lambda: app.connected, "the daemon")
            await pilot.press("t")
            await wait_until(pilot, lambda: isinstance(app.screen, CaptionsScreen), "the captions screen")
            screen = app.screen
            await pilot.press(*"data/watercolor", "enter")
            await wait_until(pilot, lambda: "4 images" in screen_text(app), "the captions listed")
            screen.query_one("#caption-model").focus()
            reached = []
            for _ in range(6):
                await pilot.press("tab")
                reached.append(app.focused.id if app.focused else None)
            assert "caption-edit" not in reached, reached
            assert reached[:3] == ["caption-button", "captions-table", "caption-folder"]
            screen.query_one("#captions-table").focus()
            await pilot.press("p")  # BLIP → WD14, no mouse
            assert screen.query_one("#captioner", Select).value == caption_pb2.CAPTIONER_KIND_WD14
            assert "WD14" in screen_text(app)
            await pilot.press("g")
            await wait_until(pilot, lambda: asked, "the caption request")
            assert asked == [caption_pb2.CAPTIONER_KIND_WD14]
            await pilot.press("enter")  # editing is still one key away
            await wait_until(pilot, lambda: app.focused is not None and app.focused.id == "caption-edit", "editor")

    asyncio.run(scenario())


def test_a_refused_watch_says_why_without_covering_the_form(tmp_path: Path) -> None:
    (tmp_path / "configs").mkdir()
    (tmp_path / "configs" / "style.yaml").write_text("lora_rank: 8\n")
    (tmp_path / "photos").mkdir()

    class RefusingClient(FakeClient):
        def follow_watches(self) -> FakeStream:
            from lorad_api.v1.watch_pb2 import FollowWatchesResponse, WatchList

            return FakeStream([FollowWatchesResponse(snapshot=WatchList())])

        def add_watch(self, folder: str, config_path: str, **policy: object):  # type: ignore[no-untyped-def]
            import grpc

            raise LoradRpcError(grpc.StatusCode.INVALID_ARGUMENT, "watch: 1 problem\n  - `lora_rnak`: unknown key")

    async def scenario() -> None:
        app = LoradApp(connect=RefusingClient, base_dir=tmp_path, refresh_seconds=3600)
        async with app.run_test(size=(100, 32)) as pilot:
            await wait_until(pilot, lambda: app.connected and "Watched folders" in screen_text(app), "the dashboard")
            await pilot.press("w")
            await wait_until(pilot, lambda: isinstance(app.screen, WatchesScreen), "the watches screen")
            app.screen.query_one("#watch-folder").value = "photos"
            app.screen.query_one("#watch-config").value = "configs/style.yaml"
            await pilot.click("#watch-add")
            await wait_until(pilot, lambda: "lora_rnak" in screen_text(app), "the reason on screen")
            assert len(app._notifications) == 0  # no toast over the form
            assert "Add (a)" in screen_text(app)
            await pilot.pause(0.3)  # a redraw from the watches stream keeps it there
            assert "lora_rnak" in screen_text(app)

    asyncio.run(scenario())


def test_a_resumed_job_says_from_which_step_and_a_cancelled_one_its_partial_lora() -> None:
    view = JobView(DONE.__class__(job_id="j", name="style"))
    view.apply(
        JobEvent(seq=1, training_started=TrainingStarted(total_steps=10, start_step=3, resumed_from="/o/step-000003"))
    )
    assert view.resumed_at == 3 and "resumed at step 3" in JobDetailScreen._stats(view).plain
    assert "(from /o/step-000003)" in view.log[-1][1]
    view.apply(JobEvent(seq=2, cancelled=JobCancelled(checkpoint="/o/c", partial="/o/style-partial.safetensors")))
    assert view.partial == "/o/style-partial.safetensors"
    assert "partial LoRA of the last step: /o/style-partial.safetensors" in view.log[-1][1]


# --- CLI ------------------------------------------------------------------------------------------


@pytest.fixture
def use_daemon(daemon: RunningDaemon, monkeypatch: pytest.MonkeyPatch) -> RunningDaemon:
    monkeypatch.setenv("LORAD_HOME", str(daemon.settings.home))
    monkeypatch.delenv("LORAD_ADDRESS")
    return daemon


@pytest.mark.slow
def test_an_embedded_resume_says_from_which_step(
    tmp_path: Path, tiny_sd: Path, dataset: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    values = tiny_train_values(tiny_sd, dataset, tmp_path / "out", epochs=2)
    stop = threading.Event()
    with pytest.raises(TrainingInterrupted):
        train_sd_lora(
            parse_config(values, base_dir=tmp_path),
            on_event=lambda e: stop.set() if isinstance(e, StepDone) and e.step == 3 else None,
            stop=stop,
        )
    cfg = write_config(tmp_path / "c.yaml", **values, resume_from="latest")
    code, _, err = run_cli(capsys, "train", "--embedded", "--config", str(cfg))
    assert code == 0, err
    assert f"training resumes at step 3 of 8 (from {tmp_path / 'out' / 'checkpoints' / 'step-000003'})" in err


@pytest.mark.slow
def test_a_failed_job_is_reported_once(
    use_daemon: RunningDaemon, tmp_path: Path, tiny_sd: Path, dataset: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cfg = write_config(
        tmp_path / "c.yaml", **tiny_train_values(tiny_sd, dataset, tmp_path / "o", unet_target_modules=["to_qq"])
    )
    code, out, err = run_cli(capsys, "train", "--config", str(cfg))
    assert code == 1
    assert (out + err).count("'to_qq' matches no layer") == 1, out + err


@pytest.mark.slow
def test_logs_follow_prints_history_as_a_log_not_as_a_live_bar(
    use_daemon: RunningDaemon, client: LoradClient, tmp_path: Path, tiny_sd: Path, dataset: Path, capsys
) -> None:
    cfg = write_config(tmp_path / "c.yaml", **tiny_train_values(tiny_sd, dataset, tmp_path / "o", max_train_steps=6))
    job = client.submit_training(cfg.read_text(), base_dir=tmp_path)
    while client.get_job(job.job_id).state != 3:  # SUCCEEDED
        time.sleep(0.1)
    code, out, err = run_cli(capsys, "logs", job.job_id, "--follow")
    assert code == 0 and "step 6/6" in out and "<lora:o:0.8>" in out
    assert "step/s" not in err  # no progress bar fed a replay at thousands of steps a second


def test_status_without_a_daemon_answers_at_once(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("LORAD_ADDRESS", "127.0.0.1:9")  # nothing listens there
    start = time.monotonic()
    code, _, err = run_cli(capsys, "status")
    assert code == 1 and "lorad serve" in err
    assert time.monotonic() - start < 1.5  # gRPC would retry for the whole 3 s timeout


def test_a_short_id_prefix_says_why_it_is_refused(use_daemon: RunningDaemon, capsys) -> None:
    code, _, err = run_cli(capsys, "logs", "abc")
    assert code == 1 and "at least 4 characters" in err


def test_models_unload_takes_the_path_it_was_loaded_with(
    use_daemon: RunningDaemon, tiny_sd: Path, tmp_path: Path, capsys, monkeypatch: pytest.MonkeyPatch
) -> None:
    link = tmp_path / "models" / "tiny"
    link.parent.mkdir()
    link.symlink_to(tiny_sd)
    monkeypatch.chdir(tmp_path)
    assert run_cli(capsys, "models", "load", "models/tiny")[0] == 0
    code, out, err = run_cli(capsys, "models", "unload", "models/tiny")
    assert code == 0 and "freed" in out, err


def test_messages_name_no_rpcs(use_daemon: RunningDaemon, tmp_path: Path, capsys) -> None:
    (tmp_path / "photos").mkdir()
    code, _, err = run_cli(capsys, "watch", "add", str(tmp_path / "photos"), "--config", str(tmp_path / "none.yaml"))
    assert code == 2 and "`config_path`" in err and "AddWatch" not in err
    code, _, err = run_cli(capsys, "caption", str(tmp_path / "nowhere"))
    assert code == 2 and "CaptionImages" not in err, err


def test_train_help_says_it_submits_to_the_daemon(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "submit it to the running lorad daemon" in text and "with no daemon running" in text


@pytest.mark.slow
def test_the_demos_edit_and_run_command_works_from_anywhere(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    import os
    import subprocess
    import sys

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    code, out, err = run_cli(capsys, "demo", "--dir", str(tmp_path / "demo"), "--steps", "2")
    assert code == 0, err
    command = next(line.split(": ", 1)[1] for line in out.splitlines() if line.startswith("edit and run it: "))
    env = os.environ | {"PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    done = subprocess.run(["bash", "-c", command], cwd=elsewhere, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr


def test_an_llm_config_run_from_another_folder_gets_no_sd_suggestions(
    tmp_path: Path, tiny_llm: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    work = tmp_path / "lorad-demo"
    (work / "configs").mkdir(parents=True)
    config = work / "configs" / "demo_llm.yaml"  # as the LLM demo wrote it before it said `task: llm`
    config.write_text(
        "train_data: ./data/records.jsonl\nbase_model: ./models/tiny-llama\noutput_dir: ./output/demo_adapter\n"
    )
    monkeypatch.chdir(tmp_path)  # not lorad-demo/: the relative paths resolve elsewhere
    code, _, err = run_cli(capsys, "config", "--check", "lorad-demo/configs/demo_llm.yaml")
    assert code == 2 and "train_data_dir" not in err and "unknown key" not in err, err
    assert "`train_data`" in err or "`base_model`" in err
