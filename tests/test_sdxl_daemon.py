"""SDXL jobs through the real daemon: detected from the model, resident between jobs as kind "sdxl",
the base model bit-identical afterwards, and watch folders taking SDXL template configs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from lorad.models.sd_components import state_dict_digest
from lorad.server.daemon import RunningDaemon
from lorad_api.v1 import jobs_pb2
from lorad_client import LoradClient
from tests.support.daemons import kinds, watch_all, worker_registry
from tests.support.datasets import tiny_sdxl_values

pytestmark = pytest.mark.slow
PARTS = ("unet", "text_encoder", "text_encoder_2", "vae")


def sdxl_yaml(tiny_sdxl: Path, data: Path, out: Path, **overrides: object) -> str:
    values = tiny_sdxl_values(tiny_sdxl, data, out, **overrides)
    return yaml.safe_dump({k: str(v) if isinstance(v, Path) else v for k, v in values.items()})


def digests(daemon: RunningDaemon, key) -> dict[str, str]:
    with worker_registry(daemon).use(key) as held:
        model = held.model
        assert not any("lora" in name for part in PARTS for name, _ in getattr(model, part).named_modules())
        # The text encoders are back on the model's device for the next job.
        assert {p.device.type for part in PARTS for p in getattr(model, part).parameters()} == {"cpu"}
        return {part: state_dict_digest(getattr(model, part).state_dict()) for part in PARTS}


@pytest.mark.in_process  # looks at the resident model itself
def test_two_sdxl_jobs_share_one_resident_model_left_bit_identical(
    client: LoradClient, daemon: RunningDaemon, tiny_sdxl: Path, dataset: Path, tmp_path: Path
) -> None:
    first = client.submit_training(sdxl_yaml(tiny_sdxl, dataset, tmp_path / "first"), base_dir=tmp_path)
    _, events = watch_all(client, first.job_id)
    seen = kinds(events)
    assert seen[-1] == "finished", seen
    assert {"data_report", "model_loaded", "latents_cached", "training_started", "step"} <= set(seen)
    loaded = next(e.model_loaded for e in events if e.HasField("model_loaded"))
    assert not loaded.resident and loaded.model_version == "sdxl"
    done = client.get_job(first.job_id)
    assert done.state == jobs_pb2.JOB_STATE_SUCCEEDED and Path(done.outputs["kohya"]).is_file()

    (info,) = worker_registry(daemon).list()
    assert info.key.kind == "sdxl"
    (listed,) = client.list_models()
    assert listed.kind == "sdxl" and listed.model_version == "sdxl"  # what `lorad models` prints
    before = digests(daemon, info.key)

    second = client.submit_training(
        sdxl_yaml(tiny_sdxl, dataset, tmp_path / "second", lora_rank=2, train_text_encoder=True), base_dir=tmp_path
    )
    _, events = watch_all(client, second.job_id)
    assert kinds(events)[-1] == "finished"
    loaded = next(e.model_loaded for e in events if e.HasField("model_loaded"))
    assert loaded.resident and loaded.seconds == 0
    assert digests(daemon, info.key) == before
    summary = json.loads(Path(client.get_job(second.job_id).outputs["summary"]).read_text())
    assert "text_encoder_outputs" not in summary  # trained encoders run at every step


def test_a_watched_folder_trains_an_sdxl_template(client: LoradClient, tiny_sdxl: Path, tmp_path: Path) -> None:
    from safetensors import safe_open

    from tests.support.datasets import make_dataset
    from tests.support.watching import finished_job, wait_for, watch_jobs

    # SDXL-only keys in the template: it must be read as an SDXL config, not SD's.
    values = tiny_sdxl_values(
        tiny_sdxl, tmp_path / "unused", tmp_path / "watched", max_train_steps=2, fp8_base=True, zero_terminal_snr=False
    )
    values.pop("metadata_path")
    template = tmp_path / "sdxl_watch.yaml"
    template.write_text(yaml.safe_dump({k: str(v) if isinstance(v, Path) else v for k, v in values.items()}))
    folder = make_dataset(tmp_path / "incoming", count=4, csv=False)
    client.add_watch(str(folder), str(template), quiet_seconds=0.5)
    jobs = wait_for(lambda: watch_jobs(client, folder), "the watch's job")
    job = finished_job(client, jobs[0].job_id)
    with safe_open(job.outputs["kohya"], "pt") as fh:
        assert fh.metadata()["ss_base_model_version"] == "sdxl_base_v1-0"
