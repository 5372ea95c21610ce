"""``lorad lora resize``: a LoRA at a lower (or dynamically chosen) rank, by SVD of each module's update.

Each module's update keeps its scale (alpha / rank): the new alpha is that scale times the new rank, so
the kept part of the update is exactly the truncated SVD of the old one. The report gives, per module,
the fraction of the update's Frobenius norm kept (1.0 = lossless).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from lorad.errors import LoraFileError
from lorad.lora_tools.layouts import read_lora, write_lora
from lorad.lora_tools.lora_file import LoraFile, LoraModule
from lorad.lora_tools.low_rank import DYNAMIC_METHODS, choose_rank, energy_kept, split_factors, svd_of_product


@dataclass(frozen=True)
class ModuleResize:
    name: str
    old_rank: int
    new_rank: int
    kept: float  # fraction of the update's Frobenius norm kept


@dataclass(frozen=True)
class ResizeResult:
    output: str
    modules: list[ModuleResize]

    @property
    def mean_kept(self) -> float:
        return sum(m.kept for m in self.modules) / len(self.modules) if self.modules else 1.0

    def summary(self) -> str:
        ranks = sorted({m.new_rank for m in self.modules})
        worst = min(self.modules, key=lambda m: m.kept, default=None)
        shown = str(ranks[0]) if len(ranks) == 1 else f"{ranks[0]}..{ranks[-1]}"
        text = f"wrote {self.output}: {len(self.modules)} modules, new rank {shown}"
        text += f", mean kept {self.mean_kept:.4f} of the Frobenius norm"
        if worst:
            text += f" (least: {worst.kept:.4f} in {worst.name})"
        return text


def parse_dynamic(text: str) -> tuple[str, float]:
    """``sv_fro:0.9`` -> ("sv_fro", 0.9); LoraFileError naming the valid forms otherwise."""
    method, _, value = text.partition(":")
    try:
        target = float(value)
    except ValueError:
        target = float("nan")
    valid = method in DYNAMIC_METHODS and target > 0 and (method == "sv_ratio" or target <= 1)
    if not valid:
        raise LoraFileError(
            f"`--dynamic {text}` is not a dynamic rank rule",
            "Write sv_fro:F or sv_cumulative:F with 0 < F <= 1, or sv_ratio:N with N > 0 (e.g. sv_fro:0.9).",
        )
    return method, target


def resize_module(
    module: LoraModule, *, rank: int | None, method: str | None, target: float | None
) -> tuple[LoraModule, float]:
    """The module at its new rank, and the fraction of its update's Frobenius norm kept."""
    up, down = module.factors()
    factors = svd_of_product(up.double(), down.double())
    k = choose_rank(factors.s, rank=rank, method=method, target=target)
    new_up, new_down = split_factors(factors, k)
    dtype = module.down.dtype
    shaped_down = new_down.reshape(k, *module.down.shape[1:]).to(dtype).contiguous()
    shaped_up = new_up.reshape(module.up.shape[0], k, *module.up.shape[2:]).to(dtype).contiguous()
    alpha_dtype = module.alpha.dtype if module.alpha is not None else dtype
    alpha = torch.tensor(module.scale * k, dtype=alpha_dtype)
    return LoraModule(down=shaped_down, up=shaped_up, alpha=alpha), energy_kept(factors.s, k)


def resize_lora(
    path: Path, dest: Path, *, rank: int | None = None, dynamic: str | None = None, layout: str | None = None
) -> ResizeResult:
    """Resize every module of ``path`` and write ``dest`` (in ``layout``, default: the input's)."""
    if rank is None and dynamic is None:
        raise LoraFileError(
            "resize needs `--rank R` or `--dynamic METHOD:VALUE`", "e.g. --rank 8 or --dynamic sv_fro:0.9"
        )
    if rank is not None and rank < 1:
        raise LoraFileError(f"`--rank {rank}` must be at least 1")
    method, target = parse_dynamic(dynamic) if dynamic else (None, None)
    lora = read_lora(Path(path))
    _check_plain(lora)
    results = []
    modules = {}
    for name, module in lora.modules.items():
        modules[name], kept = resize_module(module, rank=rank, method=method, target=target)
        results.append(ModuleResize(name, module.rank, modules[name].rank, kept))
    lora.modules = modules
    ranks = sorted({m.rank for m in modules.values()})
    alphas = sorted({m.alpha_value for m in modules.values()})
    rule = f"rank {rank}" if not dynamic else f"{dynamic}" + (f" (at most rank {rank})" if rank else "")
    lora.metadata |= {
        "ss_network_dim": str(ranks[0]) if len(ranks) == 1 else "Dynamic",
        "ss_network_alpha": f"{alphas[0]:g}" if len(alphas) == 1 else "Dynamic",
        "ss_training_comment": (lora.metadata.get("ss_training_comment", "") + f"; resized by lorad to {rule}").lstrip(
            "; "
        ),
        "lorad_resize": json.dumps({"rule": rule, "from_ranks": sorted({r.old_rank for r in results})}),
    }
    out = write_lora(lora, Path(dest), layout or lora.layout)
    return ResizeResult(str(out), results)


def _check_plain(lora: LoraFile) -> None:
    if lora.foreign:
        kinds = ", ".join(sorted(set(lora.foreign_types.values())))
        raise LoraFileError(f"{lora.path} holds {kinds} modules; lorad resizes plain LoRA modules only")
    bad = [n for n, m in lora.modules.items() if m.up.shape[1] != m.down.shape[0]]
    if bad:
        raise LoraFileError(
            f"{lora.path}: module `{bad[0]}` has mismatched down/up ranks", "Run `lorad lora inspect` on it."
        )
    if not lora.modules:
        raise LoraFileError(f"{lora.path} has no complete LoRA modules", "Run `lorad lora inspect` on it.")
