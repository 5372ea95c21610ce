"""FLUX.1 LoRA files in the three layouts other tools load.

lorad trains LoRA on diffusers' ``FluxTransformer2DModel`` (separate ``to_q``/``to_k``/``to_v``),
and writes, as ``output_format`` asks:

- ``kohya`` (sd-scripts ``networks/lora_flux.py``; what ComfyUI, Forge and kohya load): BFL module
  names, ``lora_unet_double_blocks_0_img_attn_qkv.{lora_down.weight, lora_up.weight, alpha}``,
  ``lora_te1_text_model_encoder_layers_0_self_attn_q_proj...`` for CLIP-L;
- ``comfyui``: the same BFL modules under ComfyUI's ``diffusion_model.`` prefix with
  ``lora_A``/``lora_B``/``alpha`` (``text_encoder.text_model...`` for CLIP-L);
- ``diffusers``: ``pytorch_lora_weights.safetensors`` written by diffusers' own Flux serializer
  (``transformer.transformer_blocks.0.attn.to_q.lora_A.weight``), which ``FluxPipeline.load_lora_weights``
  reads.

Where BFL fuses layers that were trained apart (``img_attn.qkv`` = q, k, v; ``linear1`` = q, k, v
and the MLP input), the fused LoRA is exact: ``lora_down`` stacks the parts' downs and ``lora_up``
is block-diagonal, so ``up @ down`` is the parts' deltas stacked by rows. The fused rank is the sum
of the parts' ranks, and alpha is scaled with it so that alpha / rank, the scale every loader
applies, is the parts' scale.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

from lorad.errors import ModelLoadError
from lorad.families.flux.key_map import FluxShape, LinearModule, linear_modules, part_sizes, swap_halves
from lorad.lora.kohya_format import LoadedLora, kohya_module_name, portable_path, save_kohya

FLUX_OUTPUT_FORMATS = ("kohya", "diffusers", "comfyui")
KOHYA_TRANSFORMER_PREFIX = "lora_unet_"  # kohya: LORA_PREFIX_FLUX = "lora_unet" ("make ComfyUI compatible")
KOHYA_CLIP_PREFIX = "lora_te1_"
COMFY_LORA_PREFIX = "diffusion_model."
COMFY_CLIP_PREFIX = "text_encoder."
# sai_model_spec / flux_utils names in kohya's sd-scripts.
MODELSPEC_ARCHITECTURE = {"dev": "flux-1-dev", "schnell": "flux-1-schnell"}


@dataclass(frozen=True)
class ModuleLora:
    """One module's LoRA: delta W = (alpha / rank) · up @ down, rank = down.shape[0]."""

    down: torch.Tensor  # (rank, in_features)
    up: torch.Tensor  # (out_features, rank)
    alpha: float

    @property
    def rank(self) -> int:
        return int(self.down.shape[0])

    def delta(self) -> torch.Tensor:
        """The weight change this LoRA makes, in float32."""
        return (self.alpha / self.rank) * (self.up.float() @ self.down.float())


def _part_lora(state: Mapping[str, torch.Tensor], path: str, alphas: Mapping[str, float], alpha: float) -> ModuleLora:
    return ModuleLora(state[f"{path}.lora_A.weight"], state[f"{path}.lora_B.weight"], alphas.get(path, alpha))


def _fuse(module: LinearModule, loras: dict[str, ModuleLora], shape: FluxShape) -> ModuleLora:
    """One BFL module's LoRA from its trained diffusers parts (untrained parts get zero rows)."""
    trained = [p for p in module.parts if p in loras]
    if not module.fused:
        lora = loras[trained[0]]
        return ModuleLora(lora.down, swap_halves(lora.up), lora.alpha) if module.swap_halves else lora
    first = loras[trained[0]]
    scale = first.alpha / first.rank
    rank = sum(loras[p].rank for p in trained)
    sizes = part_sizes(module, shape)
    up = first.up.new_zeros(sum(sizes), rank)
    row = col = 0
    for part, size in zip(module.parts, sizes, strict=True):
        if part in loras:
            lora = loras[part]
            block = lora.up
            if lora.alpha / lora.rank != scale:  # parts with other scales keep their delta exactly
                block = block * ((lora.alpha / lora.rank) / scale)
            up[row : row + size, col : col + lora.rank] = block
            col += lora.rank
        row += size
    down = torch.cat([loras[p].down for p in trained], dim=0)
    return ModuleLora(down, up, scale * rank)


