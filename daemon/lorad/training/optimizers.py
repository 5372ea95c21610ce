"""Optimizer and learning-rate schedule for LoRA parameters."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch.optim.lr_scheduler import LambdaLR

from lorad.errors import ConfigError, ConfigProblem


def build_optimizer(
    groups: Sequence[dict], *, name: str, betas: tuple[float, float], eps: float, weight_decay: float
) -> torch.optim.Optimizer:
    """AdamW over parameter groups (each a dict with "params" and "lr"), or bitsandbytes' 8-bit AdamW."""
    if name == "adamw8bit":
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
        return bnb.optim.AdamW8bit(list(groups), betas=betas, eps=eps, weight_decay=weight_decay)
    return torch.optim.AdamW(list(groups), betas=betas, eps=eps, weight_decay=weight_decay)


def build_scheduler(optimizer: torch.optim.Optimizer, *, name: str, warmup_steps: int, total_steps: int) -> LambdaLR:
    """A LambdaLR with linear warmup then the named decay (constant, linear, cosine,
    cosine_with_restarts with 3 cycles, polynomial with power 1 to 0)."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / (warmup_steps + 1)
        span = max(1, total_steps - warmup_steps)
        progress = min(1.0, (step - warmup_steps) / span)
        if name == "constant":
            return 1.0
        if name in ("linear", "polynomial"):
            return max(0.0, 1.0 - progress)
        if name == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * progress))
        if name == "cosine_with_restarts":
            return 0.5 * (1.0 + math.cos(math.pi * ((3 * progress) % 1.0))) if progress < 1 else 0.0
        raise AssertionError(name)  # the config loader only admits the names above

    return LambdaLR(optimizer, factor)
