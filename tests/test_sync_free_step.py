"""A training step never waits for the device: no device number is read on the host per step (counted
on the CPU, proved with CUDA's sync-debug mode on a GPU), and a NaN still stops the run within one
step, before any checkpoint or export could hold it."""

from __future__ import annotations

import math
import sys
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lorad.config import parse_config
from lorad.config.llm_loader import parse_llm_config
from lorad.errors import TrainingDiverged
from lorad.events import Event, StepDone, TrainingStarted
from lorad.families.sd.family import SdRun
from lorad.training.loop import train
from tests.support.datasets import tiny_llm_values, tiny_train_values, write_jsonl

# Every way Python code reads a tensor's value on the host; on a GPU each one waits for the device.
HOST_READS = ("item", "tolist", "__float__", "__int__", "__bool__", "__index__")
LAGGED = str(Path(__import__("lorad.training.lagged").training.lagged.__file__))


@contextmanager
def host_reads(monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[Counter, list[bool]]]:
    """Counts host reads of tensor values by the file that made them, while ``active[0]`` is True."""
    reads: Counter = Counter()
    active = [False]
    for name in HOST_READS:
        original = getattr(torch.Tensor, name)

        def counted(self: torch.Tensor, *args: object, _original=original, **kwargs: object) -> object:
            if active[0]:
                reads[sys._getframe(1).f_code.co_filename] += 1
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, counted)
    yield reads, active


def sd_config(tiny_sd: Path, dataset: Path, out: Path, **overrides: object):
    values = {"min_snr_gamma": 5, "noise_offset": 0.05, "train_text_encoder": True, "shuffle_caption": True}
    return parse_config(tiny_train_values(tiny_sd, dataset, out, **(values | overrides)), base_dir=out.parent)


def llm_config(tiny_llm: Path, out: Path, **overrides: object):
    data = write_jsonl(out.parent / "d.jsonl", [{"instruction": f"q{i}", "output": f"a{i}"} for i in range(8)])
    values = {"packing": True, "batch_size": 2, "eval_fraction": 0}
    return parse_llm_config(tiny_llm_values(tiny_llm, data, out, **(values | overrides)), base_dir=out.parent)


@pytest.mark.slow
@pytest.mark.parametrize("family", ["sd", "llm"])
def test_a_step_reads_no_device_number_on_the_host(
    family: str, tiny_sd: Path, tiny_llm: Path, dataset: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    steps = 6
    if family == "sd":
        config = sd_config(tiny_sd, dataset, tmp_path / "o", max_train_steps=steps)
    else:
        config = llm_config(tiny_llm, tmp_path / "o", max_train_steps=steps)
    with host_reads(monkeypatch) as (reads, active):

        def window(event: Event) -> None:
            # From the first step to the report of the last one (the weights check and export come after).
            if isinstance(event, TrainingStarted) or (isinstance(event, StepDone) and event.step == steps):
                active[0] = isinstance(event, TrainingStarted)

        result = train(config, on_event=window)
    assert result.steps == steps and math.isfinite(result.final_loss)
    # Only the lagged reader reads, once a step (a copy the device made a step earlier). A float(loss)
    # in the loop, in a family's loss or in the libraries they call would show up here, by file.
    assert set(reads) == {LAGGED}, dict(reads)
    assert reads[LAGGED] == steps


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("family", ["sd", "llm"])
def test_on_cuda_the_steps_run_under_sync_debug_mode_error(
    family: str, tiny_sd: Path, tiny_llm: Path, dataset: Path, tmp_path: Path
) -> None:
    steps = 8
    if family == "sd":
        config = sd_config(tiny_sd, dataset, tmp_path / "o", max_train_steps=steps, device="cuda")
    else:
        config = llm_config(tiny_llm, tmp_path / "o", max_train_steps=steps, device="cuda")
    checked: list[int] = []

    def window(event: Event) -> None:
        # Step 1 is reported while step 2 runs, the last steps at the end (after the weights check,
        # which syncs on purpose): steps 3 to steps - 1 run with every synchronising call an error.
        if isinstance(event, StepDone) and event.step == 1:
            torch.cuda.set_sync_debug_mode("error")
        elif isinstance(event, StepDone) and event.step == steps - 1:
            torch.cuda.set_sync_debug_mode("default")
        elif isinstance(event, StepDone) and torch.cuda.get_sync_debug_mode():
            checked.append(event.step)

    try:
        result = train(config, on_event=window)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert result.steps == steps and checked == list(range(2, steps - 1))


class PoisonAt:
    """At the SD family's ``at``-th loss call: return NaN (``what="loss"``), or leave the loss finite and
    make that step's gradients NaN (``what="weights"``: the update then turns the LoRA weights to NaN)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, at: int, what: str) -> None:
        self.calls = 0
        real = SdRun.loss

        def loss(run: SdRun, micro_batch, generator):
            self.calls += 1
            value = real(run, micro_batch, generator)
            if self.calls == at and what == "loss":
                return value * float("nan")
            if self.calls == at:
                param = run.param_groups[0]["params"][0]

                def poison(grad: torch.Tensor) -> torch.Tensor:
                    handle.remove()
                    return grad * float("nan")

                handle = param.register_hook(poison)
            return value

        monkeypatch.setattr(SdRun, "loss", loss)


@pytest.mark.slow
@pytest.mark.parametrize(
    ("what", "k", "message", "reported"),
    [
        # Step 3 is not a checkpoint step: its loss is read while step 4 runs, and the run stops there.
        ("loss", 3, "the loss became nan at step 3", [1, 2]),
        # Step 4's loss is finite, but its update is not: the check before its checkpoint stops the run.
        ("weights", 4, "the LoRA weights became NaN or infinite by step 4", [1, 2, 3, 4]),
    ],
)
def test_a_nan_at_step_k_stops_the_run_by_step_k_plus_1_and_is_never_saved(
    what: str,
    k: int,
    message: str,
    reported: list[int],
    tiny_sd: Path,
    dataset: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    poison = PoisonAt(monkeypatch, at=k, what=what)
    config = sd_config(tiny_sd, dataset, tmp_path / "o", epochs=4, save_steps=2, keep_checkpoints=10)
    events: list[Event] = []
    with pytest.raises(TrainingDiverged) as err:
        train(config, on_event=events.append)
    assert message in str(err.value)
    # One micro-batch per step: the loss calls made are the steps run.
    assert poison.calls <= k + 1
    assert [e.step for e in events if isinstance(e, StepDone)] == reported
    checkpoints = sorted((tmp_path / "o" / "checkpoints").iterdir())
    assert [c.name for c in checkpoints] == ["step-000002"]
    assert all(torch.isfinite(t).all() for t in load_file(checkpoints[0] / "lora.safetensors").values())
    assert str(checkpoints[-1]) in err.value.hint
    assert not list((tmp_path / "o").glob("*.safetensors"))  # no export
