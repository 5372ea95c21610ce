"""Where each kohya-named LoRA module lands in a single-file checkpoint (A1111 / ComfyUI layout).

Used by bake (LoRA -> checkpoint) and extract (checkpoint difference -> LoRA). Most names follow from the
checkpoint's own keys "by key", the way A1111 and ComfyUI match them: a weight ``<prefix><path>.weight``
is the module ``<lora prefix><path with '_' for '.'>`` — SDXL's SGM-named U-Net and first text encoder,
Flux's BFL blocks, SD 1.x's CLIP. Two cases need more: OpenCLIP text encoders (SD 2.x, SDXL's second)
fuse q/k/v into one ``in_proj_weight``, so those modules land on row ranges of it; and kohya's SD 1.x/2.x
U-Net names are diffusers paths, mapped to LDM ones by :class:`lorad.lora_tools.sd_key_map.SdKeyMap`
built for the checkpoint's own architecture.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence

from lorad.errors import LoraFileError
from lorad.lora_tools.sd_key_map import CheckpointTarget, SdKeyMap, layout_from_checkpoint_keys
from lorad.models.ldm_layout import CLIP_PREFIX, OPEN_CLIP_PREFIX

# (checkpoint key prefix, kohya prefix): module names by key.
BY_KEY = {
    # SD 1.x/2.x kohya files name U-Net modules by diffusers path (the key map below); A1111 also accepts
    # LDM ("compvis") names, which these rules cover.
    "sd1": (("model.diffusion_model.", "lora_unet_"), ("cond_stage_model.transformer.", "lora_te_")),
    "sd2": (("model.diffusion_model.", "lora_unet_"),),
    "sdxl": (("model.diffusion_model.", "lora_unet_"), ("conditioner.embedders.0.transformer.", "lora_te1_")),
    "flux": (("model.diffusion_model.", "lora_unet_"), ("", "lora_unet_")),
}
OPEN_CLIP = {"sd2": (OPEN_CLIP_PREFIX, "lora_te_"), "sdxl": ("conditioner.embedders.1.model.", "lora_te2_")}
_OPEN_CLIP_PARTS = {
    "attn.out_proj.weight": "self_attn_out_proj",
    "mlp.c_fc.weight": "mlp_fc1",
    "mlp.c_proj.weight": "mlp_fc2",
}


def checkpoint_family(keys: Sequence[str], where: str) -> str:
    """sd1, sd2, sdxl or flux from a single-file checkpoint's key names; LoraFileError otherwise."""
    if any(k.startswith("conditioner.embedders.") for k in keys):
        return "sdxl"
    if any(re.match(r"(model\.diffusion_model\.)?double_blocks\.\d+\.", k) for k in keys):
        return "flux"
    if any(k.startswith(CLIP_PREFIX) or k.startswith("cond_stage_model.transformer.") for k in keys):
        return "sd1"
    if any(k.startswith(OPEN_CLIP_PREFIX) for k in keys):
        return "sd2"
    raise LoraFileError(
        f"{where} is not a single-file SD 1.x/2.x, SDXL or Flux checkpoint (first keys: {', '.join(sorted(keys)[:3])})",
        "Point at an AUTOMATIC1111/ComfyUI-style .safetensors checkpoint.",
    )


def checkpoint_targets(shapes: Mapping[str, Sequence[int]], family: str) -> dict[str, CheckpointTarget]:
    """kohya module name -> where its update goes, for every weight of the checkpoint."""
    targets: dict[str, CheckpointTarget] = {}
    for key in shapes:
        if not key.endswith(".weight") and not key.endswith("in_proj_weight"):
            continue
        for prefix, lora_prefix in BY_KEY.get(family, ()):
            if key.startswith(prefix) and key.endswith(".weight"):
                name = lora_prefix + key[len(prefix) : -len(".weight")].replace(".", "_")
                targets.setdefault(name, CheckpointTarget(key))
        if family in OPEN_CLIP:
            prefix, lora_prefix = OPEN_CLIP[family]
            m = re.fullmatch(re.escape(prefix) + r"transformer\.resblocks\.(\d+)\.(.+)", key)
            if m is None:
                continue
            layer = f"{lora_prefix}text_model_encoder_layers_{m[1]}_"
            if m[2] == "attn.in_proj_weight":
                width = shapes[key][0] // 3
                for i, name in enumerate(("q", "k", "v")):
                    targets[f"{layer}self_attn_{name}_proj"] = CheckpointTarget(key, (i * width, (i + 1) * width))
            elif m[2] in _OPEN_CLIP_PARTS:
                targets[layer + _OPEN_CLIP_PARTS[m[2]]] = CheckpointTarget(key)
    if family in ("sd1", "sd2"):
        arch = layout_from_checkpoint_keys(list(shapes))
        if arch is not None:
            key_map = SdKeyMap(family, arch)
            text_width = next((s[1] for k, s in shapes.items() if k.endswith("token_embedding.weight")), 0)
            for name in key_map.names():
                target = key_map.checkpoint_target(name, int(text_width))
                if target is not None and target.key in shapes:
                    targets[name] = target
    return targets


def is_transformer_module(name: str) -> bool:
    """Modules kohya's LoRA adapts by default: attention blocks of the U-Net/transformer and the text encoders."""
    if name.startswith("lora_te"):
        return True
    return bool(
        re.search(r"_attentions_\d+_|transformer_blocks_|_proj_in$|_proj_out$|double_blocks_|single_blocks_", name)
    )


def is_conv_block_module(name: str) -> bool:
    """Modules kohya adds with ``conv_dim``: resnets, down- and upsamplers (not the U-Net's first/last conv)."""
    if name.startswith("lora_te") or is_transformer_module(name):
        return False
    return bool(
        re.search(r"_resnets_\d+_|_downsamplers_|_upsamplers_", name)
        or (
            re.search(r"lora_unet_(input_blocks|middle_block|output_blocks)_\d+_", name)
            and not re.match(r"lora_unet_input_blocks_0_0_", name)
        )
    )
