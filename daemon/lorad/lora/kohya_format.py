"""The kohya LoRA format that AUTOMATIC1111, Forge and ComfyUI load.

Keys are ``lora_unet_<module path, '.' → '_'>.{lora_down.weight, lora_up.weight, alpha}`` and
``lora_te_…`` for the text encoder, where the module path is the diffusers / transformers one.
``alpha`` holds the *trained* lora_alpha: loaders scale the update by alpha / rank.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from lorad.atomic import write_with_atomic
from lorad.errors import ModelLoadError

PREFIXES = {"unet": "lora_unet_", "text_encoder": "lora_te_"}


def portable_path(part: str, module_path: str) -> str:
    """The module path other tools expect. transformers >= 5.6 flattened CLIPTextModel
    (``encoder.layers.0…`` instead of ``text_model.encoder.layers.0…``); A1111, ComfyUI, kohya and
    older diffusers all look for the classic ``text_model.`` names, so files always use those."""
    if part == "text_encoder" and not module_path.startswith("text_model."):
        return "text_model." + module_path
    return module_path


def kohya_module_name(prefix: str, module_path: str) -> str:
    """``lora_unet_`` + ``down_blocks.0.attentions.0.proj_in`` → ``lora_unet_down_blocks_0_…``."""
    return prefix + module_path.replace(".", "_")


def sd_kohya_name(part: str, module_path: str) -> str:
    """The kohya module name of an SD 1.x/2.x module: diffusers/transformers path, prefixed per part."""
    return kohya_module_name(PREFIXES[part], portable_path(part, module_path))


def to_kohya(
    parts: Mapping[str, Mapping[str, torch.Tensor]],
    alpha: float,
    dtype: torch.dtype,
    name_for: Callable[[str, str], str] = sd_kohya_name,
) -> dict[str, torch.Tensor]:
    """Convert peft state dicts ({"unet": {...}, "text_encoder": {...}}) to kohya tensors.

    ``name_for(part, module_path)`` gives each module's kohya name (SD 1.x/2.x by default; SDXL
    names its UNet modules in the SGM layout).
    """
    out: dict[str, torch.Tensor] = {}
    for part, state in parts.items():
        for key, tensor in state.items():
            module_path, _, rest = key.partition(".lora_")
            name = name_for(part, module_path)
            role = {"A.weight": "lora_down.weight", "B.weight": "lora_up.weight"}[rest]
            out[f"{name}.{role}"] = tensor.detach().to("cpu", dtype).contiguous()
            out[f"{name}.alpha"] = torch.tensor(float(alpha), dtype=dtype)
    return out


def save_kohya(path: Path, tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, object]) -> None:
    """Write a kohya .safetensors atomically; metadata values become strings (safetensors needs that)."""
    meta = {k: v if isinstance(v, str) else json.dumps(v) for k, v in metadata.items()}
    write_with_atomic(path, lambda tmp: save_file(dict(tensors), str(tmp), metadata=meta), user_file=True)


@dataclass(frozen=True)
class LoadedLora:
    """A LoRA file read back into peft-style state dicts per part, with its per-module alpha."""

    parts: dict[str, dict[str, torch.Tensor]]  # part → {"<path>.lora_A.weight": tensor, ...}
    alphas: dict[str, float]  # "<part>:<module path>" → alpha
    rank: int


def read_lora_file(
    path: Path, module_paths: Mapping[str, list[str]], name_for: Callable[[str, str], str] | None = None
) -> LoadedLora:
    """Read a kohya-format (or diffusers/peft-format) LoRA file for the given model parts.

    ``module_paths`` maps a part ("unet", "text_encoder", ...) to the module paths of that model;
    kohya names are matched against them (underscores make the names ambiguous to split back),
    named by ``name_for(part, path)`` (default: SD 1.x/2.x's names, with or without ``text_model.``).
    Raises ModelLoadError (naming `init_lora`) for unreadable files or keys matching no module.
    """
    try:
        with safe_open(str(path), framework="pt") as fh:
            tensors = {k: fh.get_tensor(k).float() for k in fh.keys()}  # noqa: SIM118
    except Exception as err:
        raise ModelLoadError(
            f"`init_lora`: {path} is not a readable .safetensors LoRA ({err})",
            "point init_lora at a LoRA .safetensors file",
        ) from None
    lookup: dict[str, tuple[str, str]] = {}  # kohya module name -> (part, module path)
    for part, paths in module_paths.items():
        for p in paths:
            if name_for is not None:
                lookup[name_for(part, p)] = (part, p)
            else:
                lookup.update(
                    {kohya_module_name(PREFIXES[part], name): (part, p) for name in {p, portable_path(part, p)}}
                )
    parts: dict[str, dict[str, torch.Tensor]] = {part: {} for part in module_paths}
    alphas: dict[str, float] = {}
    unknown: list[str] = []
    ranks: set[int] = set()
    for key, tensor in tensors.items():
        name, _, role = key.partition(".")
        if name in module_paths:  # diffusers layout: <part>.<path>.lora_A.weight
            part, _, rest = key.partition(".")
            module_path, _, role = rest.partition(".lora_")
            if part == "text_encoder" and module_path not in module_paths.get(part, ()):
                module_path = module_path.removeprefix("text_model.")
            if part not in parts or module_path not in module_paths[part]:
                unknown.append(key)
                continue
            parts[part][f"{module_path}.lora_{role}"] = tensor
            if role == "A.weight":
                ranks.add(tensor.shape[0])
            continue
        if name not in lookup:
            unknown.append(key)
            continue
        part, module_path = lookup[name]
        if role == "alpha":
            alphas[f"{part}:{module_path}"] = float(tensor.item())
        elif role == "lora_down.weight":
            parts[part][f"{module_path}.lora_A.weight"] = tensor
            ranks.add(tensor.shape[0])
        elif role == "lora_up.weight":
            parts[part][f"{module_path}.lora_B.weight"] = tensor
        else:
            unknown.append(key)
    if unknown:
        shown = ", ".join(unknown[:5]) + (f" and {len(unknown) - 5} more" if len(unknown) > 5 else "")
        raise ModelLoadError(
            f"`init_lora`: {path} has weights for layers this model does not have: {shown}",
            "use a LoRA trained for the same base model architecture",
        )
    if len(ranks) > 1:
        raise ModelLoadError(
            f"`init_lora`: {path} mixes ranks {sorted(ranks)}", "lorad continues LoRAs of a single rank"
        )
    return LoadedLora(parts={p: s for p, s in parts.items() if s}, alphas=alphas, rank=ranks.pop() if ranks else 0)
