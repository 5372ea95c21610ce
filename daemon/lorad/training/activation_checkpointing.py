"""Activation (gradient) checkpointing on diffusers and transformers models, across versions.

diffusers calls it ``enable_gradient_checkpointing``; transformers called it
``gradient_checkpointing_enable`` and, from 5.x, ``activation_checkpointing_enable`` (the old
names warn). These helpers pick whichever the model has, newest first.
"""

from __future__ import annotations

from torch import nn


def _first(model: nn.Module, names: tuple[str, ...]):
    for name in names:
        if hasattr(type(model), name):
            return getattr(model, name)
    raise TypeError(f"{type(model).__name__} does not support activation checkpointing")


def enable_activation_checkpointing(model: nn.Module) -> None:
    """Recompute activations in backward instead of storing them (less memory, ~20% slower)."""
    _first(
        model, ("activation_checkpointing_enable", "gradient_checkpointing_enable", "enable_gradient_checkpointing")
    )()


def disable_activation_checkpointing(model: nn.Module) -> None:
    """Turn activation checkpointing off again."""
    _first(
        model, ("activation_checkpointing_disable", "gradient_checkpointing_disable", "disable_gradient_checkpointing")
    )()


def is_activation_checkpointing(model: nn.Module) -> bool:
    """Whether activation checkpointing is on (False for models that do not support it)."""
    for name in ("is_activation_checkpointing", "is_gradient_checkpointing"):
        if hasattr(type(model), name):
            return bool(getattr(model, name))
    return False
