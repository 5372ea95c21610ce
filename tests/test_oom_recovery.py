"""Out-of-memory recovery: a step that runs out of memory is redone in smaller pieces (then with
gradient checkpointing), the job goes on as if it had used them from the start, and one that keeps
running out fails after a bounded number of tries with the family's hint, the daemon still up."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lorad.config import parse_config
from lorad.errors import TrainingInterrupted, TrainingOutOfMemory
from lorad.events import Event, MemoryRecovered, StepDone
from lorad.families.sd.family import SdRun
from lorad.training.loop import train
from lorad_api.v1 import jobs_pb2
from lorad_client import LoradClient
from tests.support.daemons import config_yaml, kinds, watch_all, worker_registry
from tests.support.datasets import tiny_train_values

REAL_LOSS = SdRun.loss


class InjectOom:
    """Makes the SD family's loss raise torch's out-of-memory error, as a GPU would.

    It counts loss calls on pieces of more than ``above`` samples and raises on the ``at``-th such
    call and every one after it, up to ``times`` raises in all (None: no limit). With one micro-batch
    per step, the ``at``-th full-size call is step ``at``; once the pieces are small enough it stays quiet.
    """

    def __init__(self, monkeypatch: pytest.MonkeyPatch, *, at: int = 1, above: int = 0, times: int | None = 1) -> None:
        self.at, self.above, self.times = at, above, times
        self.calls, self.raised = 0, 0
        self.checkpointing: list[bool] = []  # gradient checkpointing at each raise

        def loss(run: SdRun, micro_batch, generator):
            if len(micro_batch.samples[micro_batch.trained]) > self.above:
                self.calls += 1
                if self.calls >= self.at and (self.times is None or self.raised < self.times):
                    self.raised += 1
                    self.checkpointing.append(run.components.unet.is_gradient_checkpointing)
                    raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
            return REAL_LOSS(run, micro_batch, generator)

        monkeypatch.setattr(SdRun, "loss", loss)


def config_of(tiny_sd: Path, dataset: Path, out: Path, **overrides: object):
    """The tiny model at batch 4 on 8 images (two steps an epoch), with every random draw in play."""
    values = {"batch_size": 4, "epochs": 3, "save_precision": "fp32", "shuffle_caption": True, "noise_offset": 0.05}
    return parse_config(tiny_train_values(tiny_sd, dataset, out, **(values | overrides)), base_dir=out.parent)


def run(tiny_sd: Path, dataset: Path, out: Path, **overrides: object) -> tuple[dict[str, torch.Tensor], list[Event]]:
    """Train ``config_of(...)``; its kohya LoRA and its events."""
    events: list[Event] = []
    result = train(config_of(tiny_sd, dataset, out, **overrides), on_event=events.append)
    return load_file(result.outputs["kohya"]), events


def max_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max()) for k in a)


@pytest.mark.slow
def test_an_oom_mid_run_goes_on_as_if_the_smaller_micro_batch_was_used_from_the_start(
    tiny_sd: Path, dataset: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    mid = InjectOom(monkeypatch, at=3, above=2)
    recovered, events = run(tiny_sd, dataset, tmp_path / "mid")
    assert mid.raised == 1
    (change,) = [e for e in events if isinstance(e, MemoryRecovered)]
    assert change.change == "batch 4 → 2 × accumulation 2 after out-of-memory at step 3"
    assert (change.step, change.micro_batch, change.gradient_accumulation_steps) == (3, 2, 2)
    # The step that ran out was redone, not skipped: every step is reported once, in order.
    assert [e.step for e in events if isinstance(e, StepDone)] == [1, 2, 3, 4, 5, 6]
    summary = json.loads((tmp_path / "mid" / "training_summary.json").read_text())
    assert summary["memory_recovery"] == [change.change] and summary["steps"] == 6

    InjectOom(monkeypatch, at=1, above=2)  # the same run, in pieces of 2 from its first step
    from_start, _ = run(tiny_sd, dataset, tmp_path / "start")
    InjectOom(monkeypatch, at=1, above=2, times=0)  # never fires: a different seed, to size the tolerance
    other_seed, _ = run(tiny_sd, dataset, tmp_path / "seed", seed=7)

    # Same samples, same noise, same share of the loss per sample: equal up to float rounding of the
    # smaller matmuls (steps 1-2 ran whole in one run and in pieces in the other).
    assert max_difference(recovered, from_start) < 1e-5
    assert max_difference(recovered, other_seed) > 1e-3


@pytest.mark.slow
def test_resume_after_a_recovery_keeps_the_smaller_pieces_and_is_exact(
    tiny_sd: Path, dataset: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    oom = InjectOom(monkeypatch, at=1, above=2)
    whole, _ = run(tiny_sd, dataset, tmp_path / "whole", save_steps=2, lora_dropout=0.1)

    oom.calls, oom.raised = 0, 0
    stop = threading.Event()

    def stop_after_four(event: Event) -> None:
        if isinstance(event, StepDone) and event.step == 4:  # on the CPU a step is reported right after it
            stop.set()

    config = config_of(tiny_sd, dataset, tmp_path / "part", save_steps=2, lora_dropout=0.1)
    with pytest.raises(TrainingInterrupted) as stopped:
        train(config, on_event=stop_after_four, stop=stop)
    assert stopped.value.checkpoint.endswith("step-000004")
    meta = json.loads((Path(stopped.value.checkpoint) / "meta.json").read_text())
    assert meta["memory"]["micro_batch"] == 2

    # The injector would fire on any piece of 4: the resumed run must start in pieces of 2.
    oom.calls, oom.raised, oom.times = 0, 0, None
    resumed, events = run(tiny_sd, dataset, tmp_path / "part", save_steps=2, lora_dropout=0.1, resume_from="latest")
    assert oom.raised == 0 and not [e for e in events if isinstance(e, MemoryRecovered)]
    assert [e.step for e in events if isinstance(e, StepDone)] == [5, 6]
    assert all(torch.equal(whole[k], resumed[k]) for k in whole)


@pytest.mark.slow
def test_a_run_that_keeps_running_out_fails_after_a_bounded_ladder_with_the_hint(
    tiny_sd: Path, dataset: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    oom = InjectOom(monkeypatch, times=None)  # every step, at every size
    events: list[Event] = []
    config = parse_config(
        tiny_train_values(tiny_sd, dataset, tmp_path / "o", batch_size=4, epochs=1, save_steps=1), base_dir=tmp_path
    )
    with pytest.raises(TrainingOutOfMemory) as err:
        train(config, on_event=events.append)
    changes = [e.change for e in events if isinstance(e, MemoryRecovered)]
    assert changes == [
        "batch 4 → 2 × accumulation 2 after out-of-memory at step 1",
        "batch 2 → 1 × accumulation 4 after out-of-memory at step 1",
        "gradient checkpointing on after out-of-memory at step 1",
    ]
    # Four tries (batch 4, 2, 1, then 1 with checkpointing); the last one fails the run.
    assert oom.raised == 4 and oom.checkpointing == [False, False, False, True]
    assert "out of memory at step 1 after 3 recoveries" in str(err.value)
    # The hint names what is left to lower, not what was already tried.
    assert err.value.hint.startswith("Out of memory. Try")
    assert "batch_size" not in err.value.hint and "gradient_checkpointing" not in err.value.hint
    assert not list((tmp_path / "o").glob("checkpoints/step-*")) and not list((tmp_path / "o").glob("*.safetensors"))

    oom.raised = 0
    off = parse_config(
        tiny_train_values(tiny_sd, dataset, tmp_path / "off", batch_size=4, oom_recovery=False), base_dir=tmp_path
    )
    with pytest.raises(TrainingOutOfMemory) as err:
        train(off)
    assert oom.raised == 1  # off: no second try
    assert "batch_size: 2 (now 4)" in err.value.hint and "gradient_checkpointing: true" in err.value.hint


@pytest.mark.slow
@pytest.mark.in_process  # the injected out-of-memory errors patch this process
def test_through_the_daemon_a_job_recovers_and_a_hopeless_one_fails_with_the_daemon_up(
    client: LoradClient, daemon, tiny_sd: Path, dataset: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    oom = InjectOom(monkeypatch, at=2, above=2)
    job = client.submit_training(config_yaml(tiny_sd, dataset, tmp_path / "ok", batch_size=4), base_dir=tmp_path)
    _, events = watch_all(client, job.job_id)
    assert kinds(events)[-1] == "finished" and oom.raised == 1
    (recovered,) = [e.memory_recovered for e in events if e.HasField("memory_recovered")]
    assert recovered.change == "batch 4 → 2 × accumulation 2 after out-of-memory at step 2"
    assert recovered.micro_batch == 2 and recovered.gradient_accumulation_steps == 2
    assert "out of memory" in recovered.error
    done = client.get_job(job.job_id)
    assert done.state == jobs_pb2.JOB_STATE_SUCCEEDED
    assert json.loads(Path(done.outputs["summary"]).read_text())["memory_recovery"] == [recovered.change]

    oom.at, oom.calls, oom.raised, oom.above, oom.times = 1, 0, 0, 0, None
    hopeless = client.submit_training(config_yaml(tiny_sd, dataset, tmp_path / "no", batch_size=2), base_dir=tmp_path)
    _, events = watch_all(client, hopeless.job_id)
    assert kinds(events).count("memory_recovered") == 2 and oom.raised == 3  # batch 2, 1, 1 + checkpointing
    failed = client.get_job(hopeless.job_id)
    assert failed.state == jobs_pb2.JOB_STATE_FAILED
    assert failed.error.startswith("out of memory at step 1 after 2 recoveries")
    assert failed.hint.startswith("Out of memory. Try")

    # The daemon is up, and the resident model is back as it was: no adapter, no checkpointing.
    assert client.status().running_job_id == ""
    (info,) = worker_registry(daemon).list()
    with worker_registry(daemon).use(info.key) as held:
        assert not held.model.unet.is_gradient_checkpointing
        assert not any("lora" in name for name, _ in held.model.unet.named_modules())
