"""The optimizers a config can name, built over the run's parameter groups, and the learning-rate schedule.

Each optimizer comes from the package that maintains it (torch, bitsandbytes, prodigyopt, transformers,
lion-pytorch, schedulefree, pytorch-optimizer); :data:`OPTIMIZERS` says which. This module imports
nothing heavy at import time, so config validation can ask it about names and arguments; torch and
the optimizer's package load only when one is built or its signature is checked.
"""

from __future__ import annotations

import contextlib
import difflib
import importlib
import importlib.util
import inspect
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from lorad.errors import ConfigError, ConfigProblem

if TYPE_CHECKING:
    import torch
    from torch.optim.lr_scheduler import LambdaLR

    from lorad.config.schema import TrainingKeys


@dataclass(frozen=True)
class OptimizerKind:
    """Where an optimizer lives and how the shared keys map onto it."""

    module: str  # import path of the class
    attr: str  # class name
    package: str  # what `pip install` needs
    adam_like: bool  # takes betas=(adam_beta1, adam_beta2) and eps=adam_epsilon
    cuda_only: bool = False


OPTIMIZERS: Mapping[str, OptimizerKind] = {
    "adamw": OptimizerKind("torch.optim", "AdamW", "torch", adam_like=True),
    "adamw8bit": OptimizerKind("bitsandbytes.optim", "AdamW8bit", "bitsandbytes", adam_like=True, cuda_only=True),
    "paged_adamw8bit": OptimizerKind(
        "bitsandbytes.optim", "PagedAdamW8bit", "bitsandbytes", adam_like=True, cuda_only=True
    ),
    "lion8bit": OptimizerKind("bitsandbytes.optim", "Lion8bit", "bitsandbytes", adam_like=False, cuda_only=True),
    "prodigy": OptimizerKind("prodigyopt", "Prodigy", "prodigyopt", adam_like=True),
    "adafactor": OptimizerKind("transformers.optimization", "Adafactor", "transformers", adam_like=False),
    "lion": OptimizerKind("lion_pytorch", "Lion", "lion-pytorch", adam_like=False),
    "adamw_schedulefree": OptimizerKind("schedulefree", "AdamWScheduleFree", "schedulefree", adam_like=True),
    # came-pytorch (the paper's code) has had one release line, last in early 2024; pytorch-optimizer's CAME
    # is maintained and tested with the rest of that collection.
    "came": OptimizerKind("pytorch_optimizer", "CAME", "pytorch-optimizer", adam_like=False),
}

# Set by lorad from the config, never through optimizer_args.
_OWNED = {"params", "lr"}


def _kind(name: str) -> OptimizerKind:
    return OPTIMIZERS[name]


def _optimizer_class(name: str) -> type:
    kind = _kind(name)
    try:
        return getattr(importlib.import_module(kind.module), kind.attr)
    except ImportError:
        raise ConfigError(
            [
                ConfigProblem(
                    "optimizer",
                    f"{name} needs the {kind.package} package, which is not installed",
                    f"run `pip install {kind.package}`, or use adamw",
                )
            ]
        ) from None


def accepted_arguments(name: str) -> list[str]:
    """The keyword arguments optimizer ``name``'s constructor names (besides params and lr)."""
    signature = inspect.signature(_optimizer_class(name).__init__)
    return [
        p.name
        for p in signature.parameters.values()
        if p.name != "self" and p.name not in _OWNED and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
    ]


