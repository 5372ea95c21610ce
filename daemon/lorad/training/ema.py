"""An exponential moving average of the trained (LoRA) parameters, for ``ema_decay``."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import nn


class ParameterEma:
    """EMA of ``params``: after the first optimizer step it holds those weights; after each later step
    ``ema = decay * ema + (1 - decay) * weights`` (in fp32, on the parameters' devices)."""

    def __init__(self, params: Sequence[nn.Parameter], decay: float) -> None:
        self.params = list(params)
        self.decay = decay
        self.shadow: list[torch.Tensor] | None = None

    @torch.no_grad()
    def update(self) -> None:
        """Fold the parameters' current values in (call after each optimizer step)."""
        if self.shadow is None:
            self.shadow = [p.detach().float().clone() for p in self.params]
            return
        torch._foreach_lerp_(self.shadow, [p.detach().float() for p in self.params], 1.0 - self.decay)

    @contextmanager
    def applied(self) -> Iterator[None]:
        """Within the block the parameters hold the EMA weights; afterwards their own again."""
        if self.shadow is None:
            yield
            return
        saved = [p.detach().clone() for p in self.params]
        with torch.no_grad():
            for param, value in zip(self.params, self.shadow, strict=True):
                param.copy_(value)
        try:
            yield
        finally:
            with torch.no_grad():
                for param, value in zip(self.params, saved, strict=True):
                    param.copy_(value)

    def state_dict(self) -> dict[str, object]:
        """The averaged weights (CPU copies) for a checkpoint."""
        return {"decay": self.decay, "shadow": [t.cpu() for t in self.shadow] if self.shadow is not None else None}

    def load_state_dict(self, state: dict[str, object]) -> None:
        """Restore what :meth:`state_dict` saved."""
        shadow = state.get("shadow")
        self.shadow = (
            [t.to(p.device, torch.float32) for t, p in zip(shadow, self.params, strict=True)] if shadow else None
        )
