"""Every optimizer trains (its loss falls on a fixed batch), resumes exactly, and is configured with checked
arguments; schedule-free exports its eval-mode weights; hints for learning rates that do not fit."""

from __future__ import annotations

import math
import threading
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from lorad.config import parse_config
from lorad.config.llm_loader import parse_llm_config
from lorad.errors import ConfigError, TrainingInterrupted
from lorad.events import LogLine, StepDone
from lorad.families.sd.family import load_for_training
from lorad.lora.adapters import attach_lora
from lorad.lora.kohya_format import to_kohya
from lorad.lora.targets import UNET_ALIASES, resolve_targets
from lorad.training.checkpoints import load_checkpoint
from lorad.training.loop import train
from lorad.training.optimizers import build_optimizer, build_scheduler, optimizer_hints, set_optimizer_mode
from lorad.training.placement import pick_placement
from tests.support.datasets import tiny_train_values

CPU_OPTIMIZERS = ("adamw", "prodigy", "adafactor", "lion", "adamw_schedulefree", "came")
# A learning rate each optimizer trains well at (Prodigy estimates its own step: 1.0; Lion wants less).
RATES = {"prodigy": 1.0, "lion": 3e-3, "adamw_schedulefree": 2e-2}


def sd_config(tmp_path: Path, tiny_sd: Path, dataset: Path, out: str = "out", **overrides: object):
    return parse_config(tiny_train_values(tiny_sd, dataset, tmp_path / out, **overrides), base_dir=tmp_path)


@pytest.mark.parametrize("name", CPU_OPTIMIZERS)
def test_each_optimizer_lowers_the_loss_on_a_fixed_batch(
    tmp_path: Path, tiny_sd: Path, dataset: Path, name: str
) -> None:
    # A LoRA-shaped problem: fit a low-rank correction of a frozen layer on one fixed batch.
    torch.manual_seed(0)
    frozen = nn.Linear(16, 16)
    down, up = nn.Parameter(torch.randn(4, 16) * 0.1), nn.Parameter(torch.zeros(16, 4))
    x, y = torch.randn(32, 16), torch.randn(32, 16)
    config = sd_config(tmp_path, tiny_sd, dataset, optimizer=name, learning_rate=RATES.get(name, 1e-2))
    optimizer = build_optimizer([{"params": [down, up], "lr": config.learning_rate}], config)
    scheduler = build_scheduler(optimizer, config, total_steps=60)

    def loss() -> torch.Tensor:
        return ((frozen(x) + x @ down.T @ up.T - y) ** 2).mean()

    first = float(loss().detach())
    for _ in range(60):
        optimizer.zero_grad()
        loss().backward()
        optimizer.step()
        scheduler.step()
    set_optimizer_mode(optimizer, train=False)  # schedule-free: measure the averaged weights
    assert float(loss().detach()) < 0.9 * first, name


@pytest.mark.slow
@pytest.mark.parametrize("name", CPU_OPTIMIZERS)
def test_each_optimizer_resumes_exactly(tmp_path: Path, tiny_sd: Path, dataset: Path, name: str) -> None:
    common = {
        "optimizer": name,
        "learning_rate": RATES.get(name, 1e-3),
        "epochs": 2,
        "save_steps": 2,
        "save_precision": "fp32",
    }
    full = train(sd_config(tmp_path, tiny_sd, dataset, "full", **common))
    stop = threading.Event()
    with pytest.raises(TrainingInterrupted):
        train(
            sd_config(tmp_path, tiny_sd, dataset, "part", **common),
            stop=stop,
            on_event=lambda e: stop.set() if isinstance(e, StepDone) and e.step == 3 else None,
        )
    resumed = train(sd_config(tmp_path, tiny_sd, dataset, "part", resume_from="latest", **common))
    a, b = load_file(full.outputs["kohya"]), load_file(resumed.outputs["kohya"])
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(t.abs().max() > 0 for k, t in a.items() if "lora_up" in k)  # it trained


@pytest.mark.slow
def test_schedulefree_exports_its_eval_mode_weights(tmp_path: Path, tiny_sd: Path, dataset: Path) -> None:
    import schedulefree

    common = {"optimizer": "adamw_schedulefree", "learning_rate": 2e-2, "epochs": 1, "save_precision": "fp32"}
    stop = threading.Event()
    # Stopped at the last step: a checkpoint holding the train-mode weights (y) and the optimizer's z.
    with pytest.raises(TrainingInterrupted) as err:
        train(
            sd_config(tmp_path, tiny_sd, dataset, **common),
            stop=stop,
            on_event=lambda e: stop.set() if isinstance(e, StepDone) and e.step == e.total_steps else None,
        )
    checkpoint = load_checkpoint(Path(err.value.checkpoint))
    result = train(sd_config(tmp_path, tiny_sd, dataset, resume_from="latest", **common))  # nothing left: export
    exported = load_file(result.outputs["kohya"])

    # Schedule-free's own eval() (x = lerp(y, z, 1 - 1/beta1)) on the checkpoint's weights and optimizer state.
    state = checkpoint.lora["unet"]
    keys = sorted(state)
    params = [nn.Parameter(state[k].clone()) for k in keys]
    optimizer = schedulefree.AdamWScheduleFree(params, lr=2e-2)
    saved = checkpoint.state["optimizer"]
    # The saved state is indexed in the run's parameter order: attach the same LoRA to learn it.
    unet = load_for_training(str(tiny_sd), pick_placement("cpu", "no")).unet
    paths = resolve_targets(unet, ["q_proj", "v_proj"], key="unet_target_modules", aliases=UNET_ALIASES)
    run_params = attach_lora(unet, adapter_name="x", target_paths=paths, rank=4, alpha=4)
    run_names = [n for n, p in unet.named_parameters() if any(p is q for q in run_params)]
    by_key = {name.replace(".x.", "."): i for i, name in enumerate(run_names)}
    assert len(saved["state"]) == len(params) == len(by_key)
    optimizer.load_state_dict(
        {
            "state": {keys.index(k): saved["state"][by_key[k]] for k in keys},
            "param_groups": [{**saved["param_groups"][0], "params": list(range(len(keys)))}],
        }
    )
    optimizer.eval()
    want = {k: p.detach() for k, p in zip(keys, params, strict=True)}
    assert any(not torch.equal(want[k], state[k]) for k in keys)  # eval weights differ from train weights
    expected = to_kohya({"unet": want}, 4.0, torch.float32)
    for key, value in expected.items():
        assert torch.allclose(exported[key], value, atol=1e-6), key


