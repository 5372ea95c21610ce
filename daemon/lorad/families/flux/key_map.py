"""Where each FLUX.1 transformer weight lives in BFL's layout and in diffusers' layout.

BFL (Black Forest Labs' reference code; the single ``flux1-dev.safetensors`` that ComfyUI, Forge
and kohya load) fuses projections that diffusers keeps apart:

- a double block's ``img_attn.qkv`` is diffusers' ``attn.to_q``/``to_k``/``to_v`` stacked by rows,
  and ``txt_attn.qkv`` is ``attn.add_q_proj``/``add_k_proj``/``add_v_proj``;
- a single block's ``linear1`` is ``attn.to_q``/``to_k``/``to_v`` and ``proj_mlp`` stacked;
- the final ``adaLN_modulation.1`` holds (shift, scale) where diffusers' ``norm_out.linear`` holds
  (scale, shift).

One table (:func:`linear_modules`) says this once; the weight converters (writing a BFL file,
reading one whose width diffusers' converter does not handle) and the LoRA converters
(``lora_unet_double_blocks_0_img_attn_qkv`` from a diffusers-module LoRA) are all built on it,
and a test checks the table against diffusers' own BFL converter on the real FLUX.1 shapes.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch

# ComfyUI's full-checkpoint prefix (``model.diffusion_model.double_blocks.0...``).
COMFY_CHECKPOINT_PREFIX = "model.diffusion_model."


@dataclass(frozen=True)
class LinearModule:
    """One BFL linear layer and the diffusers linear layers its rows are made of, in row order.

    ``swap_halves`` marks the final modulation, whose two output halves are in the opposite order.
    """

    bfl: str
    parts: tuple[str, ...]
    swap_halves: bool = False

    @property
    def fused(self) -> bool:
        return len(self.parts) > 1


@dataclass(frozen=True)
class FluxShape:
    """What the key map needs to know about a transformer: depth, width and the guidance embedder."""

    num_layers: int  # double ("MMDiT") blocks
    num_single_layers: int
    inner_dim: int  # heads x head size (3072 in FLUX.1)
    guidance_embeds: bool  # dev has it, schnell does not
    mlp_ratio: float = 4.0

    @property
    def mlp_hidden_dim(self) -> int:
        return int(self.inner_dim * self.mlp_ratio)

    @classmethod
    def from_config(cls, config: Mapping[str, object]) -> FluxShape:
        """From a diffusers ``FluxTransformer2DModel`` config (dict or FrozenDict)."""
        heads, head_dim = int(config["num_attention_heads"]), int(config["attention_head_dim"])  # type: ignore[call-overload]
        return cls(
            num_layers=int(config["num_layers"]),  # type: ignore[call-overload]
            num_single_layers=int(config["num_single_layers"]),  # type: ignore[call-overload]
            inner_dim=heads * head_dim,
            guidance_embeds=bool(config.get("guidance_embeds", False)),
        )


def _top_level(guidance: bool) -> list[LinearModule]:
    pairs = [
        ("img_in", "x_embedder"),
        ("txt_in", "context_embedder"),
        ("time_in.in_layer", "time_text_embed.timestep_embedder.linear_1"),
        ("time_in.out_layer", "time_text_embed.timestep_embedder.linear_2"),
        ("vector_in.in_layer", "time_text_embed.text_embedder.linear_1"),
        ("vector_in.out_layer", "time_text_embed.text_embedder.linear_2"),
        ("final_layer.linear", "proj_out"),
    ]
    if guidance:
        pairs += [
            ("guidance_in.in_layer", "time_text_embed.guidance_embedder.linear_1"),
            ("guidance_in.out_layer", "time_text_embed.guidance_embedder.linear_2"),
        ]
    modules = [LinearModule(bfl, (diffusers,)) for bfl, diffusers in pairs]
    modules.append(LinearModule("final_layer.adaLN_modulation.1", ("norm_out.linear",), swap_halves=True))
    return modules


def double_block_modules(index: int) -> list[LinearModule]:
    """The linear layers of double block ``index`` (``double_blocks.i`` / ``transformer_blocks.i``)."""
    b, d = f"double_blocks.{index}.", f"transformer_blocks.{index}."
    return [
        LinearModule(b + "img_mod.lin", (d + "norm1.linear",)),
        LinearModule(b + "txt_mod.lin", (d + "norm1_context.linear",)),
        LinearModule(b + "img_attn.qkv", (d + "attn.to_q", d + "attn.to_k", d + "attn.to_v")),
        LinearModule(b + "txt_attn.qkv", (d + "attn.add_q_proj", d + "attn.add_k_proj", d + "attn.add_v_proj")),
        LinearModule(b + "img_attn.proj", (d + "attn.to_out.0",)),
        LinearModule(b + "txt_attn.proj", (d + "attn.to_add_out",)),
        LinearModule(b + "img_mlp.0", (d + "ff.net.0.proj",)),
        LinearModule(b + "img_mlp.2", (d + "ff.net.2",)),
        LinearModule(b + "txt_mlp.0", (d + "ff_context.net.0.proj",)),
        LinearModule(b + "txt_mlp.2", (d + "ff_context.net.2",)),
    ]


def single_block_modules(index: int) -> list[LinearModule]:
    """The linear layers of single block ``index`` (``single_blocks.i`` / ``single_transformer_blocks.i``)."""
    b, d = f"single_blocks.{index}.", f"single_transformer_blocks.{index}."
    return [
        LinearModule(b + "modulation.lin", (d + "norm.linear",)),
        LinearModule(b + "linear1", (d + "attn.to_q", d + "attn.to_k", d + "attn.to_v", d + "proj_mlp")),
        LinearModule(b + "linear2", (d + "proj_out",)),
    ]


def linear_modules(shape: FluxShape) -> list[LinearModule]:
    """Every linear layer of a FLUX.1 transformer of this shape, BFL name to diffusers parts."""
    modules = _top_level(shape.guidance_embeds)
    for i in range(shape.num_layers):
        modules += double_block_modules(i)
    for i in range(shape.num_single_layers):
        modules += single_block_modules(i)
    return modules


def _norm_params(shape: FluxShape) -> dict[str, str]:
    """RMSNorm scales of the attention q/k: BFL ``...norm.query_norm.scale`` -> diffusers ``...norm_q.weight``."""
    out: dict[str, str] = {}
    for i in range(shape.num_layers):
        b, d = f"double_blocks.{i}.", f"transformer_blocks.{i}.attn."
        out[b + "img_attn.norm.query_norm.scale"] = d + "norm_q.weight"
        out[b + "img_attn.norm.key_norm.scale"] = d + "norm_k.weight"
        out[b + "txt_attn.norm.query_norm.scale"] = d + "norm_added_q.weight"
        out[b + "txt_attn.norm.key_norm.scale"] = d + "norm_added_k.weight"
    for i in range(shape.num_single_layers):
        b, d = f"single_blocks.{i}.", f"single_transformer_blocks.{i}.attn."
        out[b + "norm.query_norm.scale"] = d + "norm_q.weight"
        out[b + "norm.key_norm.scale"] = d + "norm_k.weight"
    return out


def swap_halves(tensor: torch.Tensor) -> torch.Tensor:
    """(a, b) -> (b, a) along dim 0; its own inverse."""
    first, second = tensor.chunk(2, dim=0)
    return torch.cat([second, first], dim=0)


def part_sizes(module: LinearModule, shape: FluxShape) -> list[int]:
    """Output rows of each diffusers part of a fused BFL module, in row order."""
    if not module.fused:
        raise ValueError(f"{module.bfl} is not fused")
    if module.bfl.endswith(".linear1"):
        return [shape.inner_dim] * 3 + [shape.mlp_hidden_dim]
    return [shape.inner_dim] * 3


def diffusers_to_bfl(state: Mapping[str, torch.Tensor], shape: FluxShape) -> dict[str, torch.Tensor]:
    """A diffusers ``FluxTransformer2DModel`` state dict in BFL's layout (keys without any prefix).

    Raises ValueError naming the first diffusers key that the layout has no place for, so a
    transformer with extra modules is never written half.
    """
    out: dict[str, torch.Tensor] = {}
    used: set[str] = set()
    for module in linear_modules(shape):
        for suffix in ("weight", "bias"):
            keys = [f"{part}.{suffix}" for part in module.parts]
            if not all(k in state for k in keys):
                continue
            tensor = torch.cat([state[k] for k in keys], dim=0)
            out[f"{module.bfl}.{suffix}"] = swap_halves(tensor) if module.swap_halves else tensor
            used.update(keys)
    for bfl, diffusers in _norm_params(shape).items():
        out[bfl] = state[diffusers]
        used.add(diffusers)
    extra = sorted(set(state) - used)
    if extra:
        raise ValueError(f"diffusers key {extra[0]!r} has no place in the BFL layout")
    return out


def bfl_to_diffusers(state: Mapping[str, torch.Tensor], shape: FluxShape) -> dict[str, torch.Tensor]:
    """The inverse of :func:`diffusers_to_bfl`; ``state`` has BFL keys without a prefix.

    Raises KeyError naming the first BFL weight the shape expects but ``state`` lacks, and
    ValueError for keys the layout does not know.
    """
    out: dict[str, torch.Tensor] = {}
    used: set[str] = set()
    for module in linear_modules(shape):
        for suffix in ("weight", "bias"):
            key = f"{module.bfl}.{suffix}"
            if key not in state:
                raise KeyError(key)
            used.add(key)
            tensor = swap_halves(state[key]) if module.swap_halves else state[key]
            pieces = torch.split(tensor, part_sizes(module, shape), dim=0) if module.fused else (tensor,)
            for part, piece in zip(module.parts, pieces, strict=True):
                out[f"{part}.{suffix}"] = piece
    for bfl, diffusers in _norm_params(shape).items():
        if bfl not in state:
            raise KeyError(bfl)
        out[diffusers] = state[bfl]
        used.add(bfl)
    extra = sorted(set(state) - used)
    if extra:
        raise ValueError(f"BFL key {extra[0]!r} is not part of a FLUX.1 transformer of this shape")
    return out
