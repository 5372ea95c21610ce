"""Snapshot tests of the TUI's screens, against a fake daemon client with fixed data and a fixed clock.

Nothing here varies between runs (no real times, ids, temporary paths or durations), so a changed
snapshot means a changed screen. Update after an intended change with
``pytest tests/test_tui_snapshots.py --snapshot-update`` and look at the SVGs.
"""

from __future__ import annotations

import asyncio
import math
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from google.protobuf.timestamp_pb2 import Timestamp
from textual.pilot import Pilot

from lorad_api.v1.caption_pb2 import (
    CAPTION_FORMAT_CSV,
    CAPTION_SOURCE_CSV,
    CAPTION_SOURCE_SIDECAR,
    CAPTION_STATUS_CAPTIONED,
    CAPTION_STATUS_KEPT,
    CaptionerReady,
    CaptionFinished,
    CaptionImagesResponse,
    CaptionPlanned,
    CaptionRow,
    ImageCaption,
    ListCaptionsResponse,
    SetCaptionsResponse,
)
from lorad_api.v1.jobs_pb2 import (
    CheckpointSaved,
    DataReport,
    JobQueued,
    JobStarted,
    LatentsCached,
    LogLine,
    ModelLoaded,
    SampleImage,
    Step,
    TrainingStarted,
)
from lorad_api.v1.models_pb2 import ResidentModel
from lorad_api.v1.system_pb2 import Device, GetStatusResponse
from lorad_api.v1.watch_pb2 import (
    WATCH_MODE_CONTINUE,
    WATCH_MODE_RETRAIN,
    WATCH_STATE_ERROR,
    WATCH_STATE_IDLE,
    FollowWatchesResponse,
    Watch,
    WatchList,
    WatchPolicy,
)
from lorad_client import (
    JOB_STATE_FAILED,
    JOB_STATE_QUEUED,
    JOB_STATE_RUNNING,
    JOB_STATE_SUCCEEDED,
    Job,
    JobEvent,
    Progress,
    WatchJobResponse,
)
from lorad_tui import LoradApp
from lorad_tui.connection import DaemonClient, JobStream
from lorad_tui.screens.captions import CaptionsScreen
from lorad_tui.screens.job_detail import JobDetailScreen
from lorad_tui.screens.submit import ConfigTree, SubmitScreen
from lorad_tui.screens.watches import WatchesScreen
from tests.test_tui_helpers import pick_in_tree, screen_text, wait_until

NOW = 1_750_000_000.0  # the fixed "now" of every snapshot
SIZE = (100, 32)
SOCKET = "unix:///home/ada/.local/share/lorad/lorad.sock"
# A fixed folder (not tmp_path, whose name changes every run) for the submit screen's file tree.
SUBMIT_DIR = Path("/tmp/lorad-tui-snapshot")


def stamp(seconds_ago: float) -> Timestamp:
    return Timestamp(seconds=int(NOW - seconds_ago))


def loss_at(step: int) -> float:
    """A plausible, noisy, falling loss curve (deterministic)."""
    return 0.08 + 0.12 * math.exp(-step / 25) + 0.03 * math.sin(step * 1.7) * math.cos(step * 0.3)


RUNNING = Job(
    job_id="a1b2c3d4e5",
    name="watercolor_style",
    state=JOB_STATE_RUNNING,
    created_at=stamp(400),
    started_at=stamp(390),
    output_dir="/home/ada/loras/watercolor_style",
    source_name="configs/watercolor.yaml",
    progress=Progress(
        step=60, total_steps=100, epoch=3, loss=loss_at(60), lr=1e-4, steps_per_second=2.5, eta_seconds=16
    ),
)
QUEUED = Job(job_id="f6g7h8i9j0", name="ink_portraits", state=JOB_STATE_QUEUED, created_at=stamp(120), queue_position=1)
# Long output paths: at 80 columns they must wrap under their own column, not under the labels.
DONE_DIR = "/home/ada/projects/game_assets/loras/pixel_art"
DONE = Job(
    job_id="k1l2m3n4o5",
    name="pixel_art",
    state=JOB_STATE_SUCCEEDED,
    created_at=stamp(7200),
    started_at=stamp(7100),
    finished_at=stamp(6000),
    output_dir=DONE_DIR,
    outputs={"kohya": f"{DONE_DIR}/pixel_art.safetensors", "diffusers": f"{DONE_DIR}/pytorch_lora_weights.safetensors"},
    progress=Progress(step=400, total_steps=400, epoch=10, loss=0.0712, lr=1e-4, steps_per_second=3.1),
)
FAILED = Job(
    job_id="p6q7r8s9t0",
    name="big_batch",
    state=JOB_STATE_FAILED,
    created_at=stamp(90000),
    started_at=stamp(89990),
    finished_at=stamp(89900),
    error="CUDA out of memory",
    hint="lower batch_size or resolution, or set gradient_checkpointing: true",
)


