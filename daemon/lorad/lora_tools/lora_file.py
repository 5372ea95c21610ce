"""A LoRA file in memory, whatever layout it came in: modules under kohya's names, plus what else it held.

Every layout reads into a :class:`LoraFile` (:mod:`lorad.lora_tools.layouts`); kohya names are the pivot
because they are the one flat, layout-free spelling every loader (A1111, Forge, ComfyUI, diffusers)
understands for SD 1.x/2.x, SDXL and Flux alike.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from lorad.lora_tools.base_families import BaseFamily


@dataclass
class LoraModule:
    """One adapted layer: update = (alpha / rank) * up @ down (conv kernels flattened)."""

    down: torch.Tensor  # r x in, or r x in x kh x kw
    up: torch.Tensor  # out x r, or out x r x 1 x 1
    alpha: torch.Tensor | None  # a 0-d tensor as stored; None when the file has none (loaders then use rank)

    @property
    def rank(self) -> int:
        return int(self.down.shape[0])

    @property
    def alpha_value(self) -> float:
        """alpha, or the rank when the file has none (kohya's and A1111's rule)."""
        return float(self.alpha.item()) if self.alpha is not None else float(self.rank)

    @property
    def scale(self) -> float:
        return self.alpha_value / self.rank if self.rank else 0.0

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(up, down) as 2-D fp32 matrices (out x r, r x in*kh*kw)."""
        return self.up.float().reshape(self.up.shape[0], -1), self.down.float().reshape(self.down.shape[0], -1)

    def delta(self) -> torch.Tensor:
        """The fp32 update this module adds to its layer's weight, in the weight's shape."""
        up, down = self.factors()
        update = (up @ down) * self.scale
        if self.down.dim() == 4:
            return update.reshape(self.up.shape[0], *self.down.shape[1:])
        return update

    @property
    def parameters(self) -> int:
        return self.down.numel() + self.up.numel()


@dataclass
class LoraFile:
    """A LoRA read from ``path``. ``modules`` are keyed by kohya module name."""

    path: Path
    layout: str  # "kohya" | "diffusers" | "peft" | "comfyui"
    family: BaseFamily
    modules: dict[str, LoraModule]
    metadata: dict[str, str] = field(default_factory=dict)
    # Modules of other network types (LyCORIS LoHa/LoKr, DoRA scales...): module -> {role: tensor}, kept as read.
    foreign: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)
    foreign_types: dict[str, str] = field(default_factory=dict)  # module -> "loha" | "lokr" | ...
    # Tensors no layout reader understood, and modules with only one of up/down: reported by inspect.
    unknown: dict[str, torch.Tensor] = field(default_factory=dict)
    incomplete: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)
    # "kohya" when modules are keyed by kohya names; otherwise the layout whose own names they keep.
    naming: str = "kohya"

    @property
    def dtype(self) -> torch.dtype:
        """The dtype of the modules' weights (the first module's ``down``); fp32 for an empty file."""
        first = next(iter(self.modules.values()), None)
        return first.down.dtype if first else torch.float32

    @property
    def ranks(self) -> set[int]:
        return {m.rank for m in self.modules.values()}