def test_optimizer_args_are_checked_against_the_signature(tmp_path: Path, tiny_sd: Path, dataset: Path) -> None:
    with pytest.raises(ConfigError) as err:
        sd_config(tmp_path, tiny_sd, dataset, optimizer="prodigy", optimizer_args={"d_coeff": 2, "lr": 1.0})
    problems = {p.message: p.fix for p in err.value.problems}
    assert any("did you mean `d_coef`" in fix for fix in problems.values())
    assert any("`lr` is set by lorad" in m for m in problems)
    # kohya's list form works, values parsed as Python literals
    config = sd_config(
        tmp_path, tiny_sd, dataset, optimizer="lion", optimizer_args=["betas=(0.95,0.98)", "weight_decay=0.1"]
    )
    assert config.optimizer_args.as_kwargs() == {"betas": (0.95, 0.98), "weight_decay": 0.1}
    optimizer = build_optimizer([{"params": [nn.Parameter(torch.zeros(2))], "lr": 1e-4}], config)
    assert optimizer.param_groups[0]["betas"] == (0.95, 0.98) and optimizer.param_groups[0]["weight_decay"] == 0.1
    # the LLM family checks them the same way
    with pytest.raises(ConfigError) as err:
        parse_llm_config(
            {
                "train_data": str(dataset),
                "base_model": "x/y",
                "output_dir": str(tmp_path / "llm"),
                "optimizer": "came",
                "optimizer_args": {"beta": (0.9, 0.99, 0.999)},
            },
            base_dir=tmp_path,
        )
    assert any("did you mean `betas`" in p.fix for p in err.value.problems)


def test_optimizer_typo_and_8bit_on_cpu_are_config_errors(tmp_path: Path, tiny_sd: Path, dataset: Path) -> None:
    with pytest.raises(ConfigError) as err:
        sd_config(tmp_path, tiny_sd, dataset, optimizer="prodigyy")
    assert "did you mean `prodigy`" in err.value.problems[0].fix
    with pytest.raises(ConfigError) as err:
        sd_config(tmp_path, tiny_sd, dataset, optimizer="lion8bit")
    assert any(p.key == "optimizer" for p in err.value.problems)  # no bitsandbytes here, or CUDA-only on cpu


def test_learning_rate_hints_fit_the_optimizer(tmp_path: Path, tiny_sd: Path, dataset: Path) -> None:
    def hints(**overrides: object) -> list[str]:
        return optimizer_hints(sd_config(tmp_path, tiny_sd, dataset, **overrides))

    assert any("learning_rate: 1.0" in h for h in hints(optimizer="prodigy", learning_rate="1e-4"))
    assert hints(optimizer="prodigy", learning_rate=1.0) == []
    assert any("3-10x below" in h for h in hints(optimizer="lion", learning_rate="1e-3"))
    assert hints(optimizer="lion", learning_rate="5e-5") == []
    assert any("relative-step" in h for h in hints(optimizer="adafactor", lr_scheduler="cosine"))
    assert hints(optimizer="adafactor", lr_scheduler="cosine", optimizer_args={"relative_step": False}) == []
    assert any("constant" in h for h in hints(optimizer="adamw_schedulefree", lr_scheduler="linear"))


@pytest.mark.slow
def test_a_hint_reaches_the_run_log(tmp_path: Path, tiny_sd: Path, dataset: Path) -> None:
    lines: list[LogLine] = []
    train(
        sd_config(tmp_path, tiny_sd, dataset, optimizer="prodigy", learning_rate="1e-4", max_train_steps=1),
        on_event=lambda e: lines.append(e) if isinstance(e, LogLine) else None,
    )
    assert any(line.level == "warning" and "prodigy" in line.message for line in lines)


@pytest.mark.slow
def test_llm_family_trains_with_schedulefree_and_exports_ema_alongside(tiny_llm: Path, tmp_path: Path) -> None:
    from tests.support.datasets import tiny_llm_values, write_jsonl

    data = write_jsonl(
        tmp_path / "d.jsonl", [{"instruction": f"What is {i}+1?", "output": f"{i + 1}"} for i in range(12)]
    )
    config = parse_llm_config(
        tiny_llm_values(
            tiny_llm,
            data,
            tmp_path / "llm",
            optimizer="adamw_schedulefree",
            lr_scheduler="constant",
            ema_decay=0.5,
            max_train_steps=6,
            save_precision="fp32",
        ),
        base_dir=tmp_path,
    )
    result = train(config)
    adapter = load_file(str(Path(result.outputs["adapter"]) / "adapter_model.safetensors"))
    ema = load_file(str(Path(result.outputs["adapter_ema"]) / "adapter_model.safetensors"))
    assert adapter.keys() == ema.keys()
    assert any(not torch.equal(adapter[k], ema[k]) for k in adapter)
    assert math.isfinite(result.final_loss)
