"""Shared fixtures: an offline environment, a tiny random SD model, and a small captioned dataset."""

from __future__ import annotations

import os

# Before anything imports huggingface_hub: tests never touch the network.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
# Workers (pytest-xdist) and the daemons/CLIs tests start share 2 cores: more threads per process
# only oversubscribe them (OpenMP threads spinning against each other slow training tenfold).
os.environ["OMP_NUM_THREADS"] = "1"

import random
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
import yaml
from PIL import Image, ImageDraw

if TYPE_CHECKING:
    from lorad.models.registry import ModelRegistry
    from lorad.server.daemon import RunningDaemon
    from lorad_client import LoradClient

# The config from the lora-scripts article, verbatim but for base_model.
SEED_YAML = """\
train_data_dir: "./data/style_train"
metadata_path: "./data/style_train/metadata.csv"
base_model: "{base_model}"
lora_rank: 8
unet_target_modules: ["q_proj", "v_proj"]
batch_size: 4
epochs: 10
learning_rate: 2e-4
output_dir: "./output/my_style_lora"
save_steps: 100
"""

COLOURS = {"red": (220, 40, 40), "green": (40, 180, 60), "blue": (40, 60, 220), "yellow": (230, 210, 40)}
SHAPES = ("circle", "square")


@pytest.fixture(autouse=True, scope="session")
def _quiet_single_thread() -> None:
    # pytest-xdist runs one worker per core; more torch threads per worker only oversubscribe.
    import torch

    torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _lorad_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    home = tmp_path / "lorad-home"
    monkeypatch.setenv("LORAD_HOME", str(home))
    # Never reach a real daemon a developer may be running on the default port.
    monkeypatch.setenv("LORAD_ADDRESS", f"unix://{tmp_path}/no-daemon.sock")
    return home


@pytest.fixture(scope="session")
def tiny_sd(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random SD1-style model in diffusers layout (built locally, offline)."""
    from lorad.models.tiny import build_tiny_sd

    return build_tiny_sd(tmp_path_factory.mktemp("models") / "tiny-sd1", version="sd1", seed=0)


def draw_image(path: Path, colour: str, shape: str, size: tuple[int, int] = (64, 64), seed: int = 0) -> None:
    """A small synthetic picture: a coloured shape on a noisy background."""
    rng = random.Random(seed)
    img = Image.new("RGB", size, tuple(rng.randint(0, 255) for _ in range(3)))
    draw = ImageDraw.Draw(img)
    w, h = size
    box = (w // 4, h // 4, 3 * w // 4, 3 * h // 4)
    (draw.ellipse if shape == "circle" else draw.rectangle)(box, fill=COLOURS[colour])
    img.save(path)


def make_dataset(root: Path, count: int = 8, *, csv: bool = True, size: tuple[int, int] = (64, 64)) -> Path:
    """``count`` images in ``root`` with captions in metadata.csv (or .txt sidecars)."""
    root.mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(count):
        colour, shape = list(COLOURS)[i % len(COLOURS)], SHAPES[i % len(SHAPES)]
        name = f"img_{i:02d}.png"
        draw_image(root / name, colour, shape, size, seed=i)
        caption = f"mystyle, a {colour} {shape}, simple background"
        if csv:
            rows.append(f"{name},{caption}")
        else:
            (root / f"img_{i:02d}.txt").write_text(caption)
    if csv:
        (root / "metadata.csv").write_text("file,caption\n" + "\n".join(rows) + "\n")
    return root


@pytest.fixture
def dataset(tmp_path: Path) -> Path:
    return make_dataset(tmp_path / "data" / "style_train")


def write_config(path: Path, **values: object) -> Path:
    """Write a YAML config file with the given keys."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(
        yaml.safe_dump({k: str(v) if isinstance(v, Path) else v for k, v in values.items()}, sort_keys=False)
    )
    return path


def tiny_train_values(tiny_sd: Path, data: Path, out: Path, **overrides: object) -> dict[str, object]:
    """Config keys for a fast CPU run on the tiny model (64 px images, a few steps)."""
    values: dict[str, object] = {
        "train_data_dir": data,
        "metadata_path": data / "metadata.csv",
        "base_model": tiny_sd,
        "lora_rank": 4,
        "unet_target_modules": ["q_proj", "v_proj"],
        "batch_size": 2,
        "epochs": 1,
        "learning_rate": "1e-3",
        "output_dir": out,
        "resolution": 64,
        "min_bucket_reso": 64,
        "max_bucket_reso": 128,
        "bucket_reso_steps": 16,
        "device": "cpu",
    }
    values.update(overrides)
    return values


@pytest.fixture
def short_dir() -> Iterator[Path]:
    # Unix socket paths are limited to ~100 bytes; pytest's tmp_path can be longer.
    path = Path(tempfile.mkdtemp(prefix="lorad-"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


def run_daemon(home: Path, **settings: object) -> RunningDaemon:
    """A real daemon in this process on a free port and a Unix socket in ``home``; its jobs run in worker
    processes (``in_process=True``: in threads of this process, where a test can look at the resident
    models; ``cpu_workers=2``: two CPU workers)."""
    from lorad.server.daemon import start_daemon
    from lorad.server.settings import daemon_settings

    return start_daemon(daemon_settings(["127.0.0.1:0", f"unix:{home}/lorad.sock"], home=home, **settings))


@pytest.fixture
def daemon(short_dir: Path, request: pytest.FixtureRequest) -> Iterator[RunningDaemon]:
    """A daemon whose jobs run in worker processes, as `lorad serve`'s do; a test marked ``in_process``
    gets its workers in this process instead (see :func:`worker_registry`)."""
    running = run_daemon(short_dir, in_process=request.node.get_closest_marker("in_process") is not None)
    yield running
    running.stop(grace=0)


def worker_registry(daemon: RunningDaemon, index: int = 0) -> ModelRegistry:
    """The resident models of an in-process daemon's worker ``index`` (its base models live there)."""
    return daemon.service.dispatcher.handles[index].host.registry


@pytest.fixture
def client(daemon: RunningDaemon) -> Iterator[LoradClient]:
    from lorad_client import LoradClient

    with LoradClient.connect(daemon.addresses[0], home=daemon.settings.home) as connected:
        yield connected


# --- LLM fixtures ---------------------------------------------------------------------------------
@pytest.fixture(scope="session")
def tiny_llm(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random Llama with a locally trained tokenizer (no pad token) and a chat template."""
    from lorad.models.tiny_llm import build_tiny_llm

    return build_tiny_llm(tmp_path_factory.mktemp("models") / "tiny-llama", seed=0)


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    """Write ``rows`` as JSON Lines."""
    import json

    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def tiny_llm_values(tiny_llm: Path, data: Path, out: Path, **overrides: object) -> dict[str, object]:
    """LLM config keys for a fast CPU run on the tiny Llama (a few dozen steps at a high rate)."""
    values: dict[str, object] = {
        "train_data": data,
        "base_model": tiny_llm,
        "output_dir": out,
        "device": "cpu",
        "max_train_steps": 30,
        "learning_rate": "1e-2",
        "lora_dropout": 0.0,
        "batch_size": 4,
        "lr_scheduler": "constant",
        "max_seq_len": 64,
    }
    values.update(overrides)
    return values
