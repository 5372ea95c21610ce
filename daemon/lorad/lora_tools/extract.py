"""``lorad lora extract``: a LoRA from the difference of two checkpoints (a fine-tune and its base).

For each layer kohya's LoRA would adapt (attention blocks and text encoders; resnets and samplers too with
``conv_rank``), the difference tuned - base is decomposed by SVD and truncated to the rank: the best
rank-r approximation there is (Eckart–Young). Both checkpoints stream one weight at a time. Layers whose
difference is at most ``min_diff`` everywhere are left out (kohya's extract skips unchanged text encoders
the same way). alpha = rank, so the update is ``up @ down`` exactly.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from lorad.errors import LoraFileError
from lorad.lora_tools.base_families import BaseFamily
from lorad.lora_tools.checkpoint_keys import (
    checkpoint_family,
    checkpoint_targets,
    is_conv_block_module,
    is_transformer_module,
)
from lorad.lora_tools.layouts import write_lora
from lorad.lora_tools.lora_file import LoraFile, LoraModule
from lorad.lora_tools.low_rank import choose_rank, energy_kept, split_factors, svd_of_matrix
from lorad.lora_tools.tensor_files import TensorReader

BASE_VERSIONS = {"sd1": "sd_v1", "sd2": "sd_v2", "sdxl": "sdxl_base_v1-0", "flux": "flux1"}


@dataclass(frozen=True)
class ExtractResult:
    output: str
    modules: int
    skipped_unchanged: int
    kept: float  # mean fraction of the differences' Frobenius norm the LoRA keeps

    def summary(self) -> str:
        return (
            f"wrote {self.output}: {self.modules} modules ({self.skipped_unchanged} unchanged layers left out), "
            f"mean kept {self.kept:.4f} of the difference"
        )


def extract_lora(
    base: Path,
    tuned: Path,
    dest: Path,
    *,
    rank: int,
    conv_rank: int | None = None,
    min_diff: float = 0.0,
    layout: str = "kohya",
    dtype: torch.dtype | None = None,
) -> ExtractResult:
    """Extract a rank-``rank`` LoRA of ``tuned - base`` into ``dest``."""
    if rank < 1 or (conv_rank is not None and conv_rank < 1):
        raise LoraFileError("`--rank` (and `--conv-rank`) must be at least 1")
    with TensorReader(Path(base)) as old, TensorReader(Path(tuned)) as new:
        shapes = {k: old.shape(k) for k in old.names()}
        family = checkpoint_family(list(shapes), str(base))
        tuned_family = checkpoint_family(new.names(), str(tuned))
        if tuned_family != family:
            raise LoraFileError(
                f"{Path(base).name} is {family} but {Path(tuned).name} is {tuned_family}",
                "Extract from two checkpoints of one model.",
            )
        targets = checkpoint_targets(shapes, family)
        by_key: dict[str, list[tuple[str, tuple[int, int] | None]]] = {}
        for name, target in targets.items():
            if family in ("sd1", "sd2") and name.startswith(
                ("lora_unet_input_blocks", "lora_unet_middle_block", "lora_unet_output_blocks")
            ):
                continue  # kohya names SD 1.x/2.x modules by diffusers path; these are the LDM-named duplicates
            dims = len(shapes[target.key])
            is_1x1 = dims == 4 and tuple(shapes[target.key][2:]) == (1, 1)
            wanted = (is_transformer_module(name) and (dims == 2 or is_1x1)) or (
                conv_rank is not None and is_conv_block_module(name) and dims in (2, 4)
            )
            if wanted:
                by_key.setdefault(target.key, []).append((name, target.rows))
        modules: dict[str, LoraModule] = {}
        kept: list[float] = []
        unchanged = 0
        for key in old.names():  # file order: sequential reads
            if key not in by_key:
                continue
            if key not in new.entries or new.shape(key) != shapes[key]:
                raise LoraFileError(
                    f"`{key}` is missing or has another shape in {Path(tuned).name}",
                    "Extract from two checkpoints of one model.",
                )
            difference = new.read(key).float() - old.read(key).float()
            for name, rows in by_key[key]:
                part = difference[rows[0] : rows[1]] if rows else difference
                if float(part.abs().max()) <= min_diff:
                    unchanged += 1
                    continue
                matrix = part.reshape(part.shape[0], -1).double()
                factors = svd_of_matrix(matrix)
                limit = conv_rank if part.dim() == 4 and tuple(part.shape[2:]) != (1, 1) else rank
                k = choose_rank(factors.s, rank=limit)
                up, down = split_factors(factors, k)
                out_dtype = dtype or (
                    torch.float16 if part.dtype == torch.float32 and new.entries[key].dtype == "F16" else torch.float32
                )
                modules[name] = LoraModule(
                    down=down.reshape(k, *part.shape[1:]).to(out_dtype).contiguous(),
                    up=(up.reshape(part.shape[0], k, 1, 1) if part.dim() == 4 else up).to(out_dtype).contiguous(),
                    alpha=torch.tensor(float(k), dtype=out_dtype),
                )
                kept.append(energy_kept(factors.s, k))
            del difference
    if not modules:
        raise LoraFileError(f"{Path(tuned).name} does not differ from {Path(base).name} in any layer a LoRA adapts")
    metadata = {
        "ss_network_module": "networks.lora",
        "ss_network_dim": str(rank),
        "ss_network_alpha": str(rank),
        "ss_base_model_version": BASE_VERSIONS[family],
        "ss_v2": str(family == "sd2"),
        "ss_training_comment": f"extracted by lorad from {Path(tuned).name} - {Path(base).name}",
        "lorad_extract": json.dumps(
            {"base": Path(base).name, "tuned": Path(tuned).name, "rank": rank, "conv_rank": conv_rank}
        ),
    }
    lora = LoraFile(Path(dest), "kohya", BaseFamily(family, "extracted"), modules, metadata)
    out = write_lora(lora, Path(dest), layout)
    return ExtractResult(str(out), len(modules), unchanged, sum(kept) / len(kept))
