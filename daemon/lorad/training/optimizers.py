"""Optimizer and learning-rate schedule for LoRA parameters."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
from torch.optim.lr_scheduler import LambdaLR

from lorad.errors import ConfigError, ConfigProblem

if TYPE_CHECKING:
    from lorad.config.schema import TrainingKeys


def build_optimizer(groups: Sequence[dict], config: TrainingKeys) -> torch.optim.Optimizer:
    """The config's optimizer over parameter groups (each a dict with "params" and "lr"): AdamW, or
    bitsandbytes' 8-bit AdamW, with the config's betas, epsilon and weight decay."""
    betas = (config.adam_beta1, config.adam_beta2)
    if config.optimizer == "adamw8bit":
        try:
            import bitsandbytes as bnb
        except ImportError:
            raise ConfigError(
                [
                    ConfigProblem(
                        "optimizer",
                        "adamw8bit needs the bitsandbytes package",
                        "run `pip install bitsandbytes`, or use adamw",
                    )
                ]
            ) from None
        return bnb.optim.AdamW8bit(list(groups), betas=betas, eps=config.adam_epsilon, weight_decay=config.weight_decay)
    return torch.optim.AdamW(list(groups), betas=betas, eps=config.adam_epsilon, weight_decay=config.weight_decay)


def build_scheduler(optimizer: torch.optim.Optimizer, config: TrainingKeys, *, total_steps: int) -> LambdaLR:
    """The config's learning-rate schedule over ``total_steps`` optimizer steps, with diffusers' (and
    transformers') semantics: ``lr_warmup_steps`` of linear warmup from 0, then constant, linear,
    cosine, cosine_with_restarts (``lr_scheduler_num_cycles``) or polynomial (``lr_scheduler_power``,
    decaying to ``lr_scheduler_min_lr_ratio`` x the learning rate). Every parameter group follows the
    same factor of its own learning rate."""
    from diffusers.optimization import get_polynomial_decay_schedule_with_warmup, get_scheduler

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