def bfl_loras(
    transformer_lora: Mapping[str, torch.Tensor],
    shape: FluxShape,
    alpha: float,
    alphas: Mapping[str, float] | None = None,
) -> dict[str, ModuleLora]:
    """BFL module name -> its LoRA, from a peft state dict of the diffusers transformer.

    ``transformer_lora`` has keys ``<diffusers module path>.lora_A.weight`` / ``.lora_B.weight``;
    ``alpha`` is the trained lora_alpha, ``alphas`` overrides it per module path. Raises ValueError
    for a LoRA on a module that has no BFL counterpart.
    """
    paths = {key.rpartition(".lora_")[0] for key in transformer_lora}
    loras = {path: _part_lora(transformer_lora, path, alphas or {}, alpha) for path in paths}
    out: dict[str, ModuleLora] = {}
    placed: set[str] = set()
    for module in linear_modules(shape):
        if any(part in loras for part in module.parts):
            out[module.bfl] = _fuse(module, loras, shape)
            placed.update(p for p in module.parts if p in loras)
    unplaced = sorted(paths - placed)
    if unplaced:
        raise ValueError(f"LoRA on {unplaced[0]!r}, which has no place in FLUX.1's BFL layout")
    return out


def kohya_tensors(
    transformer: Mapping[str, ModuleLora], clip_l: Mapping[str, ModuleLora], dtype: torch.dtype
) -> dict[str, torch.Tensor]:
    """kohya/sd-scripts keys: ``lora_unet_<bfl module>`` and ``lora_te1_<CLIP module>``."""
    out: dict[str, torch.Tensor] = {}
    named = [(kohya_module_name(KOHYA_TRANSFORMER_PREFIX, bfl), lora) for bfl, lora in transformer.items()]
    named += [
        (kohya_module_name(KOHYA_CLIP_PREFIX, portable_path("text_encoder", p)), lora) for p, lora in clip_l.items()
    ]
    for name, lora in named:
        out[f"{name}.lora_down.weight"] = lora.down.detach().to("cpu", dtype).contiguous()
        out[f"{name}.lora_up.weight"] = lora.up.detach().to("cpu", dtype).contiguous()
        out[f"{name}.alpha"] = torch.tensor(float(lora.alpha), dtype=dtype)
    return out


def comfyui_tensors(
    transformer: Mapping[str, ModuleLora], clip_l: Mapping[str, ModuleLora], dtype: torch.dtype
) -> dict[str, torch.Tensor]:
    """ComfyUI's layout: ``diffusion_model.<bfl module>.lora_A/lora_B.weight`` plus ``.alpha``."""
    out: dict[str, torch.Tensor] = {}
    named = [(COMFY_LORA_PREFIX + bfl, lora) for bfl, lora in transformer.items()]
    named += [(COMFY_CLIP_PREFIX + portable_path("text_encoder", p), lora) for p, lora in clip_l.items()]
    for name, lora in named:
        out[f"{name}.lora_A.weight"] = lora.down.detach().to("cpu", dtype).contiguous()
        out[f"{name}.lora_B.weight"] = lora.up.detach().to("cpu", dtype).contiguous()
        out[f"{name}.alpha"] = torch.tensor(float(lora.alpha), dtype=dtype)
    return out