def optimizer_problems(values: Mapping[str, Any]) -> list[ConfigProblem]:
    """Config checks of ``optimizer`` and ``optimizer_args`` (a validated-key mapping): the package is
    installed, an 8-bit optimizer is not asked for on the CPU, and every optimizer argument is one the
    optimizer's constructor takes (with a "did you mean")."""
    name = values.get("optimizer")
    if name not in OPTIMIZERS:
        return []
    kind = _kind(name)
    problems: list[ConfigProblem] = []
    if importlib.util.find_spec(kind.module.partition(".")[0]) is None:
        return [
            ConfigProblem(
                "optimizer",
                f"{name} needs the {kind.package} package, which is not installed",
                f"run `pip install {kind.package}`"
                + (" on a machine with a CUDA GPU" if kind.cuda_only else "")
                + ", or use adamw",
            )
        ]
    if kind.cuda_only and str(values.get("device", "")).strip().lower() in ("cpu", "mps"):
        problems.append(
            ConfigProblem(
                "optimizer",
                f"{name} runs on CUDA GPUs only, but device is {values['device']}",
                f"use {name.replace('8bit', '').replace('paged_', '')} on this device",
            )
        )
    args = values.get("optimizer_args")
    if args is not None and args.items:
        known = accepted_arguments(name)
        for arg, _ in args.items:
            if arg in _OWNED:
                problems.append(
                    ConfigProblem(
                        "optimizer_args",
                        f"`{arg}` is set by lorad",
                        "set learning_rate (and text_encoder_lr) instead" if arg == "lr" else "remove it",
                    )
                )
            elif arg not in known:
                close = difflib.get_close_matches(arg, known, n=1)
                problems.append(
                    ConfigProblem(
                        "optimizer_args",
                        f"{name} has no argument `{arg}`",
                        (f"did you mean `{close[0]}`? " if close else "") + f"{name} takes: " + ", ".join(known),
                    )
                )
    return problems


def _relative_step(config: TrainingKeys) -> bool:
    return config.optimizer == "adafactor" and bool(config.optimizer_args.as_kwargs().get("relative_step", True))


def optimizer_hints(config: TrainingKeys, group_lrs: Sequence[float] = ()) -> list[str]:
    """Warnings about learning-rate settings that do not fit the chosen optimizer (the run still starts)."""
    lrs = sorted({config.learning_rate, *group_lrs})
    shown = ", ".join(f"{lr:g}" for lr in lrs)
    hints: list[str] = []
    if config.optimizer == "prodigy" and min(lrs) < 0.1:
        hints.append(
            f"prodigy estimates its own step size and expects learning_rate: 1.0 (and text_encoder_lr 1.0 or unset); "
            f"with {shown} it multiplies that estimate down and barely trains"
        )
    if config.optimizer in ("lion", "lion8bit") and max(lrs) > 3e-4:
        hints.append(
            f"lion's sign-sized updates want a learning rate 3-10x below AdamW's (e.g. 3e-5 to 1e-4); {shown} "
            "is likely to diverge"
        )
    if _relative_step(config) and (config.lr_scheduler != "constant" or config.lr_warmup_steps):
        hints.append(
            "adafactor in relative-step mode sets its own learning rate: learning_rate, lr_scheduler and "
            "lr_warmup_steps are ignored (optimizer_args: {relative_step: false} uses them)"
        )
    if config.optimizer == "adamw_schedulefree" and config.lr_scheduler != "constant":
        hints.append(
            f"adamw_schedulefree replaces the schedule; lr_scheduler {config.lr_scheduler} fights it: use "
            "lr_scheduler: constant (warm up with optimizer_args: {warmup_steps: N})"
        )
    return hints


def optimizer_kwargs(config: TrainingKeys) -> dict[str, Any]:
    """The constructor keywords (besides params and lr) the config gives its optimizer: betas/eps for the
    Adam-like ones, weight_decay for all, adafactor's relative-step settings, then ``optimizer_args`` over them."""
    kind = _kind(config.optimizer)
    kwargs: dict[str, Any] = {"weight_decay": config.weight_decay}
    if kind.adam_like:
        kwargs |= {"betas": (config.adam_beta1, config.adam_beta2), "eps": config.adam_epsilon}
    if config.optimizer == "adafactor":
        # Relative step (Adafactor picks the rate: min(1e-2, 1/sqrt(step))), but not scaled by each
        # parameter's RMS: LoRA's up weights start at zero, and an RMS-scaled step would keep them there.
        kwargs |= {"relative_step": True, "scale_parameter": False, "warmup_init": False}
    return kwargs | config.optimizer_args.as_kwargs()