def running_history() -> list[WatchJobResponse]:
    """What WatchJob sends for the running job: its state, then its events so far."""
    kinds: list[dict[str, object]] = [
        {"queued": JobQueued(queue_position=1)},
        {"started": JobStarted(attempt=1, device="cuda:0")},
        {
            "data_report": DataReport(
                images_found=24,
                images_used=23,
                images_skipped=1,
                text=(
                    "Training data: /home/ada/data/watercolor\n  24 image files found, 23 used, 1 skipped\n"
                    "  captions: 23 from the metadata CSV, 0 from sidecar files, 0 generated\n"
                    "  buckets: 512x512 (15), 448x576 (8)"
                ),
            )
        },
        {
            "model_loaded": ModelLoaded(
                source="/home/ada/models/v1-5-pruned.safetensors", model_version="sd1", seconds=4.2
            )
        },
        {"latents_cached": LatentsCached(cached=0, encoded=23, seconds=6)},
        {
            "training_started": TrainingStarted(
                total_steps=100, epochs=5, trainable_params=797184, device="cuda:0", precision="bf16"
            )
        },
        {"log": LogLine(message="bf16 autocast on cuda:0", level="info")},
    ]
    kinds += [
        {
            "step": Step(
                progress=Progress(
                    step=s,
                    total_steps=100,
                    epoch=1 + (s - 1) // 20,
                    loss=loss_at(s),
                    lr=1e-4 * min(1.0, s / 10),
                    steps_per_second=2.5,
                    eta_seconds=(100 - s) / 2.5,
                )
            )
        }
        for s in range(1, 61)
    ]
    events = [
        WatchJobResponse(event=JobEvent(job_id=RUNNING.job_id, seq=i, time=stamp(400 - 5 * i), **kind))
        for i, kind in enumerate(kinds, start=1)
    ]
    return [WatchJobResponse(job=RUNNING), *events]


CAPTION_ROWS = [
    CaptionRow(
        path="autumn_lake.png",
        caption="ohwx, a watercolor painting of a lake with autumn trees",
        source=CAPTION_SOURCE_CSV,
        generated=True,
    ),
    CaptionRow(
        path="harbour_boats.jpg",
        caption="ohwx, boats in a small harbour at dawn, soft washes of blue",
        source=CAPTION_SOURCE_CSV,
    ),
    CaptionRow(
        path="portraits/old_fisherman_with_a_very_long_file_name.png",
        caption="ohwx, a watercolor portrait of an old fisherman",
        source=CAPTION_SOURCE_CSV,
        generated=True,
    ),
    CaptionRow(path="sketch.webp", caption="ohwx, a pencil sketch of a bridge", source=CAPTION_SOURCE_SIDECAR),
]


def caption_run() -> list[CaptionImagesResponse]:
    """What CaptionImages sends for the folder above: one kept, three captioned."""
    items = [
        CaptionImagesResponse(
            planned=CaptionPlanned(
                folder="/home/ada/data/watercolor", images_found=4, to_caption=3, to_keep=1, format=CAPTION_FORMAT_CSV
            )
        ),
        CaptionImagesResponse(
            image=ImageCaption(
                path="harbour_boats.jpg", status=CAPTION_STATUS_KEPT, caption=CAPTION_ROWS[1].caption, done=1, total=4
            )
        ),
        CaptionImagesResponse(
            captioner_ready=CaptionerReady(captioner="wd14", model_version="wd14 (9083 tags)", seconds=2.5)
        ),
    ]
    items += [
        CaptionImagesResponse(
            image=ImageCaption(path=row.path, status=CAPTION_STATUS_CAPTIONED, caption=row.caption, done=done, total=4)
        )
        for done, row in enumerate([CAPTION_ROWS[0], *CAPTION_ROWS[2:]], start=2)
    ]
    items.append(
        CaptionImagesResponse(
            finished=CaptionFinished(
                folder="/home/ada/data/watercolor",
                images_found=4,
                captioned=3,
                kept=1,
                seconds=4.25,
                format=CAPTION_FORMAT_CSV,
                written_to="/home/ada/data/watercolor/metadata.csv",
            )
        )
    )
    return items


WATCHES = [
    Watch(
        watch_id="w-1",
        folder="/home/ada/data/watercolor",
        config_path="/home/ada/configs/watercolor.yaml",
        policy=WatchPolicy(quiet_seconds=10, min_new_images=1, mode=WATCH_MODE_CONTINUE, continue_steps=200),
        state=WATCH_STATE_IDLE,
        images_seen=24,
        new_images=0,
        last_job_id=RUNNING.job_id,
        version=3,
        latest_output="/home/ada/loras/watercolor_style/watercolor_style_v3.safetensors",
    ),
    Watch(
        watch_id="w-2",
        folder="/mnt/nas/photos/ink",
        config_path="/home/ada/configs/ink.yaml",
        policy=WatchPolicy(quiet_seconds=30, min_new_images=5, mode=WATCH_MODE_RETRAIN, polling=True),
        state=WATCH_STATE_ERROR,
        images_seen=0,
        error="/mnt/nas/photos/ink cannot be read: permission denied",
        hint="give the daemon's user read access to the folder, then add the watch again",
    ),
]