def clip_loras(clip_lora: Mapping[str, torch.Tensor], alpha: float) -> dict[str, ModuleLora]:
    """CLIP-L module path -> its LoRA, from a peft state dict of the text encoder."""
    paths = {key.rpartition(".lora_")[0] for key in clip_lora}
    return {path: _part_lora(clip_lora, path, {}, alpha) for path in sorted(paths)}


def flux_metadata(variant: str, *, rank: int, alpha: float, extra: Mapping[str, object] = ()) -> dict[str, str]:
    """kohya's ``ss_*`` and SAI ``modelspec.*`` keys naming FLUX.1 as the base (``ss_base_model_version: flux1``)."""
    meta: dict[str, object] = {
        "ss_base_model_version": "flux1",
        "ss_network_module": "networks.lora_flux",
        "ss_network_dim": rank,
        "ss_network_alpha": alpha,
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.architecture": f"{MODELSPEC_ARCHITECTURE.get(variant, 'flux-1')}/lora",
        "modelspec.implementation": "https://github.com/black-forest-labs/flux",
        **dict(extra),
    }
    return {k: v if isinstance(v, str) else json.dumps(v) for k, v in meta.items()}


def save_flux_kohya(path: Path, tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str]) -> Path:
    """Write a kohya- or ComfyUI-layout file atomically; returns ``path``."""
    save_kohya(path, tensors, metadata)
    return path


def _split_fused(
    module: LinearModule,
    lora: ModuleLora,
    shape: FluxShape,
    trained: Sequence[str],
    rank: int,
) -> dict[str, ModuleLora]:
    """The parts' LoRAs of a fused BFL module's LoRA, exactly (the inverse of :func:`_fuse`).

    A block-diagonal up (lorad's files: one ``rank``-wide column block per part in ``trained``)
    splits into each part's own down and up; a LoRA trained on the fused layer itself (kohya's,
    rank ``rank``) gives every part the shared down and its rows of up.
    """
    sizes = part_sizes(module, shape)
    rows = dict(zip(module.parts, torch.split(lora.up, sizes, dim=0), strict=True))
    scale = lora.alpha / lora.rank
    if lora.rank == rank:
        return {part: ModuleLora(lora.down, rows[part], scale * rank) for part in module.parts}
    if lora.rank == rank * len(module.parts):
        trained = module.parts  # every part was trained (whatever this run targets)
    if lora.rank == rank * len(trained):
        out = {}
        for j, part in enumerate(trained):
            columns = slice(j * rank, (j + 1) * rank)
            others = [p for p in module.parts if p != part]
            if any(torch.count_nonzero(rows[p][:, columns]) for p in others):
                break  # not block-diagonal: not a file this conversion can split
            out[part] = ModuleLora(lora.down[columns], rows[part][:, columns], scale * rank)
        else:
            return out
    raise ValueError(
        f"{module.bfl} has rank {lora.rank}, neither lora_rank {rank} nor {len(trained)} x {rank} block-diagonal"
    )


