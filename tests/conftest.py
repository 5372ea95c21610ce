"""Shared fixtures: an offline environment, a tiny random SD model, and a small captioned dataset."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from lorad.server.daemon import RunningDaemon
from lorad_client import LoradClient
from tests.support.daemons import run_daemon
from tests.support.datasets import COLOURS, SHAPES, draw_image, make_dataset

# Before anything imports huggingface_hub: tests never touch the network.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
# Workers (pytest-xdist) and the daemons/CLIs tests start share 2 cores: more threads per process
# only oversubscribe them (OpenMP threads spinning against each other slow training tenfold).
os.environ["OMP_NUM_THREADS"] = "1"

import tempfile
from collections.abc import Iterator
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from lorad.models.tiny_flux import FluxFiles
    from lorad.server.daemon import RunningDaemon
    from lorad_client import LoradClient


@pytest.fixture(autouse=True, scope="session")
def _quiet_single_thread() -> None:
    # pytest-xdist runs one worker per core; more torch threads per worker only oversubscribe.
    import torch

    torch.set_num_threads(1)


class _NoTrainingHere:
    """A family plug-in that notes each run it starts: what a test not marked ``slow`` gets."""

    def __init__(self, plugin: object, started: list[str]) -> None:
        self._plugin, self._started = plugin, started

    def __getattr__(self, name: str) -> object:
        return getattr(self._plugin, name)

    def start(self, config: object, *args: object, **kwargs: object) -> object:
        # Recorded and let through: a refusal here would leave a test waiting on a job that never steps.
        self._started.append(getattr(config, "model_family", "?"))
        return self._plugin.start(config, *args, **kwargs)


@pytest.fixture(autouse=True)
def _training_tests_are_marked_slow(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """`just test-fast` runs the tests not marked slow; a test that trains a model in this process (directly,
    or through an in-process daemon) must carry the marker, or it fails here."""
    if request.node.get_closest_marker("slow"):
        yield
        return
    from lorad.families import registry

    started: list[str] = []
    real = registry.load_plugin
    monkeypatch.setattr(registry, "load_plugin", lambda name: _NoTrainingHere(real(name), started))
    yield
    assert not started, f"{request.node.nodeid} trains a model ({', '.join(started)}): mark it @pytest.mark.slow"


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


@pytest.fixture
def dataset(tmp_path: Path) -> Path:
    return make_dataset(tmp_path / "data" / "style_train")


@pytest.fixture
def short_dir() -> Iterator[Path]:
    # Unix socket paths are limited to ~100 bytes; pytest's tmp_path can be longer.
    path = Path(tempfile.mkdtemp(prefix="lorad-"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def daemon(short_dir: Path, request: pytest.FixtureRequest) -> Iterator[RunningDaemon]:
    """A daemon whose jobs run in worker processes, as `lorad serve`'s do; a test marked ``in_process``
    gets its workers in this process instead (see :func:`worker_registry`)."""
    running = run_daemon(short_dir, in_process=request.node.get_closest_marker("in_process") is not None)
    yield running
    running.stop(grace=0)


@pytest.fixture
def client(daemon: RunningDaemon) -> Iterator[LoradClient]:
    from lorad_client import LoradClient

    with LoradClient.connect(daemon.addresses[0], home=daemon.settings.home) as connected:
        yield connected


# --- SDXL fixtures --------------------------------------------------------------------------------
@pytest.fixture(scope="session")
def tiny_sdxl(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random SDXL model in diffusers layout (built locally, offline)."""
    from lorad.models.tiny_sdxl import build_tiny_sdxl

    return build_tiny_sdxl(tmp_path_factory.mktemp("models") / "tiny-sdxl", seed=0)


# --- Hugging Face cache ---------------------------------------------------------------------------
@pytest.fixture
def hf_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty Hugging Face cache per test, so a real cache on this machine cannot change results."""
    import huggingface_hub.constants

    cache = tmp_path / "hf-cache"
    cache.mkdir()
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    return cache


# --- FLUX fixtures --------------------------------------------------------------------------------
@pytest.fixture(scope="session")
def tiny_flux(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The tiny FLUX.1 dev and schnell models as diffusers folders, by variant."""
    from lorad.models.tiny_flux import build_tiny_flux

    root = tmp_path_factory.mktemp("flux")
    return {variant: build_tiny_flux(root / variant, variant=variant) for variant in ("dev", "schnell")}


@pytest.fixture(scope="session")
def tiny_flux_files(tiny_flux: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> FluxFiles:
    """The tiny dev model as ComfyUI/Forge users keep FLUX: the transformer as one BFL file with ComfyUI's
    prefix, and separate clip_l / t5xxl / ae files (a :class:`lorad.models.tiny_flux.FluxFiles`)."""
    from lorad.models.tiny_flux import write_flux_files

    return write_flux_files(tiny_flux["dev"], tmp_path_factory.mktemp("flux-files"), comfy_prefix=True)


# --- LLM fixtures ---------------------------------------------------------------------------------
@pytest.fixture(scope="session")
def tiny_llm(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random Llama with a locally trained tokenizer (no pad token) and a chat template."""
    from lorad.models.tiny_llm import build_tiny_llm

    return build_tiny_llm(tmp_path_factory.mktemp("models") / "tiny-llama", seed=0)


@pytest.fixture(scope="module")
def stock(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Finished images to copy into watched folders, each with its caption sidecar."""
    root = tmp_path_factory.mktemp("stock")
    for i in range(30):
        colour, shape = list(COLOURS)[i % len(COLOURS)], SHAPES[i % len(SHAPES)]
        draw_image(root / f"img_{i:02d}.png", colour, shape, (64, 64), seed=i)
        (root / f"img_{i:02d}.txt").write_text(f"mystyle, a {colour} {shape}")
    return root


@pytest.fixture
def use_daemon(daemon: RunningDaemon, monkeypatch: pytest.MonkeyPatch) -> RunningDaemon:
    """Point the CLI at the test daemon, as `lorad` finds one on a user's machine."""
    monkeypatch.setenv("LORAD_HOME", str(daemon.settings.home))
    monkeypatch.delenv("LORAD_ADDRESS")
    return daemon
