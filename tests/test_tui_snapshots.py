"""Snapshot tests of the TUI's screens, against a fake daemon client with fixed data and a fixed clock.

Nothing here varies between runs (no real times, ids, temporary paths or durations), so a changed
snapshot means a changed screen. Update after an intended change with
``pytest tests/test_tui_snapshots.py --snapshot-update`` and look at the SVGs.
"""

from __future__ import annotations

import asyncio
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from textual.pilot import Pilot

from lorad_api.v1.jobs_pb2 import (
    CheckpointSaved,
    SampleImage,
)
from lorad_client import (
    JobEvent,
    WatchJobResponse,
)
from lorad_tui import LoradApp
from lorad_tui.connection import JobStream
from lorad_tui.screens.captions import CaptionsScreen
from lorad_tui.screens.job_detail import JobDetailScreen
from lorad_tui.screens.lora_inspect import LoraInspectScreen
from lorad_tui.screens.submit import ConfigTree, SubmitScreen
from lorad_tui.screens.watches import WatchesScreen
from tests.support.tui import pick_in_tree, screen_text, wait_until
from tests.support.tui_fakes import (
    NOW,
    RUNNING,
    SIZE,
    SUBMIT_DIR,
    FakeClient,
    FakeStream,
    fake_app,
    running_history,
    stamp,
)


async def settled(pilot: Pilot) -> None:
    """Wait until the fake daemon's data is on screen: connected, jobs listed, running job replayed."""
    app = pilot.app
    assert isinstance(app, LoradApp)
    await wait_until(
        pilot,
        lambda: (
            app.connected
            and len(app.view.order) == 4
            and app.view.models
            and len(app.view.watches) == 2
            and RUNNING.job_id in app.view.jobs
            and len(app.view.jobs[RUNNING.job_id].losses) == 60
        ),
        "the fake daemon's data",
    )
    await wait_until(
        pilot, lambda: "60/100  60%" in screen_text(app) and "12m34s" in screen_text(app), "the data on screen"
    )


def test_dashboard(snap_compare) -> None:
    assert snap_compare(fake_app(), terminal_size=SIZE, run_before=settled)


def test_job_detail(snap_compare) -> None:
    assert snap_compare(fake_app(), terminal_size=SIZE, run_before=open_running_job)


def test_job_detail_wide(snap_compare) -> None:
    """At 120 columns and more the log and data report sit beside the curve."""
    assert snap_compare(fake_app(), terminal_size=(160, 40), run_before=open_running_job)


async def open_running_job(pilot: Pilot) -> None:
    await settled(pilot)
    await pilot.press("down", "enter")  # the second row: the running job
    await wait_until(
        pilot,
        lambda: (
            isinstance(pilot.app.screen, JobDetailScreen)
            and "step 60/100" in screen_text(pilot.app)
            and "bf16 autocast on cuda:0" in screen_text(pilot.app)
        ),
        "the job's detail",
    )


@pytest.fixture
def submit_dir() -> Iterator[Path]:
    shutil.rmtree(SUBMIT_DIR, ignore_errors=True)
    (SUBMIT_DIR / "configs").mkdir(parents=True)
    (SUBMIT_DIR / "data").mkdir()
    (SUBMIT_DIR / ".git").mkdir()  # hidden: not listed
    (SUBMIT_DIR / "notes.txt").write_text("not a config: not listed\n")
    (SUBMIT_DIR / "configs" / "bad.yaml").write_text("lora_rank: eight\nepoch: 3\nlearning_rate: -1\n")
    (SUBMIT_DIR / "configs" / "good.yml").write_text("lora_rank: 8\n")
    yield SUBMIT_DIR
    shutil.rmtree(SUBMIT_DIR, ignore_errors=True)


def test_submit_with_problems(snap_compare, submit_dir: Path) -> None:
    async def pick_bad_config(pilot: Pilot) -> None:
        await settled(pilot)
        await pilot.press("s")
        await wait_until(pilot, lambda: isinstance(pilot.app.screen, SubmitScreen), "the submit screen")
        await pick_in_tree(pilot, pilot.app.screen.query_one(ConfigTree), Path("configs/bad.yaml"))
        await wait_until(pilot, lambda: "6 problems" in screen_text(pilot.app), "the verdict")

    assert snap_compare(fake_app(submit_dir), terminal_size=SIZE, run_before=pick_bad_config)


