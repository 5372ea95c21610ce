"""A scripted daemon for the TUI tests: fixed jobs, histories, captions and watches (no real times, ids
or paths), and the app wired to it."""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path

from google.protobuf.timestamp_pb2 import Timestamp

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
    DataReport,
    JobQueued,
    JobStarted,
    LatentsCached,
    LogLine,
    ModelLoaded,
    Step,
    TrainingStarted,
)
from lorad_api.v1.lora_tools_pb2 import InspectLoraResponse, LoraBlock, TagCount
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


def pixel_art_report() -> InspectLoraResponse:
    """InspectLora's report on the finished job's kohya file: an SD 1.5 LoRA of rank 16, alpha 8, as
    kohya's default network adapts it (attention and feed-forward of every transformer, CLIP layers)."""
    blocks = [LoraBlock(block=f"te layer {i}", modules=6, ranks=[16], alphas=[8.0]) for i in range(12)]
    blocks += [LoraBlock(block=f"unet down_blocks.{i}", modules=24, ranks=[16], alphas=[8.0]) for i in range(3)]
    blocks.append(LoraBlock(block="unet mid_block", modules=12, ranks=[16], alphas=[8.0]))
    blocks += [LoraBlock(block=f"unet up_blocks.{i}", modules=36, ranks=[16], alphas=[8.0]) for i in (1, 2, 3)]
    return InspectLoraResponse(
        path=DONE.outputs["kohya"],
        layout="kohya",
        family="sd1",
        family_title="Stable Diffusion 1.x",
        base_version="sd_v1",
        family_evidence="key names and metadata ss_base_model_version = sd_v1",
        modules=264,
        network_types={"lora": 264},
        parameters=9_437_184,
        precision="fp16",
        ranks=[16],
        alphas=[8.0],
        trigger_words=["pixelart"],
        top_tags=[TagCount(tag="pixelart", count=40), TagCount(tag="1girl", count=22), TagCount(tag="sword", count=9)],
        blocks=blocks,
        metadata={
            "ss_output_name": "pixel_art",
            "ss_base_model_version": "sd_v1",
            "ss_network_module": "networks.lora",
            "ss_network_dim": "16",
            "ss_network_alpha": "8",
            "ss_training_comment": "trained with lorad; trigger word: pixelart",
        },
    )


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

    # LoraToolsService: the finished job's LoRA

    def inspect_lora(self, path: str | Path, *, base_dir: str | Path | None = None) -> InspectLoraResponse:
        assert str(path) == DONE.outputs["kohya"], path
        return pixel_art_report()

    def close(self) -> None:
        pass


def fake_app(base_dir: Path | None = None) -> LoradApp:
    def connect() -> DaemonClient:
        return FakeClient()

    # One status refresh only (the next would be an hour away): nothing moves during a snapshot.
    return LoradApp(connect=connect, clock=lambda: NOW, refresh_seconds=3600, base_dir=base_dir)
