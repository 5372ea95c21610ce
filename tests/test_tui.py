"""The TUI against a real in-process daemon training the tiny model, driven with Textual's Pilot."""

from __future__ import annotations

import asyncio
import re
import subprocess
import sys
from collections import Counter
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

import pytest
import yaml
from PIL import Image
from safetensors.torch import load_file, save_file
from textual.widgets import Input, Select

from lorad import __version__
from lorad.config import parse_config_text
from lorad.errors import ConfigError
from lorad.models.tiny_captioners import build_tiny_wd14
from lorad.server.daemon import RunningDaemon
from lorad_api.v1 import caption_pb2
from lorad_api.v1.jobs_pb2 import JobInterrupted, Step, TrainingStarted
from lorad_api.v1.watch_pb2 import WATCH_STATE_IDLE, FollowWatchesResponse, Watch, WatchList
from lorad_client import JOB_STATE_CANCELLED, Job, JobEvent, LoradClient, Progress
from lorad_tui import LoradApp
from lorad_tui.screens.captions import CaptionsScreen
from lorad_tui.screens.confirm import ConfirmScreen
from lorad_tui.screens.dashboard import DashboardScreen
from lorad_tui.screens.job_detail import JobDetailScreen
from lorad_tui.screens.lora_inspect import LoraInspectScreen
from lorad_tui.screens.offline import HEADLINE, OfflineScreen
from lorad_tui.screens.submit import ConfigTree, SubmitScreen
from lorad_tui.screens.watches import WatchesScreen
from lorad_tui.state import DaemonView, JobView
from tests.support.daemons import run_daemon
from tests.support.datasets import draw_image, tiny_llm_values, tiny_train_values, write_config, write_jsonl
from tests.support.lora_samples import write_kohya_sample
from tests.support.tui import pick_in_tree, screen_text, wait_until
from tests.support.tui_fakes import FakeClient, FakeStream

# Wide enough that the long temporary paths in the outputs fit on one line.
SIZE = (200, 50)


def run(scenario: Coroutine[Any, Any, None]) -> None:
    asyncio.run(scenario)


@pytest.fixture
def use_daemon(daemon: RunningDaemon, monkeypatch: pytest.MonkeyPatch) -> RunningDaemon:
    """Let the TUI find the test daemon as it finds one on a user's machine (its state directory)."""
    monkeypatch.setenv("LORAD_HOME", str(daemon.settings.home))
    monkeypatch.delenv("LORAD_ADDRESS")
    return daemon


