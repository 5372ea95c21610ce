"""``lorad lora bake``: LoRAs merged into a single-file checkpoint that A1111/ComfyUI load as a model.

The checkpoint streams through one tensor at a time (:mod:`lorad.lora_tools.tensor_files`): each weight
is read, gets ``sum(weight * alpha/rank * up @ down)`` of the modules that land on it (added in fp32, then
cast back to the weight's dtype), and is written in place, so memory stays about one tensor (plus the
LoRAs) whatever the checkpoint's size. Every module is matched to a weight, and shapes checked, before
anything is written; the result is renamed into place only when complete.
"""

from __future__ import annotations

import json
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import torch

from lorad.atomic import atomic_path
from lorad.errors import LoraFileError
from lorad.lora_tools.base_families import FAMILY_TITLES
from lorad.lora_tools.checkpoint_keys import checkpoint_family, checkpoint_targets
from lorad.lora_tools.lora_file import LoraModule
from lorad.lora_tools.merge import read_same_family
from lorad.lora_tools.sd_key_map import CheckpointTarget
from lorad.lora_tools.tensor_files import TensorReader, TensorWriter


@dataclass(frozen=True)
class BakeResult:
    output: str
    modules: int
    weights_changed: int

    def summary(self) -> str:
        return f"wrote {self.output}: {self.modules} LoRA modules baked into {self.weights_changed} weights"


def _fits(delta_shape: torch.Size, target_shape: tuple[int, ...], rows: tuple[int, int] | None) -> bool:
    shape = list(target_shape)
    if rows is not None:
        shape[0] = rows[1] - rows[0]
    return torch.Size(shape).numel() == delta_shape.numel() and shape[0] == delta_shape[0]


def bake_loras(inputs: list[tuple[Path, float]], base: Path, dest: Path) -> BakeResult:
    """Bake the weighted LoRAs into the single-file checkpoint ``base`` and write ``dest``."""
    if not inputs:
        raise LoraFileError(
            "bake needs at least one LoRA file", "e.g. lorad lora bake A.safetensors:0.8 --into BASE -o OUT"
        )
    loras = read_same_family(inputs, "bake")
    for lora, _ in loras:
        if lora.naming != "kohya":
            raise LoraFileError(
                f"{lora.path}: a {lora.family.title} LoRA in the {lora.layout} layout cannot be baked yet",
                "Bake the kohya-layout file of it.",
            )
    family = loras[0][0].family.name
    reader = TensorReader(Path(base))
    try:
        shapes = {k: reader.shape(k) for k in reader.names()}
        base_family = checkpoint_family(list(shapes), str(base))
        if base_family != family:
            raise LoraFileError(
                f"{loras[0][0].path.name} is a {loras[0][0].family.title} LoRA but {Path(base).name} is a "
                f"{FAMILY_TITLES[base_family]} checkpoint",
                "Bake into a checkpoint of the base model the LoRA was trained for.",
            )
        targets = checkpoint_targets(shapes, base_family)
        updates: dict[str, list[tuple[LoraModule, float, CheckpointTarget]]] = defaultdict(list)
        unmapped: list[str] = []
        for lora, weight in loras:
            for name, module in lora.modules.items():
                target = targets.get(name)
                if target is None:
                    unmapped.append(f"{lora.path.name}: {name}")
                    continue
                delta_shape = torch.Size([module.up.shape[0], *module.down.shape[1:]])
                if not _fits(delta_shape, shapes[target.key], target.rows):
                    raise LoraFileError(
                        f"{lora.path.name}: module `{name}` makes a {tuple(delta_shape)} update but `{target.key}` is "
                        f"{shapes[target.key]}",
                        "The LoRA was trained for a model of another size; bake it into its own base model.",
                    )
                updates[target.key].append((module, weight, target))
        if unmapped:
            shown = ", ".join(unmapped[:5]) + (f" and {len(unmapped) - 5} more" if len(unmapped) > 5 else "")
            raise LoraFileError(
                f"{len(unmapped)} LoRA modules match no weight of {Path(base).name}: {shown}",
                "Bake into the base model the LoRA was trained for (`lorad lora inspect` shows which).",
            )
        metadata = dict(reader.metadata)
        metadata["lorad_baked"] = json.dumps([{"file": lora.path.name, "weight": w} for lora, w in loras])
        layout = [(k, _dtype(reader, k), shapes[k]) for k in reader.names()]
        with atomic_path(dest) as tmp:
            writer = TensorWriter(tmp, layout, metadata)
            try:
                for key in reader.names():
                    tensor = reader.read(key)
                    if key in updates:
                        tensor = _apply(tensor, updates[key])
                    writer.write(key, tensor)
                    del tensor
            finally:
                writer.close()
    finally:
        reader.close()
    return BakeResult(str(dest), sum(len(v) for v in updates.values()), len(updates))


def _dtype(reader: TensorReader, key: str) -> torch.dtype:
    from lorad.lora_tools.tensor_files import DTYPES

    return DTYPES[reader.entries[key].dtype]


def _apply(tensor: torch.Tensor, updates: list[tuple[LoraModule, float, CheckpointTarget]]) -> torch.Tensor:
    merged = tensor.float()
    for module, weight, target in updates:
        view = merged[target.rows[0] : target.rows[1]] if target.rows else merged
        view += (module.delta() * weight).reshape(view.shape)
    return merged.to(tensor.dtype)
