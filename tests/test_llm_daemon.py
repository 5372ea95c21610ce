"""LLM jobs through the real daemon: the base model stays resident and untouched between jobs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from lorad.server.daemon import RunningDaemon
from lorad_api.v1 import jobs_pb2
from lorad_client import LoradClient
from tests.support.daemons import kinds, watch_all, worker_registry
from tests.support.datasets import tiny_llm_values, write_jsonl


def llm_yaml(tiny_llm: Path, data: Path, out: Path, **overrides: object) -> str:
    values = tiny_llm_values(tiny_llm, data, out, **overrides)
    return yaml.safe_dump({k: str(v) if isinstance(v, Path) else v for k, v in values.items()})


def base_digest(daemon: RunningDaemon, key) -> dict[str, torch.Tensor]:
    with worker_registry(daemon).use(key) as held:
        assert not any("lora" in name for name, _ in held.model.model.named_modules())
        return {k: v.clone() for k, v in held.model.model.state_dict().items()}


@pytest.mark.slow
@pytest.mark.in_process  # looks at the resident model itself
def test_two_llm_jobs_share_one_resident_base_model(
    client: LoradClient, daemon: RunningDaemon, tiny_llm: Path, tmp_path: Path
) -> None:
    data = write_jsonl(
        tmp_path / "records.jsonl",
        [{"instruction": "greet", "output": "hello world"}, {"instruction": "count", "output": "one two three"}],
    )
    first = client.submit_training(
        llm_yaml(tiny_llm, data, tmp_path / "first", max_train_steps=10, sample_prompts=["greet"], eval_data=str(data)),
        base_dir=tmp_path,
    )
    _, events = watch_all(client, first.job_id)
    seen = kinds(events)
    assert seen[:2] == ["queued", "started"] and seen[-1] == "finished", seen
    assert {"data_report", "model_loaded", "training_started", "step", "eval", "sample"} <= set(seen)
    assert not next(e.model_loaded for e in events if e.HasField("model_loaded")).resident
    sample = next(e.sample for e in events if e.HasField("sample"))
    assert sample.prompt == "greet" and sample.stopped in ("eos", "length")
    done = client.get_job(first.job_id)
    assert done.state == jobs_pb2.JOB_STATE_SUCCEEDED and Path(done.outputs["adapter"]).is_dir()
    summary = json.loads(Path(done.outputs["summary"]).read_text())
    assert summary["samples"][0]["output"] == sample.output

    (info,) = worker_registry(daemon).list()
    assert info.key.kind == "llm"
    before = base_digest(daemon, info.key)

    second = client.submit_training(
        llm_yaml(tiny_llm, data, tmp_path / "second", max_train_steps=5, lora_rank=4, target_modules=["attention"]),
        base_dir=tmp_path,
    )
    _, events = watch_all(client, second.job_id)
    assert kinds(events)[-1] == "finished"
    loaded = next(e.model_loaded for e in events if e.HasField("model_loaded"))
    assert loaded.resident and loaded.seconds == 0
    after = base_digest(daemon, info.key)
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)
    assert [m.model_id for m in client.list_models()] == [info.model_id]


def test_a_bad_llm_config_is_refused_at_submit_with_every_problem(
    client: LoradClient, tiny_llm: Path, tmp_path: Path
) -> None:
    import pytest

    from lorad_client import LoradRpcError

    with pytest.raises(LoradRpcError) as err:
        client.submit_training(
            yaml.safe_dump(
                {"base_model": str(tiny_llm), "train_data": "nope.jsonl", "output_dir": "o", "lora_rank": -1}
            ),
            base_dir=str(tmp_path),
        )
    assert "nope.jsonl does not exist" in str(err.value) and "`lora_rank`" in str(err.value)
    # A causal LM preloads as an LLM base model, the way its jobs will use it.
    reply = client.load_model(str(tiny_llm), base_dir="/", device="cpu")
    assert not reply.already_resident and reply.model.kind == "llm"


@pytest.mark.slow
def test_an_llm_job_interrupted_by_a_daemon_stop_resumes_on_the_next_start(
    short_dir: Path, tiny_llm: Path, tmp_path: Path
) -> None:
    from tests.support.daemons import run_daemon

    data = write_jsonl(tmp_path / "records.jsonl", [{"text": "one two three four five six"}] * 4)
    first = run_daemon(short_dir)
    try:
        with LoradClient.connect(first.addresses[0], home=short_dir) as client:
            job = client.submit_training(
                llm_yaml(tiny_llm, data, tmp_path / "out", max_train_steps=40, batch_size=1, save_steps=2),
                base_dir=tmp_path,
            )
            for message in client.watch_job(job.job_id):
                if message.WhichOneof("item") == "event" and message.event.HasField("checkpoint_saved"):
                    break
    finally:
        first.stop(grace=0)  # the worker checkpoints the running job and leaves it INTERRUPTED

    second = run_daemon(short_dir)
    try:
        with LoradClient.connect(second.addresses[0], home=short_dir) as client:
            _, events = watch_all(client, job.job_id)
            seen = kinds(events)
            assert "interrupted" in seen and seen[-1] == "finished", seen
            started = [e.started for e in events if e.HasField("started")]
            assert [s.attempt for s in started] == [1, 2] and "checkpoints/step-" in started[1].resumed_from
            assert [e.training_started for e in events if e.HasField("training_started")][-1].start_step >= 2
            assert client.get_job(job.job_id).progress.step == 40
    finally:
        second.stop(grace=0)
