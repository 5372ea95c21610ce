"""Key mapping from diffusers' layout to the original LDM / SGM / AUTOMATIC1111 single-file layout.

This is the inverse of what ``diffusers`` does when it reads a single-file checkpoint: the UNet
(``model.diffusion_model.*``, SD 1.x/2.x and SDXL, whose added-conditioning MLP is ``label_emb``),
the VAE (``first_stage_model.*``) and the text encoders (CLIP-L as ``….transformer.text_model.*``,
OpenCLIP as ``….model.*``, under SD 1.x/2.x's ``cond_stage_model.`` or SDXL's
``conditioner.embedders.N.``). lorad uses it to write tiny test checkpoints, and the UNet module
names double as the SGM names of kohya's SDXL LoRA keys. Every tensor is carried over unchanged
except where the layouts differ in shape (VAE attention 1x1 convs, OpenCLIP's fused qkv and
transposed text projection), and those changes are exactly undone by the reader, so a round trip
is bit-identical.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import torch

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
CLIP_PREFIX = "cond_stage_model.transformer.text_model."
OPEN_CLIP_PREFIX = "cond_stage_model.model."
# SDXL's two text encoders: CLIP-L (HF layout inside) and OpenCLIP bigG.
SDXL_CLIP_PREFIX = "conditioner.embedders.0.transformer.text_model."
SDXL_OPEN_CLIP_PREFIX = "conditioner.embedders.1.model."

# diffusers ResnetBlock2D submodule -> LDM ResBlock submodule (UNet).
_UNET_RESNET = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "time_emb_proj": "emb_layers.1",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "conv_shortcut": "skip_connection",
}
_UNET_TOP = {
    "time_embedding.linear_1": "time_embed.0",
    "time_embedding.linear_2": "time_embed.2",
    "conv_in": "input_blocks.0.0",
    "conv_norm_out": "out.0",
    "conv_out": "out.2",
    # SDXL's MLP over (pooled text, size/crop time ids).
    "add_embedding.linear_1": "label_emb.0.0",
    "add_embedding.linear_2": "label_emb.0.2",
}
# The VAE's resnets keep their names except the shortcut.
_VAE_RESNET = {
    "norm1": "norm1",
    "conv1": "conv1",
    "norm2": "norm2",
    "conv2": "conv2",
    "conv_shortcut": "nin_shortcut",
}
_VAE_ATTENTION = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


def unet_to_ldm(state_dict: Mapping[str, torch.Tensor], config: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """Map a diffusers ``UNet2DConditionModel`` state dict to ``model.diffusion_model.*`` keys.

    ``config`` is the UNet's config. Raises ValueError on a key outside the SD 1.x/2.x/SDXL layout
    (see :func:`ldm_unet_path`).
    """
    return {UNET_PREFIX + ldm_unet_path(key, config): tensor for key, tensor in state_dict.items()}


def ldm_unet_path(path: str, config: Mapping[str, Any]) -> str:
    """The LDM/SGM name of a diffusers UNet module or parameter path (``down_blocks.1.attentions.0.proj_in``
    -> ``input_blocks.4.1.proj_in`` for SDXL), without the ``model.diffusion_model.`` prefix.

    ``config`` is the UNet's config; ``layers_per_block`` must be an int, as in every SD 1.x/2.x and
    SDXL model. Paths inside a transformer block are named alike in both layouts and pass through.
    Raises ValueError on a path with no LDM equivalent (class embeddings, a block part LDM lacks).
    """
    layers = config["layers_per_block"]
    if not isinstance(layers, int):
        raise ValueError(f"per-block layers_per_block {layers!r} is not an SD 1.x/2.x/SDXL layout")
    # LDM numbers a level's layers consecutively; the downsampler (input side) or upsampler (output
    # side) shares the last index of its level.
    stride = layers + 1
    up_has_attention = ["CrossAttn" in str(kind) for kind in config["up_block_types"]]

    def resnet(prefix: str, module: str, rest: str) -> str:
        if module not in _UNET_RESNET:
            raise ValueError(f"unexpected resnet submodule {module!r} in {path!r}")
        return f"{prefix}.{_UNET_RESNET[module]}{rest}"

    for top, ldm in _UNET_TOP.items():
        if path == top or path.startswith(top + "."):
            return ldm + path[len(top) :]
    # Each pattern ends in "(…)" capturing the rest of the path with its leading dot (or nothing),
    # so module paths and parameter keys convert alike.
    if m := re.fullmatch(r"down_blocks\.(\d+)\.resnets\.(\d+)\.(\w+)((?:\..+)?)", path):
        block, layer = int(m[1]), int(m[2])
        return resnet(f"input_blocks.{1 + block * stride + layer}.0", m[3], m[4])
    if m := re.fullmatch(r"down_blocks\.(\d+)\.attentions\.(\d+)((?:\..+)?)", path):
        block, layer = int(m[1]), int(m[2])
        return f"input_blocks.{1 + block * stride + layer}.1{m[3]}"
    if m := re.fullmatch(r"down_blocks\.(\d+)\.downsamplers\.0\.conv((?:\..+)?)", path):
        return f"input_blocks.{1 + int(m[1]) * stride + layers}.0.op{m[2]}"
    if m := re.fullmatch(r"mid_block\.resnets\.(\d+)\.(\w+)((?:\..+)?)", path):
        return resnet(f"middle_block.{2 * int(m[1])}", m[2], m[3])
    if m := re.fullmatch(r"mid_block\.attentions\.0((?:\..+)?)", path):
        return f"middle_block.1{m[1]}"
    if m := re.fullmatch(r"up_blocks\.(\d+)\.resnets\.(\d+)\.(\w+)((?:\..+)?)", path):
        block, layer = int(m[1]), int(m[2])
        return resnet(f"output_blocks.{block * stride + layer}.0", m[3], m[4])
    if m := re.fullmatch(r"up_blocks\.(\d+)\.attentions\.(\d+)((?:\..+)?)", path):
        block, layer = int(m[1]), int(m[2])
        return f"output_blocks.{block * stride + layer}.1{m[3]}"
    if m := re.fullmatch(r"up_blocks\.(\d+)\.upsamplers\.0\.conv((?:\..+)?)", path):
        block = int(m[1])
        # The upsampler follows the resnet (slot 0) and, when the level has one, the attention (slot 1).
        slot = 2 if up_has_attention[block] else 1
        return f"output_blocks.{block * stride + layers}.{slot}.conv{m[2]}"
    raise ValueError(f"UNet path {path!r} has no LDM equivalent")


def vae_to_ldm(state_dict: Mapping[str, torch.Tensor], config: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """Map a diffusers ``AutoencoderKL`` state dict to ``first_stage_model.*`` keys.

    LDM numbers decoder levels from the lowest resolution up, the reverse of diffusers, and stores
    the mid-block attention projections as 1x1 convolutions.
    """
    levels = len(config["up_block_types"])

    def resnet(prefix: str, module: str, rest: str) -> str:
        if module not in _VAE_RESNET:
            raise ValueError(f"unexpected VAE resnet submodule {module!r}")
        return f"{prefix}.{_VAE_RESNET[module]}.{rest}"

    out: dict[str, torch.Tensor] = {}
    for key, tensor in state_dict.items():
        value = tensor
        if m := re.fullmatch(r"(encoder|decoder)\.conv_norm_out\.(.+)", key):
            new = f"{m[1]}.norm_out.{m[2]}"
        elif re.fullmatch(r"(encoder|decoder)\.conv_(in|out)\..+|(post_)?quant_conv\..+", key):
            new = key
        elif m := re.fullmatch(r"encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\.(\w+)\.(.+)", key):
            new = resnet(f"encoder.down.{m[1]}.block.{m[2]}", m[3], m[4])
        elif m := re.fullmatch(r"encoder\.down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.+)", key):
            new = f"encoder.down.{m[1]}.downsample.conv.{m[2]}"
        elif m := re.fullmatch(r"(encoder|decoder)\.mid_block\.resnets\.(\d+)\.(\w+)\.(.+)", key):
            new = resnet(f"{m[1]}.mid.block_{int(m[2]) + 1}", m[3], m[4])
        elif m := re.fullmatch(
            r"(encoder|decoder)\.mid_block\.attentions\.0\.(group_norm|to_q|to_k|to_v|to_out\.0)\.(.+)", key
        ):
            new = f"{m[1]}.mid.attn_1.{_VAE_ATTENTION[m[2]]}.{m[3]}"
            if m[2] != "group_norm" and tensor.ndim == 2:
                value = tensor[:, :, None, None]
        elif m := re.fullmatch(r"decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.(\w+)\.(.+)", key):
            new = resnet(f"decoder.up.{levels - 1 - int(m[1])}.block.{m[2]}", m[3], m[4])
        elif m := re.fullmatch(r"decoder\.up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.+)", key):
            new = f"decoder.up.{levels - 1 - int(m[1])}.upsample.conv.{m[2]}"
        else:
            raise ValueError(f"VAE key {key!r} has no LDM equivalent")
        out[VAE_PREFIX + new] = value.contiguous()
    return out


def _text_model_keys(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """CLIPTextModel keys without the ``text_model.`` wrapper (transformers >= 5.6 drops it) and buffers."""
    return {
        key.removeprefix("text_model."): tensor
        for key, tensor in state_dict.items()
        if not key.endswith("position_ids")
    }


def clip_to_ldm(state_dict: Mapping[str, torch.Tensor], prefix: str = CLIP_PREFIX) -> dict[str, torch.Tensor]:
    """Map a CLIP-L ``CLIPTextModel`` state dict to ``<prefix>*`` (SD 1.x: ``cond_stage_model.transformer.text_model.``;
    SDXL's first encoder: ``conditioner.embedders.0.transformer.text_model.``)."""
    return {prefix + key: tensor for key, tensor in _text_model_keys(state_dict).items()}


def clip_to_open_clip(
    state_dict: Mapping[str, torch.Tensor], prefix: str = OPEN_CLIP_PREFIX
) -> dict[str, torch.Tensor]:
    """Map a ``CLIPTextModel`` (SD 2.x) or ``CLIPTextModelWithProjection`` (SDXL's second encoder)
    state dict to OpenCLIP's layout under ``prefix`` (``cond_stage_model.model.`` or
    ``conditioner.embedders.1.model.``).

    OpenCLIP fuses q, k and v into one ``in_proj`` (rows in q, k, v order) and stores the text
    projection as a (width, embed) matrix, the transpose of the Linear's weight. SD 2.x's encoder
    has no projection, so none is written for it.
    """
    top = {
        "embeddings.token_embedding.weight": "token_embedding.weight",
        "embeddings.position_embedding.weight": "positional_embedding",
        "final_layer_norm.weight": "ln_final.weight",
        "final_layer_norm.bias": "ln_final.bias",
    }
    layer_parts = {
        "layer_norm1": "ln_1",
        "layer_norm2": "ln_2",
        "self_attn.out_proj": "attn.out_proj",
        "mlp.fc1": "mlp.c_fc",
        "mlp.fc2": "mlp.c_proj",
    }
    source = _text_model_keys(state_dict)
    out: dict[str, torch.Tensor] = {}
    fused: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    for key, tensor in source.items():
        if key in top:
            out[prefix + top[key]] = tensor
            continue
        if key == "text_projection.weight":
            out[prefix + "text_projection"] = tensor.T.contiguous()
            continue
        m = re.fullmatch(r"encoder\.layers\.(\d+)\.(.+)\.(weight|bias)", key)
        if m is None:
            raise ValueError(f"text encoder key {key!r} has no OpenCLIP equivalent")
        layer, module, param = int(m[1]), m[2], m[3]
        block = f"{prefix}transformer.resblocks.{layer}"
        if qkv := re.fullmatch(r"self_attn\.(q|k|v)_proj", module):
            fused.setdefault((layer, param), {})[qkv[1]] = tensor
        elif module in layer_parts:
            out[f"{block}.{layer_parts[module]}.{param}"] = tensor
        else:
            raise ValueError(f"text encoder key {key!r} has no OpenCLIP equivalent")
    for (layer, param), parts in sorted(fused.items()):
        if sorted(parts) != ["k", "q", "v"]:
            raise ValueError(f"text encoder layer {layer} lacks one of q/k/v {param}")
        name = "in_proj_weight" if param == "weight" else "in_proj_bias"
        out[f"{prefix}transformer.resblocks.{layer}.attn.{name}"] = torch.cat(
            [parts["q"], parts["k"], parts["v"]], dim=0
        )
    return out