class FakeStream:
    """A stream (WatchJob, CaptionImages, FollowWatches) that replays fixed messages, then ends."""

    def __init__(self, items: list) -> None:
        self.items = items

    def __iter__(self) -> Iterator:
        return iter(self.items)

    def cancel(self) -> None:
        pass


class FakeClient:
    """Answers like a daemon with one running, one queued, one finished and one failed job."""

    def status(self) -> GetStatusResponse:
        return GetStatusResponse(
            version="0.1.0",
            pid=4242,
            uptime_seconds=3725,
            started_at=stamp(3725),
            queue_length=1,
            running_job_id=RUNNING.job_id,
            addresses=[SOCKET, "127.0.0.1:47860"],
            home="/home/ada/.local/share/lorad",
            resident_models=1,
            devices=[
                Device(
                    name="cuda:0",
                    description="NVIDIA GeForce RTX 4090",
                    memory_total_bytes=24 * 2**30,
                    memory_used_bytes=9 * 2**30,
                )
            ],
        )

    def list_models(self) -> list[ResidentModel]:
        return [
            ResidentModel(
                model_id="m-5f1e",
                source="/home/ada/models/v1-5-pruned.safetensors",
                model_version="sd1",
                device="cuda:0",
                dtype="bfloat16",
                memory_bytes=2_100_000_000,
                in_use=True,
                keep_alive_seconds_left=1800,
            ),
            ResidentModel(
                model_id="m-77ab",
                source="/home/ada/models/anything-v4.safetensors",
                model_version="sd1",
                device="cuda:0",
                dtype="bfloat16",
                memory_bytes=2_100_000_000,
                keep_alive_seconds_left=754,
            ),
        ]

    def list_jobs(self, states: object = (), limit: int = 0) -> list[Job]:
        return [QUEUED, RUNNING, DONE, FAILED]

    def get_job(self, job_id: str) -> Job:
        return {job.job_id: job for job in self.list_jobs()}[job_id]

    def watch_job(self, job_id: str, after_seq: int = 0, *, history_only: bool = False) -> JobStream:
        items = running_history() if job_id == RUNNING.job_id else [WatchJobResponse(job=self.get_job(job_id))]
        return FakeStream([i for i in items if i.WhichOneof("item") == "job" or i.event.seq > after_seq])

    def submit_training(self, config_yaml: str, *, base_dir: str | Path, source_name: str = "") -> Job:
        raise AssertionError("the snapshot tests submit nothing")

    def cancel_job(self, job_id: str) -> Job:
        raise AssertionError("the snapshot tests cancel nothing")

    def health(self, service: str = "") -> str:
        return "SERVING"

    # CaptionService: a folder of four images, captioned with WD14 (three new, one kept)

    def caption_images(
        self, folder: str | Path, *, base_dir: str | Path, captioner: int = 0, model: str = ""
    ) -> FakeStream:
        return FakeStream(caption_run())

    def list_captions(self, folder: str | Path, *, base_dir: str | Path) -> ListCaptionsResponse:
        return ListCaptionsResponse(
            folder="/home/ada/data/watercolor",
            rows=CAPTION_ROWS,
            format=CAPTION_FORMAT_CSV,
            written_to="/home/ada/data/watercolor/metadata.csv",
        )

    def set_captions(self, folder: str | Path, edits: object, *, base_dir: str | Path) -> SetCaptionsResponse:
        raise AssertionError("the snapshot tests save nothing")

    # WatchService: two watched folders, one of them in error

    def list_watches(self) -> list[Watch]:
        return list(WATCHES)

    def follow_watches(self) -> FakeStream:
        return FakeStream([FollowWatchesResponse(snapshot=WatchList(watches=WATCHES))])

    def add_watch(self, folder: str, config_path: str, **policy: object) -> Watch:
        raise AssertionError("the snapshot tests add no watch")

    def remove_watch(self, watch: str, *, base_dir: str | None = None) -> Watch:
        raise AssertionError("the snapshot tests remove no watch")

    def close(self) -> None:
        pass


def fake_app(base_dir: Path | None = None) -> LoradApp:
    def connect() -> DaemonClient:
        return FakeClient()

    # One status refresh only (the next would be an hour away): nothing moves during a snapshot.
    return LoradApp(connect=connect, clock=lambda: NOW, refresh_seconds=3600, base_dir=base_dir)


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