def test_captions_after_captioning_with_an_unsaved_edit(snap_compare) -> None:
    async def caption_and_edit(pilot: Pilot) -> None:
        await settled(pilot)
        await pilot.press("t")
        await wait_until(pilot, lambda: isinstance(pilot.app.screen, CaptionsScreen), "the captions screen")
        await pilot.press(*"data/watercolor")
        await pilot.click("#caption-button")
        await wait_until(
            pilot,
            lambda: "done: 3 captioned, 1 kept" in screen_text(pilot.app) and "csv · lorad" in screen_text(pilot.app),
            "the captions listed",
        )
        await pilot.press("down", "e", "end", *" under a grey sky", "enter")
        await wait_until(pilot, lambda: "✎ not saved" in screen_text(pilot.app), "the edit")
        pilot.app.clear_notifications()

    assert snap_compare(fake_app(), terminal_size=SIZE, run_before=caption_and_edit)


def test_captions_at_80x24(snap_compare) -> None:
    async def listed(pilot: Pilot) -> None:
        await settled(pilot)
        await pilot.press("t")
        await wait_until(pilot, lambda: isinstance(pilot.app.screen, CaptionsScreen), "the captions screen")
        await pilot.press(*"data/watercolor", "enter")
        await wait_until(pilot, lambda: "4 images" in screen_text(pilot.app), "the captions listed")

    assert snap_compare(fake_app(), terminal_size=(80, 24), run_before=listed)


def test_watches(snap_compare, submit_dir: Path) -> None:
    async def open_watches(pilot: Pilot) -> None:
        await settled(pilot)
        await pilot.press("w")
        await wait_until(pilot, lambda: isinstance(pilot.app.screen, WatchesScreen), "the watches screen")
        await pilot.click("#watch-table", offset=(4, 2))  # the second row (under the header): the watch in error
        await wait_until(pilot, lambda: "permission denied" in screen_text(pilot.app), "the error's detail")

    assert snap_compare(fake_app(submit_dir), terminal_size=SIZE, run_before=open_watches)


def test_finished_job_at_80x24(snap_compare) -> None:
    """The outputs block of a finished job in a small terminal: long paths wrap indented."""

    async def open_finished_job(pilot: Pilot) -> None:
        await settled(pilot)
        await pilot.press("down", "down", "enter")  # the third row: the finished job
        await wait_until(
            pilot,
            lambda: isinstance(pilot.app.screen, JobDetailScreen) and "✓ LoRA written" in screen_text(pilot.app),
            "the finished job's detail",
        )

    assert snap_compare(fake_app(), terminal_size=(80, 24), run_before=open_finished_job)


def test_lora_inspect(snap_compare) -> None:
    """A finished job's kohya file inspected (i on its detail): summary, problems, the per-block table."""

    async def inspect_finished_job(pilot: Pilot) -> None:
        await settled(pilot)
        await pilot.press("down", "down", "enter")  # the third row: the finished job
        await wait_until(pilot, lambda: "✓ LoRA written" in screen_text(pilot.app), "the finished job's detail")
        await pilot.press("i")
        await wait_until(
            pilot,
            lambda: isinstance(pilot.app.screen, LoraInspectScreen) and "te layer 0 " in screen_text(pilot.app),
            "the inspect report",
        )

    assert snap_compare(fake_app(), terminal_size=SIZE, run_before=inspect_finished_job)


# --- sample images (issue 16) -------------------------------------------------------------------

SAMPLE_PROMPTS = ("a watercolor lake at dawn", "a harbour with boats, soft washes")


def sample_png(path: Path, hue: int, step: int) -> None:
    """A small deterministic picture: a gradient whose colours change with the step."""
    from PIL import Image

    image = Image.new("RGB", (32, 32))
    image.putdata(
        [((x * 8 + hue) % 256, (y * 8 + step * 3) % 256, (hue + step * 40) % 256) for y in range(32) for x in range(32)]
    )
    image.save(path)


