"""One job across devices (data parallel, gloo on two CPU workers): the LoRA of a 2-rank job is the LoRA of a
1-rank job with twice the per-device batch, for the SD, SDXL, FLUX and LLM families; a checkpoint resumes on
another number of devices that keeps the global batch; two torchrun launches (two "machines") train the same
LoRA, and only rank 0 draws samples and writes; SampleNow / SaveNow reach a 2-rank job's rank 0.

Tolerance: every run is fp32 on the CPU; a 2-rank run sums its ranks' gradients in another order than one
rank's batch does, so weights (of size 0.1-1) agree to 1e-5, not bit for bit.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from lorad.config import parse_config
from lorad.config.dispatch import parse_any_config
from lorad.config.llm_loader import parse_llm_config
from lorad.errors import ConfigError
from lorad.training.loop import train
from lorad_api.v1 import jobs_pb2
from lorad_client import LoradClient
from tests.support.daemons import run_daemon, wait_for_step, watch_all
from tests.support.datasets import make_dataset, tiny_llm_values, tiny_sdxl_values, tiny_train_values, write_jsonl
from tests.support.flux import flux_values

pytestmark = pytest.mark.slow

ATOL, RTOL = 1e-5, 1e-4
SD = {"max_train_steps": 4, "save_steps": 2, "keep_checkpoints": 2, "save_precision": "fp32"}


def same_lora(a: Path, b: Path, atol: float = ATOL) -> None:
    ta, tb = load_file(a), load_file(b)
    assert ta.keys() == tb.keys()
    for key in ta:
        torch.testing.assert_close(ta[key], tb[key], atol=atol, rtol=RTOL, msg=key)


def as_yaml(values: dict[str, object]) -> str:
    return yaml.safe_dump({k: str(v) if isinstance(v, Path) else v for k, v in values.items()})


def run_job(client: LoradClient, values: dict[str, object], base_dir: Path) -> tuple[jobs_pb2.Job, list]:
    job = client.submit_training(as_yaml(values), base_dir=base_dir)
    _, events = watch_all(client, job.job_id)
    done = client.get_job(job.job_id)
    assert done.state == jobs_pb2.JOB_STATE_SUCCEEDED, (done.error, done.hint)
    return done, events


@pytest.fixture(scope="module")
def sd_runs(
    tmp_path_factory: pytest.TempPathFactory, tiny_sd: Path, tiny_llm: Path, tiny_sdxl: Path, tiny_flux: dict[str, Path]
) -> Iterator[dict[str, object]]:
    """A 1-rank run with batch 4 (in this process), and on a daemon with two CPU workers: a 2-rank job with
    batch 2, and a 2-rank job resumed from the 1-rank run's checkpoint at step 2. The same pair for an LLM,
    an SDXL and a FLUX model (one daemon start for all: starting two workers is the slow part)."""
    root = tmp_path_factory.mktemp("dp")
    data = make_dataset(root / "data")

    def values(out: str, **extra: object) -> dict[str, object]:
        return tiny_train_values(tiny_sd, data, root / out, cache_dir=root / "cache", **SD) | extra

    reference = train(parse_config(values("ref", batch_size=4), base_dir=root))
    one_rank_step2 = root / "ref-step2"
    shutil.copytree(root / "ref" / "checkpoints" / "step-000002", one_rank_step2)

    home = Path(tempfile.mkdtemp(prefix="lorad-"))
    daemon = run_daemon(home, cpu_workers=2)
    try:
        with LoradClient.connect(daemon.addresses[0], home=home) as client:
            pair, pair_events = run_job(client, values("pair", batch_size=2, devices=2), root)
            resumed, _ = run_job(client, values("resumed", batch_size=2, devices=2, resume_from=one_rank_step2), root)
            llm = llm_pair(client, root, tiny_llm)
            image_families = {
                family: family_pair(client, root, data, family, make_values)
                for family, make_values in {
                    "sdxl": lambda out, **extra: tiny_sdxl_values(tiny_sdxl, data, root / out, **SD, **extra),
                    "flux": lambda out, **extra: flux_values(tiny_flux["dev"], data, root / out, **SD, **extra),
                }.items()
            }
        yield {
            "daemon": daemon,
            "root": root,
            "values": values,
            "reference": reference.outputs,
            "pair": pair,
            "pair_events": pair_events,
            "resumed": resumed,
            "llm": llm,
            "image_families": image_families,
        }
    finally:
        daemon.stop(grace=0)
        shutil.rmtree(home, ignore_errors=True)


def llm_pair(client: LoradClient, root: Path, tiny_llm: Path) -> dict[str, object]:
    """A 2-rank LLM job with batch 2 on the daemon, and the 1-rank run with batch 4 in this process."""
    rows = [{"instruction": f"say {i}", "output": " ".join(["word"] * (1 + i % 5)) + f" {i}"} for i in range(12)]
    data = write_jsonl(root / "records.jsonl", rows)
    common = {"max_train_steps": 4, "eval_fraction": 0, "packing": True}
    job, _ = run_job(
        client, tiny_llm_values(tiny_llm, data, root / "llm-pair", batch_size=2, devices=2, **common), root
    )
    one = train(
        parse_llm_config(tiny_llm_values(tiny_llm, data, root / "llm-one", batch_size=4, **common), base_dir=root)
    )
    return {"pair": job.outputs["adapter"], "one": one.outputs["adapter"]}


def test_two_ranks_train_the_lora_of_one_rank_with_twice_the_batch(sd_runs: dict) -> None:
    pair = sd_runs["pair"]
    same_lora(Path(pair.outputs["kohya"]), Path(sd_runs["reference"]["kohya"]))
    started = next(e.started for e in sd_runs["pair_events"] if e.HasField("started"))
    assert started.device == "cpu,cpu"
    assert next(e.training_started for e in sd_runs["pair_events"] if e.HasField("training_started")).devices == 2
    report = next(e.data_report for e in sd_runs["pair_events"] if e.HasField("data_report"))
    assert "batch: 2 per device × 2 devices × 1 accumulation = 4 samples per step" in report.text
    summary = json.loads(Path(pair.outputs["summary"]).read_text())
    assert summary["data_report"]["batch"] == {
        "per_device": 2,
        "devices": 2,
        "gradient_accumulation_steps": 1,
        "global": 4,
    }
    assert summary["devices"] == 2


def family_pair(client: LoradClient, root: Path, data: Path, family: str, values) -> dict[str, Path]:
    """A 2-rank job of ``family`` with batch 2 on the daemon, and its 1-rank run with batch 4 in this process."""
    job, _ = run_job(client, values(f"{family}-pair", batch_size=2, devices=2), root)
    one = train(parse_any_config(values(f"{family}-one", batch_size=4), base_dir=root))
    return {"pair": Path(job.outputs["kohya"]), "one": Path(one.outputs["kohya"])}


# SDXL's deeper tiny UNet: where a LoRA gradient is near zero, AdamW's normalisation magnifies the other
# summation order to ~6e-5 in a few of its 204 tensors (measured); FLUX meets the SD tolerance.
@pytest.mark.parametrize(("family", "atol"), [("sdxl", 1e-4), ("flux", ATOL)])
def test_every_image_family_too(sd_runs: dict, family: str, atol: float) -> None:
    runs = sd_runs["image_families"][family]
    same_lora(runs["pair"], runs["one"], atol)


def test_the_llm_family_too(sd_runs: dict) -> None:
    llm = sd_runs["llm"]
    same_lora(Path(llm["pair"]) / "adapter_model.safetensors", Path(llm["one"]) / "adapter_model.safetensors")


def test_a_checkpoint_resumes_on_another_number_of_devices_with_the_same_global_batch(sd_runs: dict) -> None:
    # One device → two: the daemon job above resumed from the 1-rank run's step 2.
    same_lora(Path(sd_runs["resumed"].outputs["kohya"]), Path(sd_runs["reference"]["kohya"]))
    # Two devices → one: the 2-rank job's checkpoint at step 2, resumed here with batch 4.
    root, values = sd_runs["root"], sd_runs["values"]
    two_rank_step2 = root / "pair-step2"
    shutil.copytree(root / "pair" / "checkpoints" / "step-000002", two_rank_step2)
    back = train(parse_config(values("back", batch_size=4, resume_from=two_rank_step2), base_dir=root))
    same_lora(Path(back.outputs["kohya"]), Path(sd_runs["reference"]["kohya"]))
    # A batch that changes the global batch is refused, saying what would fit.
    with pytest.raises(ConfigError) as err:
        train(parse_config(values("wrong", batch_size=2, resume_from=two_rank_step2), base_dir=root))
    assert "trained with 4 samples per micro-batch (batch_size × devices); this run has 2 × 1 = 2" in str(err.value)


def test_sample_now_and_save_now_reach_rank_0_of_a_two_rank_job(sd_runs: dict) -> None:

    root, daemon = sd_runs["root"], sd_runs["daemon"]
    values = sd_runs["values"](
        "live", batch_size=2, devices=2, max_train_steps=100_000, save_steps=None, sample_steps=2,
        sample_prompts=["a red circle --d 5"],
    )  # fmt: skip
    with LoradClient.connect(daemon.addresses[0], home=daemon.settings.home) as client:
        job = client.submit_training(as_yaml(values), base_dir=root)
        wait_for_step(client, job.job_id)
        drawn = client.sample_now(job.job_id)
        assert [e.WhichOneof("kind") for e in drawn] == ["sample_image"]
        assert drawn[0].sample_image.seed == 5 and Path(drawn[0].sample_image.path).is_file()
        saved = client.save_now(job.job_id)
        assert [e.WhichOneof("kind") for e in saved] == ["checkpoint_saved", "log"]
        assert (Path(saved[0].checkpoint_saved.path) / "lora.safetensors").is_file()
        client.cancel_job(job.job_id)
        _, history = watch_all(client, job.job_id)
        assert history[-1].HasField("cancelled")
        # One image for the one prompt: the other rank drew none (its events would not show, its files would).
        assert [e.sample_image.path for e in history if e.HasField("sample_image")] == [drawn[0].sample_image.path]
        assert sorted(p.name for p in (root / "live" / "samples").iterdir()) == [Path(drawn[0].sample_image.path).name]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_two_torchrun_launches_train_the_lora_of_the_two_rank_daemon_job(sd_runs: dict, tmp_path: Path) -> None:
    """Two machines, as torchrun sees them: two launches on this host meet at a c10d rendezvous; each runs
    one rank of `lorad train` (embedded) in its own folder, where the config's relative ``output_dir`` lands.
    Rank 0's launch writes the outputs and draws the samples (which leave the LoRA as it was); the other
    rank's folder gets nothing."""
    values = sd_runs["values"]("torchrun", batch_size=2, sample_prompts=["a red circle"], sample_steps=2)
    text = as_yaml(values | {"output_dir": "out", "sample_every_n_steps": 2})
    nodes = [tmp_path / f"node{n}" for n in range(2)]
    for node in nodes:
        node.mkdir()
        (node / "x.yaml").write_text(text)
    bin_dir = Path(sys.executable).parent
    port = free_port()
    command = [
        str(bin_dir / "torchrun"),
        "--nnodes",
        "2",
        "--nproc-per-node",
        "1",
        "--rdzv-backend",
        "c10d",
        "--rdzv-endpoint",
        f"127.0.0.1:{port}",
        "--rdzv-id",
        f"lorad-test-{port}",
        "--max-restarts",
        "0",
        "--no-python",
        str(bin_dir / "lorad"),
        "train",
        "--config",
        "x.yaml",
    ]
    env = os.environ | {"PYTHONUNBUFFERED": "1"}
    launches = []
    for node in nodes:
        log = open(node / "launch.log", "w")  # noqa: SIM115 - closed below
        launches.append((subprocess.Popen(command, cwd=node, env=env, stdout=log, stderr=subprocess.STDOUT), log))
    codes = []
    for process, log in launches:
        try:
            codes.append(process.wait(timeout=600))
        finally:
            process.kill()
            log.close()
    logs = "\n".join((node / "launch.log").read_text()[-3000:] for node in nodes)
    assert codes == [0, 0], logs
    assert "LoRA written" in logs  # rank 0 says where; the other rank stays quiet
    (main,) = [node / "out" for node in nodes if (node / "out").exists()]  # whichever launch got rank 0
    same_lora(main / "out.safetensors", Path(sd_runs["pair"].outputs["kohya"]))
    # Rounds after steps 2 and 4 (the last), one image each, drawn by rank 0 alone; and the contact sheet.
    pngs = sorted(p.name for p in (main / "samples").iterdir())
    assert [name.rsplit("_", 1)[0] for name in pngs] == ["out_00000002_00", "out_00000004_00", "out_contact"]
