"""``lorad lora merge``: several LoRAs into one, exactly (ranks concatenated) or to a rank by SVD.

Weighted updates add: sum_i w_i * s_i * up_i @ down_i. Concatenating ``[w_1 s_1 up_1, w_2 s_2 up_2]``
and ``[down_1; down_2]`` represents that sum exactly with alpha = the summed rank (scale 1). With a target
rank, the sum's SVD is truncated (:func:`lorad.lora_tools.low_rank.svd_of_product`). Files made for
different base families are refused before anything is computed.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from lorad.errors import LoraFileError
from lorad.lora_tools.layouts import read_lora, write_lora
from lorad.lora_tools.lora_file import LoraFile, LoraModule
from lorad.lora_tools.low_rank import choose_rank, energy_kept, split_factors, svd_of_product
from lorad.lora_tools.resize import _check_plain


@dataclass(frozen=True)
class MergeResult:
    output: str
    modules: int
    ranks: list[int]
    kept: float  # mean fraction of the Frobenius norm kept (1.0 for an exact merge)

    def summary(self) -> str:
        ranks = self.ranks[0] if len(self.ranks) == 1 else f"{self.ranks[0]}..{self.ranks[-1]}"
        return f"wrote {self.output}: {self.modules} modules, rank {ranks}, mean kept {self.kept:.4f}"


def parse_weighted(text: str) -> tuple[Path, float]:
    """``A.safetensors:0.7`` -> (path, 0.7); a bare path has weight 1. Paths may contain ':' before the last."""
    head, sep, tail = text.rpartition(":")
    if sep:
        try:
            return Path(head), float(tail)
        except ValueError:
            pass
    return Path(text), 1.0


def read_same_family(inputs: list[tuple[Path, float]], what: str) -> list[tuple[LoraFile, float]]:
    """Read every input; refuse files for different base families or with other network types."""
    loras = [(read_lora(path), weight) for path, weight in inputs]
    families = {lora.family.name for lora, _ in loras}
    if len(families) > 1:
        listing = "; ".join(f"{lora.path.name}: {lora.family.title}" for lora, _ in loras)
        raise LoraFileError(
            f"cannot {what} LoRAs made for different base models ({listing})", "Use LoRAs of one base family."
        )
    namings = {lora.naming for lora, _ in loras}
    if len(namings) > 1:
        raise LoraFileError(
            f"cannot {what} these files: their module names cannot be brought to one layout",
            "Convert them to one layout first (`lorad lora convert`).",
        )
    for lora, _ in loras:
        _check_plain(lora)
    return loras


def merge_loras(
    inputs: list[tuple[Path, float]], dest: Path, *, rank: int | None = None, layout: str | None = None
) -> MergeResult:
    """Merge the weighted LoRAs into ``dest``; exact without ``rank``, SVD-truncated to ``rank`` with it."""
    if len(inputs) < 2:
        raise LoraFileError(
            "merge needs at least two LoRA files", "e.g. lorad lora merge A.safetensors:0.7 B.safetensors:0.3 -o OUT"
        )
    loras = read_same_family(inputs, "merge")
    first = loras[0][0]
    names = sorted({name for lora, _ in loras for name in lora.modules})
    merged: dict[str, LoraModule] = {}
    kept: list[float] = []
    for name in names:
        parts = [(lora.modules[name], weight) for lora, weight in loras if name in lora.modules]
        shapes = {tuple(m.down.shape[1:]) for m, _ in parts} | set()
        outs = {m.up.shape[0] for m, _ in parts}
        if len(shapes) > 1 or len(outs) > 1:
            raise LoraFileError(
                f"module `{name}` has different layer shapes in the inputs", "Merge LoRAs of the same model."
            )
        ups = [m.factors()[0] * (weight * m.scale) for m, weight in parts]
        downs = [m.factors()[1] for m, _ in parts]
        up, down = torch.cat(ups, dim=1), torch.cat(downs, dim=0)
        template = parts[0][0]
        if rank is not None:
            factors = svd_of_product(up.double(), down.double())
            k = choose_rank(factors.s, rank=rank)
            up, down = (t.float() for t in split_factors(factors, k))
            kept.append(energy_kept(factors.s, k))
        else:
            kept.append(1.0)
        k = down.shape[0]
        dtype = template.down.dtype
        merged[name] = LoraModule(
            down=down.reshape(k, *template.down.shape[1:]).to(dtype).contiguous(),
            up=up.reshape(template.up.shape[0], k, *template.up.shape[2:]).to(dtype).contiguous(),
            alpha=torch.tensor(float(k), dtype=template.alpha.dtype if template.alpha is not None else dtype),
        )
    ranks = sorted({m.rank for m in merged.values()})
    sources = [{"file": lora.path.name, "weight": weight} for lora, weight in loras]
    metadata = {
        k: v
        for k, v in first.metadata.items()
        if k in ("ss_base_model_version", "ss_network_module", "modelspec.architecture")
    }
    metadata |= {
        "ss_network_dim": str(ranks[0]) if len(ranks) == 1 else "Dynamic",
        "ss_network_alpha": str(ranks[0]) if len(ranks) == 1 else "Dynamic",
        "ss_training_comment": "merged by lorad from " + ", ".join(f"{s['file']} ({s['weight']:g})" for s in sources),
        "lorad_merge": json.dumps({"sources": sources, "rank": rank}),
    }
    out = LoraFile(
        path=Path(dest),
        layout=first.layout,
        family=first.family,
        modules=merged,
        metadata=metadata,
        naming=first.naming,
    )
    written = write_lora(out, Path(dest), layout or first.layout)
    return MergeResult(str(written), len(merged), ranks, sum(kept) / len(kept) if kept else 1.0)