def read_flux_lora(
    path: Path,
    shape: FluxShape,
    *,
    rank: int,
    transformer_targets: Sequence[str],
    clip_paths: Sequence[str],
) -> LoadedLora:
    """A FLUX.1 LoRA file (lorad's or kohya's BFL keys, ComfyUI's, or diffusers') as per-module LoRAs
    of the diffusers transformer and of CLIP-L, ready to load into an adapter of rank ``rank``.

    ``transformer_targets`` are the run's targeted transformer modules (which parts of a fused
    module a block-diagonal file holds); ``clip_paths`` CLIP-L's module paths. Raises
    ModelLoadError naming ``init_lora`` for an unreadable file or keys this model does not have.
    """
    where = f"`init_lora` {str(path)!r}"
    try:
        with safe_open(str(path), framework="pt") as handle:
            tensors = {k: handle.get_tensor(k).float() for k in handle.keys()}  # noqa: SIM118
            # diffusers keeps lora_alpha in the metadata, not in tensors.
            adapter_meta = json.loads((handle.metadata() or {}).get("lora_adapter_metadata") or "{}")
    except Exception as err:
        raise ModelLoadError(
            f"{where} is not a readable .safetensors LoRA ({err})", "Point it at a LoRA file."
        ) from None
    modules = {m.bfl: m for m in linear_modules(shape)}
    names: dict[str, tuple[str, str]] = {}  # file module name -> (part, module)
    for bfl in modules:
        names[kohya_module_name(KOHYA_TRANSFORMER_PREFIX, bfl)] = ("bfl", bfl)
        names[COMFY_LORA_PREFIX + bfl] = ("bfl", bfl)
    for clip_path in clip_paths:
        for name in {clip_path, portable_path("text_encoder", clip_path)}:
            names[kohya_module_name(KOHYA_CLIP_PREFIX, name)] = ("text_encoder", clip_path)
            names[COMFY_CLIP_PREFIX + name] = ("text_encoder", clip_path)
    roles = {"lora_down.weight": "down", "lora_A.weight": "down", "lora_up.weight": "up", "lora_B.weight": "up"}
    found: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
    diffusers: dict[str, dict[str, torch.Tensor]] = {"transformer": {}, "text_encoder": {}}
    unknown: list[str] = []
    for key, tensor in tensors.items():
        head, _, role = key.partition(".lora_")
        if head.startswith("transformer.") and role:  # diffusers: transformer.<path>.lora_A.weight
            diffusers["transformer"][f"{head.removeprefix('transformer.')}.lora_{role}"] = tensor
            continue
        name, _, role = key.rpartition(".") if key.endswith(".alpha") else (head, "", "lora_" + role)
        target = names.get(name)
        if target is None or (role not in roles and role != "alpha"):
            unknown.append(key)
            continue
        found.setdefault(target, {})["alpha" if role == "alpha" else roles[role]] = tensor
    parts: dict[str, dict[str, torch.Tensor]] = {"transformer": {}, "text_encoder": {}}
    alphas: dict[str, float] = {}
    targeted = set(transformer_targets)

    def put(part: str, module_path: str, lora: ModuleLora) -> None:
        parts[part][f"{module_path}.lora_A.weight"] = lora.down
        parts[part][f"{module_path}.lora_B.weight"] = lora.up
        alphas[f"{part}:{module_path}"] = lora.alpha

    try:
        for (kind, name), pieces in found.items():
            lora = ModuleLora(pieces["down"], pieces["up"], float(pieces.get("alpha", torch.tensor(0.0))) or 0.0)
            lora = ModuleLora(lora.down, lora.up, lora.alpha or float(lora.rank))
            if kind == "text_encoder":
                put("text_encoder", name, lora)
                continue
            module = modules[name]
            if not module.fused:
                put("transformer", module.parts[0], _fuse(module, {module.parts[0]: lora}, shape))  # swap back
                continue
            trained = [p for p in module.parts if p in targeted] or list(module.parts)
            for part, piece in _split_fused(module, lora, shape, trained, rank).items():
                put("transformer", part, piece)
    except (KeyError, ValueError) as err:
        raise ModelLoadError(
            f"{where} cannot be read as a FLUX.1 LoRA ({err})", "Use a LoRA trained on FLUX.1."
        ) from err
    for part, state in diffusers.items():
        parts[part].update(state)
        for key in state:
            if key.endswith(".lora_A.weight") and f"{part}.lora_alpha" in adapter_meta:
                alphas[f"{part}:{key.removesuffix('.lora_A.weight')}"] = float(adapter_meta[f"{part}.lora_alpha"])
    if unknown:
        raise ModelLoadError(
            f"{where} has weights for layers FLUX.1 does not have: {', '.join(unknown[:3])}",
            "Use a LoRA trained on FLUX.1.",
        )
    ranks = {t.shape[0] for p in parts.values() for k, t in p.items() if k.endswith(".lora_A.weight")}
    return LoadedLora(parts={p: s for p, s in parts.items() if s}, alphas=alphas, rank=max(ranks) if ranks else 0)