class SampledClient(FakeClient):
    """The running job has drawn its two prompts at steps 0 (the baseline), 20 and 40; it answers sample/save now."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder  # where the PNGs are (or, for a daemon elsewhere, would be)
        self.asked: list[tuple[str, str]] = []

    def watch_job(self, job_id: str, after_seq: int = 0, *, history_only: bool = False) -> JobStream:
        stream = super().watch_job(job_id, after_seq, history_only=history_only)
        if job_id != RUNNING.job_id:
            return stream
        last = len(running_history()) - 1
        shots = [
            WatchJobResponse(
                event=JobEvent(
                    job_id=job_id,
                    seq=last + 1 + n,
                    time=stamp(100),
                    sample_image=SampleImage(
                        step=step, prompt_index=index, prompt=SAMPLE_PROMPTS[index], seed=42 + index,
                        path=str(self.folder / f"watercolor_style_{step:08d}_{index:02d}_{42 + index}.png"),
                        width=32, height=32,
                    ),
                )
            )
            for n, (step, index) in enumerate((s, i) for s in (0, 20, 40) for i in (0, 1))
        ]  # fmt: skip
        return FakeStream([*stream.items, *(s for s in shots if s.event.seq > after_seq)])

    def sample_now(self, job_id: str) -> list[JobEvent]:
        self.asked.append(("sample", job_id))
        return [JobEvent(sample_image=SampleImage(step=60, prompt_index=0, prompt="p", path="/x.png"))]

    def save_now(self, job_id: str) -> list[JobEvent]:
        self.asked.append(("save", job_id))
        return [JobEvent(checkpoint_saved=CheckpointSaved(step=60, path="/ck/step-000060"))]


@pytest.fixture
def sample_files(tmp_path: Path) -> Path:
    """The job's PNGs (their paths are not on screen when the images are drawn, so tmp_path is fine)."""
    folder = tmp_path / "samples"
    folder.mkdir()
    for step in (0, 20, 40):
        for index in (0, 1):
            sample_png(folder / f"watercolor_style_{step:08d}_{index:02d}_{42 + index}.png", 90 * index, step)
    return folder


def sampled_app(client: SampledClient) -> LoradApp:
    return LoradApp(connect=lambda: client, clock=lambda: NOW, refresh_seconds=3600)


async def open_sampled_job(pilot: Pilot) -> None:
    await settled(pilot)
    await pilot.press("down", "enter")  # the second row: the running job
    await wait_until(
        pilot,
        lambda: (
            isinstance(pilot.app.screen, JobDetailScreen)
            and "step 60/100" in screen_text(pilot.app)
            and "Samples · step 40 · 3 of 3" in screen_text(pilot.app)
            and "#1 a harbour" in screen_text(pilot.app)
        ),
        "the newest samples",
    )


def test_job_detail_with_samples_in_half_blocks(snap_compare, sample_files: Path) -> None:
    """The newest sampled step's images, drawn with Unicode half blocks (what a terminal without Kitty or
    Sixel graphics shows; a test has no terminal, so this is what textual-image picks here too)."""
    from lorad_tui.widgets.sample_gallery import image_mode

    assert image_mode() == "halfblock"
    assert snap_compare(sampled_app(SampledClient(sample_files)), terminal_size=(100, 40), run_before=open_sampled_job)


def test_keys_step_through_samples_and_ask_the_running_job(sample_files: Path) -> None:
    asyncio.run(step_through_samples(sample_files))


async def step_through_samples(folder: Path) -> None:
    from textual_image.widget import HalfcellImage

    client = SampledClient(folder)
    app = sampled_app(client)
    async with app.run_test(size=(100, 40)) as pilot:
        await open_sampled_job(pilot)
        assert len(app.screen.query(HalfcellImage)) == 2
        await pilot.press("left_square_bracket")
        await wait_until(pilot, lambda: "Samples · step 20 · 2 of 3" in screen_text(app), "the step before")
        await pilot.press("left_square_bracket", "left_square_bracket")  # stops at the oldest: the baseline
        await wait_until(pilot, lambda: "before training (no LoRA) · 1 of 3" in screen_text(app), "the baseline")
        await pilot.press("right_square_bracket", "right_square_bracket")
        await wait_until(pilot, lambda: "Samples · step 40 · 3 of 3" in screen_text(app), "the newest again")
        notes: list[str] = []
        app.notify = lambda message, **_: notes.append(message)  # type: ignore[method-assign]
        await pilot.press("s")
        await wait_until(pilot, lambda: ("sample", RUNNING.job_id) in client.asked, "sample now")
        await pilot.press("w")
        await wait_until(pilot, lambda: ("save", RUNNING.job_id) in client.asked, "save now")
        await wait_until(pilot, lambda: any("checkpoint saved at step 60" in n for n in notes), "the answer told")


def test_an_image_not_on_this_disk_shows_its_path() -> None:
    """A daemon on another machine: the PNG is not here, so the path is what the detail can show."""
    asyncio.run(paths_instead_of_images())


async def paths_instead_of_images() -> None:
    client = SampledClient(Path("/nonexistent/lorad-samples"))  # the PNGs are not on this disk
    app = sampled_app(client)
    async with app.run_test(size=(100, 40)) as pilot:
        await open_sampled_job(pilot)
        await wait_until(pilot, lambda: screen_text(app).count("daemon's disk)") == 2, "the two paths")
        assert "#0 a watercolor lake at" in screen_text(app)
