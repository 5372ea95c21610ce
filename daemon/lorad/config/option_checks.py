"""Config checks of the training options that involve several keys: network types and their dropouts,
regularization images and masks, caption options, timesteps, and the optimizer (shared with the LLM family).

Each function takes the converted key values of one config and returns every problem it finds.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lorad.errors import ConfigProblem

LYCORIS_TYPES = ("locon", "loha", "lokr", "dora")


def optimizer_checks(values: dict[str, Any]) -> list[ConfigProblem]:
    """``optimizer`` and ``optimizer_args`` (every family). The optimizer catalogue is imported only when a config
    names either: clients that validate configs (the TUI, ``lorad config --check``) stay free of the training
    package otherwise (it imports no torch at import time either way)."""
    if "optimizer" not in values and "optimizer_args" not in values:
        return []
    from lorad.training.optimizers import optimizer_problems

    return optimizer_problems(values)


def network_checks(values: dict[str, Any]) -> list[ConfigProblem]:
    """``network_type`` with the keys only some types honour."""
    problems: list[ConfigProblem] = []
    kind = values.get("network_type", "lora")
    if kind == "lora":
        for key in ("conv_dim", "conv_alpha"):
            if values.get(key) is not None:
                problems.append(
                    ConfigProblem(
                        key, "adapts convolutions, which network_type lora does not", "set network_type: locon"
                    )
                )
        for key in ("rank_dropout", "module_dropout"):
            if values.get(key):
                problems.append(
                    ConfigProblem(
                        key,
                        "is a LyCORIS dropout; PEFT's LoRA (network_type lora) has none",
                        "set network_type: locon (LoRA plus the ResNet convolutions), or use lora_dropout",
                    )
                )
    elif values.get("lora_dropout") and kind in ("loha", "lokr", "dora"):
        problems.append(
            ConfigProblem(
                "lora_dropout",
                f"has no effect on {kind} (LyCORIS implements no plain dropout for it)",
                "use rank_dropout or module_dropout instead",
            )
        )
    if values.get("conv_alpha") is not None and kind in ("loha", "lokr", "dora") and values.get("conv_dim") is None:
        problems.append(
            ConfigProblem("conv_alpha", f"is set but conv_dim is not, so {kind} adapts no convolution", "set conv_dim")
        )
    if kind != "lora" and values.get("init_lora") is not None:
        problems.append(
            ConfigProblem(
                "init_lora",
                f"continues plain LoRA files; network_type is {kind}",
                "remove init_lora, or set network_type: lora",
            )
        )
    return problems


def data_option_checks(values: dict[str, Any]) -> list[ConfigProblem]:
    """Regularization images, masks, caption options and the timestep range."""
    problems: list[ConfigProblem] = []
    for key in ("reg_data_dir", "mask_dir"):
        path = values.get(key)
        if isinstance(path, Path) and not path.is_dir():
            what = "is a file, not a folder" if path.exists() else "does not exist"
            problems.append(ConfigProblem(key, f"{path} {what}", "point it at a folder of images, or remove the key"))
    if values.get("mask_dir") is not None and not values.get("masked_loss"):
        problems.append(ConfigProblem("mask_dir", "is set but masked_loss is off", "set masked_loss: true"))
    train, reg = values.get("train_data_dir"), values.get("reg_data_dir")
    if isinstance(train, Path) and isinstance(reg, Path) and (reg == train or train in reg.parents):
        problems.append(
            ConfigProblem(
                "reg_data_dir", "lies inside train_data_dir, so its images would train as both", "move it out"
            )
        )
    if "prior_loss_weight" in values and values.get("reg_data_dir") is None and values["prior_loss_weight"] != 1.0:
        problems.append(
            ConfigProblem("prior_loss_weight", "is set but reg_data_dir is not", "set reg_data_dir, or remove it")
        )
    lo, hi = values.get("min_timestep", 0), values.get("max_timestep", 1000)
    if isinstance(lo, int) and isinstance(hi, int) and lo >= hi:
        problems.append(
            ConfigProblem("min_timestep", f"{lo} is not below max_timestep {hi}", "make min_timestep < max_timestep")
        )
    separator = values.get("keep_tokens_separator")
    if separator is not None and separator != "" and not separator.strip():
        problems.append(ConfigProblem("keep_tokens_separator", "is only spaces", 'use a marker such as "|||"'))
    if separator and values.get("keep_tokens"):
        problems.append(
            ConfigProblem(
                "keep_tokens",
                "is set together with keep_tokens_separator",
                "use one: the separator marks the kept part of each caption",
            )
        )
    return problems


def option_checks(values: dict[str, Any]) -> list[ConfigProblem]:
    """Every check above: what an image family's config runs."""
    return network_checks(values) + data_option_checks(values) + optimizer_checks(values)
