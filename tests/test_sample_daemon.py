"""SampleNow / SaveNow and the SampleImage event over the real daemon and the CLI."""

from __future__ import annotations

from pathlib import Path

import grpc
import pytest
from PIL import Image

from lorad.server.daemon import RunningDaemon
from lorad_api.v1 import jobs_pb2
from lorad_client import LoradClient, LoradRpcError
from tests.support.cli import run_cli
from tests.support.daemons import config_yaml, kinds, wait_for_step, watch_all

PROMPTS = ["a red circle --d 5", "a blue square --d 6"]


@pytest.mark.slow
def test_sample_now_and_save_now_act_on_a_running_job(
    client: LoradClient, tiny_sd: Path, dataset: Path, tmp_path: Path
) -> None:
    text = config_yaml(
        tiny_sd, dataset, tmp_path / "live", max_train_steps=100_000, sample_prompts=PROMPTS, sample_steps=2,
        sample_every_n_steps=100_000,
    )  # fmt: skip
    job = client.submit_training(text, base_dir=tmp_path)
    wait_for_step(client, job.job_id)

    drawn = client.sample_now(job.job_id)
    assert kinds(drawn) == ["sample_image", "sample_image"]
    first, second = (e.sample_image for e in drawn)
    assert (first.prompt_index, first.seed, second.prompt_index, second.seed) == (0, 5, 1, 6)
    assert first.step >= 1 and first.prompt == "a red circle"
    with Image.open(first.path) as png:
        assert png.size == (first.width, first.height) == (64, 64)
        assert "<lora:live:1>" in png.info["parameters"]

    saved = client.save_now(job.job_id)
    assert kinds(saved) == ["checkpoint_saved", "log"]
    checkpoint = Path(saved[0].checkpoint_saved.path)
    assert (checkpoint / "lora.safetensors").is_file() and checkpoint.parent.name == "checkpoints"
    lora = Path(saved[1].log.message.rsplit(" ", 1)[-1])
    assert lora.is_file() and f"step{saved[0].checkpoint_saved.step:08d}" in lora.name

    client.cancel_job(job.job_id)
    _, history = watch_all(client, job.job_id)
    assert kinds(history)[-1] == "cancelled"
    # The history replays the round like every other event, in order.
    replayed = [e.sample_image for e in history if e.HasField("sample_image")]
    assert [(e.step, e.prompt_index, e.path) for e in replayed] == [
        (first.step, 0, first.path),
        (first.step, 1, second.path),
    ]
    assert any(e.HasField("checkpoint_saved") and e.checkpoint_saved.path == str(checkpoint) for e in history)

    # A job that is not training cannot be asked.
    for ask in (client.sample_now, client.save_now):
        with pytest.raises(LoradRpcError) as err:
            ask(job.job_id)
        assert err.value.code == grpc.StatusCode.FAILED_PRECONDITION and "not training" in str(err.value)


@pytest.mark.slow
def test_sample_now_without_prompts_says_what_to_add(
    client: LoradClient, tiny_sd: Path, dataset: Path, tmp_path: Path
) -> None:
    job = client.submit_training(
        config_yaml(tiny_sd, dataset, tmp_path / "bare", max_train_steps=100_000), base_dir=tmp_path
    )
    wait_for_step(client, job.job_id)
    with pytest.raises(LoradRpcError) as err:
        client.sample_now(job.job_id)
    assert err.value.code == grpc.StatusCode.FAILED_PRECONDITION and "sample_prompts" in str(err.value)
    client.cancel_job(job.job_id)
    assert client.get_job(job.job_id).state in (jobs_pb2.JOB_STATE_RUNNING, jobs_pb2.JOB_STATE_CANCELLED)


@pytest.mark.slow
def test_the_cli_lists_samples_and_asks_a_running_job(
    use_daemon: RunningDaemon,
    tiny_sd: Path,
    dataset: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    from tests.support.datasets import tiny_train_values, write_config

    values = tiny_train_values(
        tiny_sd, dataset, tmp_path / "cli", max_train_steps=100_000, sample_prompts=PROMPTS, sample_steps=2,
        sample_at_first=True,
    )  # fmt: skip
    _, job_id, _ = run_cli(capsys, "train", "--config", str(write_config(tmp_path / "c.yaml", **values)), "--detach")
    job_id = job_id.strip()
    with LoradClient.connect() as client:
        wait_for_step(client, job_id)
    code, out, _ = run_cli(capsys, "sample-now", job_id)
    assert code == 0 and out.count("sample at step") == 2 and "cli_" in out
    code, out, _ = run_cli(capsys, "save-now", job_id)
    assert code == 0 and "checkpoint saved" in out and "-partial-step" in out
    code, out, _ = run_cli(capsys, "samples", job_id)
    assert code == 0 and "STEP" in out and "0 (base)" in out and out.count(".png") == 4
    run_cli(capsys, "cancel", job_id)