def build_optimizer(groups: Sequence[dict], config: TrainingKeys) -> torch.optim.Optimizer:
    """The config's optimizer over parameter groups (each a dict with "params" and "lr").

    Raises ConfigError when its package is missing, an 8-bit optimizer meets non-CUDA parameters, or the
    optimizer rejects ``optimizer_args``. Schedule-free optimizers are returned in train mode."""
    cls = _optimizer_class(config.optimizer)
    kind = _kind(config.optimizer)
    groups = [dict(g) for g in groups]
    if kind.cuda_only:
        devices = {p.device.type for g in groups for p in g["params"]}
        if devices != {"cuda"}:
            raise ConfigError(
                [
                    ConfigProblem(
                        "optimizer",
                        f"{config.optimizer} runs on CUDA GPUs only; this run trains on {', '.join(sorted(devices))}",
                        f"use {config.optimizer.replace('8bit', '').replace('paged_', '')}, or train on a CUDA GPU",
                    )
                ]
            )
    kwargs = optimizer_kwargs(config)
    if config.optimizer == "adamw" and "fused" not in kwargs:
        # The fused kernel updates every parameter in one launch and keeps its step count on the device
        # (the foreach path reads a host step counter); CUDA and CPU both have it.
        devices = {p.device.type for g in groups for p in g["params"]}
        kwargs["fused"] = devices <= {"cuda", "cpu"} or None
    # The default lr matters beyond the groups: diffusers' polynomial schedule reads it.
    lr: float | None = config.learning_rate
    if config.optimizer == "adafactor" and kwargs.get("relative_step"):
        lr = None  # relative step: Adafactor computes it (and refuses a manual one)
        for group in groups:
            group["lr"] = None
    try:
        optimizer = cls(groups, lr=lr, **kwargs)
    except (TypeError, ValueError) as err:
        raise ConfigError(
            [
                ConfigProblem(
                    "optimizer_args",
                    f"{config.optimizer} refused {dict(config.optimizer_args.items)}: {err}",
                    "fix the value (see the optimizer's documentation), or remove it",
                )
            ]
        ) from None
    set_optimizer_mode(optimizer, train=True)
    return optimizer


@contextlib.contextmanager
def eval_weights(optimizer: torch.optim.Optimizer) -> Iterator[None]:
    """The weights a file should hold while the block runs (schedule-free's averaged ones; the trained
    weights themselves for every other optimizer), training's own afterwards."""
    set_optimizer_mode(optimizer, train=False)
    try:
        yield
    finally:
        set_optimizer_mode(optimizer, train=True)


def set_optimizer_mode(optimizer: torch.optim.Optimizer, *, train: bool) -> None:
    """Schedule-free optimizers keep two weight sequences: train mode holds the point gradients are taken at,
    eval mode the averaged weights to use and export. Switch between them; other optimizers have one."""
    switch = getattr(optimizer, "train" if train else "eval", None)
    if callable(switch):
        switch()


def build_scheduler(optimizer: torch.optim.Optimizer, config: TrainingKeys, *, total_steps: int) -> LambdaLR:
    """The config's learning-rate schedule over ``total_steps`` optimizer steps, with diffusers' (and
    transformers') semantics: ``lr_warmup_steps`` of linear warmup from 0, then constant, linear,
    cosine, cosine_with_restarts (``lr_scheduler_num_cycles``) or polynomial (``lr_scheduler_power``,
    decaying to ``lr_scheduler_min_lr_ratio`` x the learning rate). Every parameter group follows the
    same factor of its own learning rate. Adafactor in relative-step mode gets transformers'
    AdafactorSchedule, which only reports the rate Adafactor chose."""
    from diffusers.optimization import get_polynomial_decay_schedule_with_warmup, get_scheduler

    if _relative_step(config):
        from transformers.optimization import AdafactorSchedule

        return AdafactorSchedule(optimizer)
    warmup = min(config.lr_warmup_steps, total_steps)
    if config.lr_scheduler == "polynomial":
        # The schedule is a factor of each group's lr; diffusers computes it from the optimizer's default lr.
        lr_init = optimizer.defaults["lr"]
        return get_polynomial_decay_schedule_with_warmup(
            optimizer,
            num_warmup_steps=warmup,
            num_training_steps=total_steps,
            lr_end=config.lr_scheduler_min_lr_ratio * lr_init,
            power=config.lr_scheduler_power,
        )
    name = "constant_with_warmup" if config.lr_scheduler == "constant" else config.lr_scheduler
    return get_scheduler(
        name,
        optimizer,
        num_warmup_steps=warmup,
        num_training_steps=total_steps,
        num_cycles=config.lr_scheduler_num_cycles,
    )
