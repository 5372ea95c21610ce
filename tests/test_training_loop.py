"""The one training loop and its family registry: what every family gets from it, the same way."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lorad.config import parse_config
from lorad.config.dispatch import parse_any_config
from lorad.config.llm_loader import parse_llm_config
from lorad.errors import ConfigError
from lorad.families.registry import family_names, get_spec, load_plugin
from lorad.training.loop import train
from lorad.training.optimizers import build_optimizer, build_scheduler
from tests.support.datasets import tiny_llm_values, tiny_train_values, write_jsonl


def lrs(config_values: dict, tmp_path: Path, total: int) -> list[float]:
    config = parse_config(
        {"train_data_dir": str(tmp_path), "base_model": "m.safetensors", "output_dir": str(tmp_path / "o")}
        | config_values,
        base_dir=tmp_path,
    )
    optimizer = build_optimizer([{"params": [torch.nn.Parameter(torch.zeros(1))], "lr": 1.0}], config)
    scheduler = build_scheduler(optimizer, config, total_steps=total)
    out = []
    for _ in range(total):
        out.append(scheduler.get_last_lr()[0])
        optimizer.step()
        scheduler.step()
    return out


def test_polynomial_decays_with_its_power_to_the_min_lr_ratio(tmp_path: Path) -> None:
    values = {"lr_scheduler": "polynomial", "lr_scheduler_power": 2.0, "lr_scheduler_min_lr_ratio": 0.1}
    schedule = lrs(values | {"learning_rate": 1.0}, tmp_path, 100)
    assert schedule[0] == pytest.approx(1.0)
    # Halfway, a power-2 decay has covered 3/4 of the way to the end lr: 0.1 + 0.9 * 0.5**2.
    assert schedule[50] == pytest.approx(0.1 + 0.9 * 0.25, rel=1e-6)
    assert schedule[-1] == pytest.approx(0.1 + 0.9 * (1 / 100) ** 2, rel=1e-6)


def test_cosine_with_restarts_restarts_the_number_of_cycles_asked(tmp_path: Path) -> None:
    schedule = lrs({"lr_scheduler": "cosine_with_restarts", "lr_scheduler_num_cycles": 2}, tmp_path, 100)
    peaks = [i for i in range(1, 100) if schedule[i] > schedule[i - 1]]
    assert peaks == [50]  # one restart: two cosine cycles
    assert schedule[50] == pytest.approx(schedule[0])


def test_warmup_rises_linearly_then_the_schedule_starts(tmp_path: Path) -> None:
    schedule = lrs({"lr_scheduler": "constant", "lr_warmup_steps": 4, "learning_rate": 1.0}, tmp_path, 10)
    assert schedule[:5] == pytest.approx([0.0, 0.25, 0.5, 0.75, 1.0])
    assert schedule[5:] == pytest.approx([1.0] * 5)


def test_min_lr_ratio_of_one_is_refused_with_its_range(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as err:
        parse_config(
            {"train_data_dir": ".", "base_model": "m.safetensors", "output_dir": "o", "lr_scheduler_min_lr_ratio": 1},
            base_dir=tmp_path,
        )
    assert "lr_scheduler_min_lr_ratio" in str(err.value) and "0.99" in str(err.value)


def test_the_registry_knows_each_family_and_its_config(tmp_path: Path) -> None:
    assert {"sd", "llm"} <= set(family_names())
    for name in family_names():
        spec = get_spec(name)
        assert spec.name == name and spec.render_example().startswith("# lorad")
        assert load_plugin(name).name == name


def test_model_family_names_the_family_and_a_typo_gets_a_suggestion(tiny_llm: Path, tmp_path: Path) -> None:
    records = write_jsonl(tmp_path / "r.jsonl", [{"text": "hi"}])
    llm = parse_any_config(
        {"model_family": "llm", "train_data": str(records), "base_model": "org/model", "output_dir": "o"},
        base_dir=tmp_path,
    )
    assert llm.model_family == "llm"
    with pytest.raises(ConfigError) as err:
        parse_any_config({"model_family": "lmm", "base_model": "x"}, base_dir=tmp_path)
    assert "did you mean `llm`" in str(err.value)
    # Without the key the base model decides: a causal-LM folder is an LLM.
    detected = parse_any_config(
        {"train_data": str(records), "base_model": str(tiny_llm), "output_dir": "o"}, base_dir=tmp_path
    )
    assert detected.model_family == "llm"


@pytest.mark.slow
def test_the_llm_honours_the_shared_adam_settings_and_epoch_checkpoints(tiny_llm: Path, tmp_path: Path) -> None:
    """Keys its own copy of the loop once lacked: they now come from the one loop."""
    data = write_jsonl(tmp_path / "d.jsonl", [{"instruction": f"q{i}", "output": f"a{i}"} for i in range(4)])
    values = tiny_llm_values(tiny_llm, data, tmp_path / "out", epochs=3, save_every_n_epochs=1, batch_size=2)
    del values["max_train_steps"]
    values |= {"adam_beta1": 0.5, "adam_epsilon": 1e-3}
    config = parse_llm_config(values, base_dir=tmp_path)
    seen = []
    real = torch.optim.AdamW.__init__

    def spy(self, params, **kwargs):
        seen.append(kwargs)
        real(self, params, **kwargs)

    torch.optim.AdamW.__init__ = spy
    try:
        train(config)
    finally:
        torch.optim.AdamW.__init__ = real
    assert seen[0]["betas"] == (0.5, 0.999) and seen[0]["eps"] == 1e-3
    # 4 records / batch 2 = 2 steps an epoch; epochs 1 and 2 end before the last step.
    steps = sorted(p.name for p in (tmp_path / "out" / "checkpoints").iterdir())
    assert steps == ["step-000002", "step-000004"]


@pytest.mark.slow
def test_an_sd_and_an_llm_run_share_the_loops_outputs(
    tiny_sd: Path, dataset: Path, tiny_llm: Path, tmp_path: Path
) -> None:
    sd = train(parse_config(tiny_train_values(tiny_sd, dataset, tmp_path / "sd", max_train_steps=2), base_dir=tmp_path))
    data = write_jsonl(tmp_path / "d.jsonl", [{"instruction": "q", "output": "a"}])
    llm = train(
        parse_llm_config(tiny_llm_values(tiny_llm, data, tmp_path / "llm", max_train_steps=2), base_dir=tmp_path)
    )
    for result in (sd, llm):
        assert result.steps == 2 and math.isfinite(result.final_loss)
        assert {"summary", "logs"} <= result.outputs.keys()
    assert {"kohya", "diffusers"} <= sd.outputs.keys() and "adapter" in llm.outputs


def test_config_example_prints_each_familys_keys(tmp_path: Path) -> None:
    for name, key in (("sd", "train_data_dir:"), ("llm", "train_data:")):
        out = subprocess.run(
            [sys.executable, "-m", "lorad.cli", "config", "--example", name], capture_output=True, text=True, check=True
        ).stdout
        assert key in out
    bad = subprocess.run(
        [sys.executable, "-m", "lorad.cli", "config", "--example", "nope"], capture_output=True, text=True
    )
    assert bad.returncode == 2 and "sd" in bad.stderr and "llm" in bad.stderr