@pytest.mark.slow
def test_submit_a_config_watch_it_finish_and_copy_the_snippet(
    use_daemon: RunningDaemon, tiny_sd: Path, dataset: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    write_config(tmp_path / "configs" / "style.yaml", **tiny_train_values(tiny_sd, dataset, Path("output/style")))
    kohya = tmp_path / "output" / "style" / "style.safetensors"

    async def scenario() -> None:
        app = LoradApp()
        async with app.run_test(size=SIZE) as pilot:
            await wait_until(
                pilot,
                lambda: f"lorad {__version__}" in screen_text(app) and "no jobs yet" in screen_text(app),
                "the dashboard with its empty job table",
            )
            await pilot.press("s")
            await wait_until(pilot, lambda: isinstance(app.screen, SubmitScreen), "the submit screen")
            await pick_in_tree(pilot, app.screen.query_one(ConfigTree), Path("configs/style.yaml"))
            await wait_until(pilot, lambda: "✓ valid — configs/style.yaml" in screen_text(app), "the verdict")
            await pilot.press("s")
            await wait_until(pilot, lambda: isinstance(app.screen, JobDetailScreen), "the new job's detail")
            await wait_until(pilot, lambda: "✓ LoRA written" in screen_text(app), "the job to finish", timeout=60)
            text = screen_text(app)
            assert f"kohya / A1111: {kohya}" in text
            assert "step 4/4" in text and "succeeded" in text and "<lora:style:0.8>" in text
            assert "training 4 steps" in text  # the log tail
            assert "8 image files found, 8 used" in text  # the data report
            await pilot.press("y")
            assert app.clipboard == "<lora:style:0.8>"
            await pilot.press("o")
            assert app.clipboard == str(kohya.parent)
            await pilot.press("i")  # the kohya file, as the daemon's InspectLora reads it
            await wait_until(
                pilot,
                lambda: isinstance(app.screen, LoraInspectScreen) and "✓ none found" in screen_text(app),
                "the LoRA's inspect report",
            )
            text = screen_text(app)
            assert "base model: Stable Diffusion 1.x" in text and "rank:       4" in text and "unet up_blocks.1" in text
            await pilot.press("escape")
            await wait_until(pilot, lambda: isinstance(app.screen, JobDetailScreen), "back on the job's detail")
            await pilot.press("escape")
            await wait_until(pilot, lambda: isinstance(app.screen, DashboardScreen), "the dashboard")
            await wait_until(pilot, lambda: "succeeded" in screen_text(app), "the job's row")
            assert "4/4 100%" in screen_text(app)

    run(scenario())
    assert kohya.is_file()


@pytest.mark.slow
def test_cancel_a_running_job_from_its_detail_screen(
    use_daemon: RunningDaemon, client: LoradClient, tiny_sd: Path, dataset: Path, tmp_path: Path
) -> None:
    config = write_config(
        tmp_path / "long.yaml", **tiny_train_values(tiny_sd, dataset, tmp_path / "long", max_train_steps=100_000)
    )
    job = client.submit_training(config.read_text(), base_dir=tmp_path, source_name=str(config))

    async def scenario() -> None:
        app = LoradApp()
        async with app.run_test(size=SIZE) as pilot:
            # The job's row, not just the status line's "running: long": enter acts on the table's row.
            await wait_until(pilot, lambda: re.search(r"long +running", screen_text(app)), "the job's row to run")
            # The status names the device's worker process and the job it trains.
            await wait_until(
                pilot, lambda: f"worker 0 running {job.job_id}" in screen_text(app), "the worker in the status"
            )
            await pilot.press("enter")  # the newest job is under the cursor
            await wait_until(pilot, lambda: isinstance(app.screen, JobDetailScreen), "the job's detail")
            view = app.view.jobs[job.job_id]
            await wait_until(pilot, lambda: len(view.losses) >= 2, "a few steps")
            await wait_until(
                pilot,
                lambda: "/100000" in screen_text(app) and "loss ⣿ raw" in screen_text(app),
                "the steps and the loss curve drawn",
            )
            await pilot.press("c")
            await wait_until(pilot, lambda: "Cancel the running job `long`?" in screen_text(app), "the question")
            await pilot.press("y")
            await wait_until(pilot, lambda: view.job.state == JOB_STATE_CANCELLED, "the job to stop")
            await wait_until(pilot, lambda: "cancelled" in screen_text(app), "the cancelled state on screen")
            assert "Cancel job" not in screen_text(app)  # the key is gone from the footer

    run(scenario())
    assert client.get_job(job.job_id).state == JOB_STATE_CANCELLED


def test_a_bad_config_shows_every_problem_by_key_and_is_not_sent(
    use_daemon: RunningDaemon, client: LoradClient, tiny_sd: Path, dataset: Path, tmp_path: Path
) -> None:
    values = tiny_train_values(tiny_sd, dataset, tmp_path / "out") | {"lora_rank": "eight", "epoch": 3}
    del values["output_dir"]
    bad = write_config(tmp_path / "bad.yaml", **values)
    with pytest.raises(ConfigError) as raised:
        parse_config_text(bad.read_text(), base_dir=tmp_path)
    keys = [problem.key for problem in raised.value.problems]
    assert {"lora_rank", "epoch", "output_dir"} <= set(keys)

    async def scenario() -> None:
        app = LoradApp(base_dir=tmp_path)
        async with app.run_test(size=SIZE) as pilot:
            await wait_until(pilot, lambda: app.connected, "the connection")
            await pilot.press("s")
            await wait_until(pilot, lambda: isinstance(app.screen, SubmitScreen), "the submit screen")
            await pilot.click("#config-path")
            await pilot.press(*"bad.yaml", "enter")  # typing a path works as well as the tree
            await wait_until(pilot, lambda: f"{len(keys)} problems" in screen_text(app), "the verdict")
            text = screen_text(app)
            for problem in raised.value.problems:
                assert f"✗ {problem.render()}" in text
            await pilot.click("#submit-button")  # disabled: nothing happens
            await pilot.press("tab", "s")  # nor with the key, once out of the text field
            await pilot.pause()
            assert isinstance(app.screen, SubmitScreen)

    run(scenario())
    assert client.list_jobs() == []


def test_daemon_down_screen_then_reconnects_by_itself(short_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LORAD_HOME", str(short_dir))
    # The socket the daemon below will listen on. Without a daemon (no discovery file) the lookup
    # would fall back to the default TCP port, where a developer's own daemon may be running.
    monkeypatch.setenv("LORAD_ADDRESS", f"unix://{short_dir}/lorad.sock")

    async def scenario() -> None:
        app = LoradApp(retry_seconds=0.2, refresh_seconds=0.5)
        async with app.run_test(size=(100, 30)) as pilot:
            await wait_until(pilot, lambda: HEADLINE in screen_text(app), "the daemon-down screen")
            assert isinstance(app.screen, OfflineScreen)
            daemon = run_daemon(short_dir)
            try:
                await wait_until(pilot, lambda: isinstance(app.screen, DashboardScreen), "the dashboard")
                await wait_until(
                    pilot, lambda: f"pid {daemon.service.status().pid}" in screen_text(app), "the daemon's status"
                )
                # The daemon stops, then comes back (a restart): the TUI follows by itself.
                daemon.stop(grace=0)
                await wait_until(pilot, lambda: HEADLINE in screen_text(app), "the daemon-down screen again")
                daemon = run_daemon(short_dir)
                await wait_until(
                    pilot,
                    lambda: isinstance(app.screen, DashboardScreen) and app.connected,
                    "the dashboard after the restart",
                )
            finally:
                daemon.stop(grace=0)

    run(scenario())


def test_the_tui_imports_no_torch() -> None:
    probe = """
import importlib, pkgutil, sys
from pathlib import Path
import lorad_tui
for module in pkgutil.walk_packages(lorad_tui.__path__, "lorad_tui."):
    if module.name != "lorad_tui.__main__":  # that one runs the app
        importlib.import_module(module.name)
from lorad.config import parse_config_text
from lorad.errors import ConfigError
try:
    parse_config_text("lora_rank: 4\\n", base_dir=Path.cwd())
except ConfigError:
    pass
lorad_tui.LoradApp()
heavy = ("torch", "diffusers", "transformers", "peft", "lorad.training", "lorad.models", "lorad.server.service")
plugins = [m for m in sys.modules if m.startswith("lorad.families.") and m.endswith(".family")]
print(sorted(m for m in sys.modules if m.startswith(heavy)) + plugins)
"""
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True, timeout=60)
    assert result.stdout.strip() == "[]"


@pytest.mark.slow
def test_a_running_job_row_moves_by_its_stream_not_by_reloading_the_list(
    use_daemon: RunningDaemon, client: LoradClient, tiny_sd: Path, dataset: Path, tmp_path: Path
) -> None:
    config = write_config(
        tmp_path / "long.yaml", **tiny_train_values(tiny_sd, dataset, tmp_path / "long", max_train_steps=100_000)
    )
    job = client.submit_training(config.read_text(), base_dir=tmp_path)
    calls: Counter[str] = Counter()

    def counting_connect() -> LoradClient:
        connected = LoradClient.connect(timeout=2)
        for name in ("list_jobs", "status"):
            setattr(connected, name, counting(name, getattr(connected, name)))
        return connected

    def counting(name: str, call: Callable[..., Any]) -> Callable[..., Any]:
        def counted(*args: Any, **kwargs: Any) -> Any:
            calls[name] += 1
            return call(*args, **kwargs)

        return counted

    step_cell = re.compile(r"(\d+)/100000")

    def shown_step(app: LoradApp) -> int:
        match = step_cell.search(screen_text(app))
        return int(match.group(1)) if match else -1

    async def scenario() -> None:
        app = LoradApp(connect=counting_connect, refresh_seconds=0.2)
        async with app.run_test(size=SIZE) as pilot:
            await wait_until(pilot, lambda: shown_step(app) >= 1, "the job's first step in its row")
            first, listed, polled = shown_step(app), calls["list_jobs"], calls["status"]
            await wait_until(
                pilot,
                lambda: shown_step(app) >= first + 3 and calls["status"] >= polled + 3,
                "the row to move on while the status refreshes",
            )
            assert calls["list_jobs"] == listed
        client.cancel_job(job.job_id)

    run(scenario())


def test_a_resumed_job_curve_does_not_double_back_and_replayed_events_are_not_repeated() -> None:
    """After a daemon restart the run resumes from its checkpoint, and the TUI re-watches from the
    last event it saw: the loss curve continues from the checkpoint, and no log line shows twice."""
    view = JobView(Job(job_id="j", name="style"))
    seq = 0

    def event(**kind: Any) -> JobEvent:
        nonlocal seq
        seq += 1
        return JobEvent(job_id="j", seq=seq, **kind)

    def step(n: int) -> JobEvent:
        return event(step=Step(progress=Progress(step=n, total_steps=10, loss=1.0 / n)))

    history = [
        event(training_started=TrainingStarted(total_steps=10)),
        *(step(n) for n in range(1, 6)),
        event(interrupted=JobInterrupted(checkpoint="ckpt/step-3", will_resume=True)),
    ]
    for item in history:
        assert view.apply(item)
    assert [view.apply(item) for item in history] == [False] * len(history)  # a replay changes nothing
    lines = list(view.log)
    view.apply(event(training_started=TrainingStarted(total_steps=10, start_step=3)))
    for n in range(4, 7):
        view.apply(step(n))
    assert view.steps == [1, 2, 3, 4, 5, 6]
    assert view.losses[3:] == [1.0 / 4, 1.0 / 5, 1.0 / 6]
    assert view.log[: len(lines)] == lines and "training resumes at step 3 of 10" in view.log[-1][1]


def test_caption_a_folder_edit_one_caption_and_save_it(use_daemon: RunningDaemon, tmp_path: Path) -> None:
    tagger = build_tiny_wd14(tmp_path / "wd14")
    data = tmp_path / "data"
    data.mkdir()
    for name, colour in (("red.png", (230, 20, 20)), ("blue.png", (20, 20, 230))):
        Image.new("RGB", (40, 30), colour).save(data / name)
    metadata = data / "metadata.csv"

    async def scenario() -> None:
        app = LoradApp(base_dir=tmp_path)
        async with app.run_test(size=SIZE) as pilot:
            await wait_until(
                pilot, lambda: app.connected and f"lorad {__version__}" in screen_text(app), "the dashboard"
            )
            await pilot.press("t")
            await wait_until(pilot, lambda: isinstance(app.screen, CaptionsScreen), "the captions screen")
            screen = app.screen
            await pilot.press(*"data")  # the folder field has the focus
            screen.query_one("#captioner", Select).value = caption_pb2.CAPTIONER_KIND_WD14
            screen.query_one("#caption-model", Input).value = str(tagger)
            await pilot.click("#caption-button")
            await wait_until(
                pilot,
                lambda: "done: 2 captioned, 0 kept, 0 failed" in screen_text(app),
                "the captioning to finish",
                timeout=60,
            )
            await wait_until(pilot, lambda: "csv · lorad" in screen_text(app), "the listing after it")
            generated = metadata.read_text()
            assert 'blue.png,"tiny hero, blue theme' in generated

            await pilot.press("home", "e")  # the first image: blue.png
            await pilot.press("end", *", edited", "enter")
            await wait_until(pilot, lambda: "✎ not saved" in screen_text(app), "the unsaved edit")
            assert metadata.read_text() == generated  # nothing written before the save
            await pilot.press("ctrl+s")
            await wait_until(pilot, lambda: "saved 1 caption" in screen_text(app), "the save")
            assert "✎ not saved" not in screen_text(app)

            await pilot.press("end", "e", "ctrl+u")  # the last image: red.png, cleared; ctrl+s while still typing
            await pilot.press(*"a red square", "ctrl+s")
            await wait_until(pilot, lambda: "a red square" in metadata.read_text(), "the second save")

    run(scenario())
    rows = dict(line.split(",", 1) for line in metadata.read_text().splitlines()[1:])
    assert rows["blue.png"].endswith(', edited"') and rows["red.png"] == "a red square"


def test_inspect_lora_files_through_the_daemon(use_daemon: RunningDaemon, tiny_sd: Path, tmp_path: Path) -> None:
    good = write_kohya_sample(tmp_path / "good.safetensors", tiny_sd)
    tensors = load_file(str(good))
    module = sorted(k for k in tensors if k.endswith(".alpha"))[0].removesuffix(".alpha")
    tensors[f"{module}.lora_up.weight"][0, 0] = float("nan")
    del tensors[f"{module}.alpha"]
    save_file(tensors, str(tmp_path / "damaged.safetensors"))
    (tmp_path / "later.safetensors").write_bytes(b"still downloading")

    async def scenario() -> None:
        app = LoradApp(base_dir=tmp_path)
        async with app.run_test(size=SIZE) as pilot:
            await wait_until(pilot, lambda: app.connected, "the connection")
            # A relative path: the daemon resolves it against the TUI's folder.
            app.push_screen(LoraInspectScreen("damaged.safetensors", tmp_path))
            await wait_until(pilot, lambda: "[missing_alpha]" in screen_text(app), "the damaged file's problems")
            text = screen_text(app)
            assert str(tmp_path / "damaged.safetensors") in text and "[nan] 1 tensors hold NaN" in text
            assert f"    {module}" in text and "base model: Stable Diffusion 1.x" in text
            await pilot.press("escape")
            app.push_screen(LoraInspectScreen(str(tmp_path / "later.safetensors")))
            await wait_until(pilot, lambda: "not a .safetensors file" in screen_text(app), "the daemon's refusal")
            assert "✗ " in screen_text(app) and app.connected  # shown on the screen; the daemon stays
            (tmp_path / "later.safetensors").write_bytes(good.read_bytes())
            await pilot.press("r")
            await wait_until(pilot, lambda: "✓ none found" in screen_text(app), "the file inspected again")

    run(scenario())


def test_watched_folders_follow_the_stream() -> None:
    view = DaemonView()
    view.apply_watches(
        FollowWatchesResponse(
            snapshot=WatchList(watches=[Watch(watch_id="a", folder="/a"), Watch(watch_id="b", folder="/b")])
        )
    )
    view.apply_watches(FollowWatchesResponse(changed=Watch(watch_id="c", folder="/c")))
    view.apply_watches(FollowWatchesResponse(changed=Watch(watch_id="a", folder="/a", new_images=3)))
    view.apply_watches(FollowWatchesResponse(removed_watch_id="b"))
    assert [(w.watch_id, w.new_images) for w in view.watches.values()] == [("a", 3), ("c", 0)]


def test_add_and_remove_a_watch_from_the_watches_screen(tmp_path: Path) -> None:
    """Against a fake daemon that serves WatchService (the real one is another branch's work)."""
    (tmp_path / "configs").mkdir()
    (tmp_path / "configs" / "style.yaml").write_text("lora_rank: 8\n")
    (tmp_path / "photos").mkdir()
    calls: list[tuple[object, ...]] = []

    class WatchingClient(FakeClient):
        def follow_watches(self) -> FakeStream:
            return FakeStream([FollowWatchesResponse(snapshot=WatchList())])

        def add_watch(self, folder: str, config_path: str, **policy: object) -> Watch:
            calls.append(("add", folder, config_path, policy))
            return Watch(
                watch_id="w-9",
                folder=str(tmp_path / folder),
                config_path=str(tmp_path / config_path),
                state=WATCH_STATE_IDLE,
                images_seen=12,
            )

        def remove_watch(self, watch: str, *, base_dir: str | None = None) -> Watch:
            calls.append(("remove", watch))
            return Watch(watch_id=watch, folder=str(tmp_path / "photos"))

    async def scenario() -> None:
        app = LoradApp(connect=WatchingClient, base_dir=tmp_path, refresh_seconds=3600)
        async with app.run_test(size=(100, 32)) as pilot:
            await wait_until(
                pilot,
                lambda: (
                    app.connected
                    and "Watched folders" in screen_text(app)
                    and "press w to watch a folder" in screen_text(app)
                ),
                "the empty watches panel",
            )
            await pilot.press("w")
            await wait_until(pilot, lambda: isinstance(app.screen, WatchesScreen), "the watches screen")
            tree = app.screen.query_one(ConfigTree)
            await pick_in_tree(pilot, tree, Path("configs/style.yaml"))
            await pick_in_tree(pilot, tree, Path("photos"))  # below configs/: the tree is walked downwards
            await pilot.click("#watch-add")
            await wait_until(
                pilot, lambda: calls and re.search(r"/photos +idle +12 ", screen_text(app)), "the new watch"
            )
            assert calls[0] == ("add", "photos", "configs/style.yaml", {"base_dir": str(tmp_path), "mode": "continue"})
            app.screen.query_one("#watch-table").focus()
            await pilot.press("d")
            await wait_until(pilot, lambda: isinstance(app.screen, ConfirmScreen), "the question")
            await pilot.press("y")
            await wait_until(
                pilot, lambda: len(calls) == 2 and "no folder is watched" in screen_text(app), "the watch removed"
            )
            assert calls[1] == ("remove", "w-9")

    run(scenario())


@pytest.mark.slow
def test_watch_a_folder_from_the_tui_and_see_its_lora_published(
    use_daemon: RunningDaemon, client: LoradClient, tiny_sd: Path, tmp_path: Path
) -> None:
    """The whole watch story from the keyboard, against the real daemon: pick a folder and a template
    config in the tree, set a short quiet period and a publish folder, add; the folder's images train
    into `NAME_v1` and the row shows it, with the published copy on disk."""
    photos = tmp_path / "photos"
    photos.mkdir()
    for i, (colour, shape) in enumerate((("red", "circle"), ("blue", "square"), ("green", "triangle"))):
        draw_image(photos / f"img_{i}.png", colour, shape, (64, 64), seed=i)
        (photos / f"img_{i}.txt").write_text(f"mystyle, a {colour} {shape}")
    values = tiny_train_values(tiny_sd, tmp_path / "unused", Path("output/mystyle"), max_train_steps=2)
    values.pop("metadata_path")
    write_config(tmp_path / "configs" / "mystyle.yaml", **values)

    async def scenario() -> None:
        app = LoradApp(base_dir=tmp_path)
        async with app.run_test(size=(100, 32)) as pilot:
            await wait_until(pilot, lambda: app.connected and "Watched folders" in screen_text(app), "the panel")
            await pilot.press("w")
            await wait_until(pilot, lambda: isinstance(app.screen, WatchesScreen), "the watches screen")
            tree = app.screen.query_one(ConfigTree)
            await pick_in_tree(pilot, tree, Path("configs/mystyle.yaml"))
            await pick_in_tree(pilot, tree, Path("photos"))
            app.screen.query_one("#watch-quiet", Input).value = "0.3"
            app.screen.query_one("#watch-publish", Input).value = "webui/models/Lora"
            await pilot.press("a")
            await wait_until(
                pilot,
                lambda: re.search(r"/photos +idle +3 +0 +v1 ", screen_text(app)),
                "the first version in the row",
                timeout=120,
            )

    run(scenario())
    (watch,) = client.list_watches()
    assert watch.policy.quiet_seconds == pytest.approx(0.3) and watch.version == 1
    assert Path(watch.latest_output).name == "mystyle_v1.safetensors"
    assert Path(watch.published_path) == tmp_path / "webui" / "models" / "Lora" / "mystyle.safetensors"
    assert Path(watch.published_path).read_bytes() == Path(watch.latest_output).read_bytes()


@pytest.mark.slow
def test_a_finished_llm_job_shows_its_adapter_and_how_to_load_it(
    use_daemon: RunningDaemon, client: LoradClient, tiny_llm: Path, tmp_path: Path
) -> None:
    """An LLM job's detail names the PEFT adapter and offers the call that loads it, not a `<lora:…>` tag."""
    data = write_jsonl(tmp_path / "records.jsonl", [{"instruction": "greet", "output": "hello world"}])
    values = tiny_llm_values(tiny_llm, data, tmp_path / "out", max_train_steps=3, output_name="notes")
    job = client.submit_training(
        yaml.safe_dump({k: str(v) if isinstance(v, Path) else v for k, v in values.items()}), base_dir=tmp_path
    )

    async def scenario() -> None:
        app = LoradApp()
        async with app.run_test(size=SIZE) as pilot:
            await wait_until(
                pilot, lambda: re.search(r"notes +succeeded", screen_text(app)), "the job to finish", timeout=90
            )
            await pilot.press("enter")
            await wait_until(pilot, lambda: "✓ adapter written" in screen_text(app), "the finished job's detail")
            text = screen_text(app)
            adapter = client.get_job(job.job_id).outputs["adapter"]
            assert "PEFT adapter:" in text and f'PeftModel.from_pretrained(base_model, "{adapter}")' in text
            assert "<lora:" not in text

    run(scenario())
