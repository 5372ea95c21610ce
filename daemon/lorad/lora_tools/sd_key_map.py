"""SD 1.x/2.x LoRA module names in every layout, and where each lands in a single-file checkpoint.

kohya names an SD 1.x/2.x module ``lora_unet_`` / ``lora_te_`` + its diffusers/transformers path with
dots turned into underscores (:mod:`lorad.lora.kohya_format`). Turning a name back into a path is
ambiguous (``down_blocks`` vs ``down.blocks``), so the map enumerates the real module paths of the
architecture — the U-Net built on the meta device from a config, the text encoder's layers by rule —
and looks names up. The single-file (LDM) names come from :mod:`lorad.models.ldm_layout`, the same map
lorad writes checkpoints with. The architecture is SD 1.5's / SD 2.1's shipped config unless a
checkpoint's own key names say otherwise (:func:`layout_from_checkpoint_keys`), as for the tiny test models.
"""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import resources

import torch
from torch import nn

from lorad.lora.kohya_format import PREFIXES, kohya_module_name
from lorad.lora_tools.base_families import register_key_map
from lorad.models.ldm_layout import CLIP_PREFIX, OPEN_CLIP_PREFIX, UNET_PREFIX, unet_to_ldm

TEXT_MODULES = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj", "mlp.fc1", "mlp.fc2")
# OpenCLIP (SD 2.x in the single-file layout) fuses q/k/v into in_proj_weight, rows in q, k, v order.
_OPEN_CLIP_PARTS = {"self_attn.out_proj": "attn.out_proj", "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj"}
COMFY_TEXT_ENCODER = {"sd1": "clip_l", "sd2": "clip_h"}


@dataclass(frozen=True)
class SdArchitecture:
    """The parts of an SD 1.x/2.x architecture that decide module names."""

    layers_per_block: int
    down_attention: tuple[bool, ...]  # per level, input side
    up_attention: tuple[bool, ...]  # per level, output side (diffusers' up_blocks order)
    text_layers: int


@dataclass(frozen=True)
class CheckpointTarget:
    """Where a LoRA module's update goes in a single-file checkpoint: a weight, or rows of a fused one."""

    key: str
    rows: tuple[int, int] | None = None  # [start, end) rows of a fused q/k/v weight


def _shipped(version: str) -> SdArchitecture:
    root = resources.files("lorad.models") / "sd_configs" / version
    unet = json.loads((root / "unet" / "config.json").read_text())
    text = json.loads((root / "text_encoder" / "config.json").read_text())
    return SdArchitecture(
        layers_per_block=int(unet["layers_per_block"]),
        down_attention=tuple("CrossAttn" in t for t in unet["down_block_types"]),
        up_attention=tuple("CrossAttn" in t for t in unet["up_block_types"]),
        text_layers=int(text["num_hidden_layers"]),
    )


def layout_from_checkpoint_keys(keys: Sequence[str]) -> SdArchitecture | None:
    """The architecture of an SD 1.x/2.x single-file checkpoint, read from its key names; None if it is not one."""
    ops = sorted(
        int(m[1]) for k in keys if (m := re.match(re.escape(UNET_PREFIX) + r"input_blocks\.(\d+)\.0\.op\.weight$", k))
    )
    if not ops:
        return None
    layers = ops[0] - 1
    stride = layers + 1
    levels = len(ops) + 1
    present = {
        m[1] for k in keys if (m := re.match(re.escape(UNET_PREFIX) + r"((?:input|output)_blocks\.\d+\.\d+)\.", k))
    }
    down = tuple(f"input_blocks.{1 + i * stride}.1" in present for i in range(levels))
    # An output level has attention when its first layer's slot 1 is an attention (not an upsampler conv).
    up = tuple(
        any(k.startswith(f"{UNET_PREFIX}output_blocks.{i * stride}.1.proj_in") for k in keys) for i in range(levels)
    )
    layer_ids = {int(m[1]) for k in keys if (m := re.search(r"(?:encoder\.layers|resblocks)\.(\d+)\.", k))}
    return SdArchitecture(layers, down, up, max(layer_ids) + 1 if layer_ids else 0)


def _unet_config(arch: SdArchitecture) -> dict:
    levels = len(arch.down_attention)
    return {
        "block_out_channels": [32 * (i + 1) for i in range(levels)],  # widths do not change names
        "down_block_types": ["CrossAttnDownBlock2D" if a else "DownBlock2D" for a in arch.down_attention],
        "up_block_types": ["CrossAttnUpBlock2D" if a else "UpBlock2D" for a in arch.up_attention],
        "layers_per_block": arch.layers_per_block,
        "cross_attention_dim": 32,
        "attention_head_dim": 1,
        "norm_num_groups": 32,
    }


@functools.lru_cache(maxsize=8)
def _unet_paths(arch: SdArchitecture) -> tuple[str, ...]:
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(_unet_config(arch))
    return tuple(p for p, m in unet.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d)))


class SdKeyMap:
    """The :class:`~lorad.lora_tools.base_families.KeyMap` of SD 1.x (``version="sd1"``) or 2.x (``"sd2"``)."""

    def __init__(self, version: str, arch: SdArchitecture | None = None) -> None:
        self.family = version
        self.arch = arch or _shipped(version)
        unet_paths = _unet_paths(self.arch)
        ldm = unet_to_ldm(
            dict.fromkeys((p + ".weight" for p in unet_paths), None),
            {
                "layers_per_block": self.arch.layers_per_block,
                "up_block_types": _unet_config(self.arch)["up_block_types"],
            },
        )
        self._unet_ldm = {p: k.removesuffix(".weight") for p, k in zip(unet_paths, ldm, strict=True)}
        text_paths = [f"text_model.encoder.layers.{i}.{m}" for i in range(self.arch.text_layers) for m in TEXT_MODULES]
        self._paths = {kohya_module_name(PREFIXES["unet"], p): ("unet", p) for p in unet_paths}
        self._paths |= {kohya_module_name(PREFIXES["text_encoder"], p): ("text_encoder", p) for p in text_paths}
        self._comfy = {self._comfy_of(name): name for name in self._paths}

    def split(self, kohya_name: str) -> tuple[str, str] | None:
        return self._paths.get(kohya_name)

    def join(self, part: str, path: str) -> str:
        return kohya_module_name(PREFIXES[part], path)

    def names(self) -> list[str]:
        return list(self._paths)

    def _comfy_of(self, kohya_name: str) -> str:
        part, path = self._paths[kohya_name]
        if part == "unet":
            return "diffusion_model." + self._unet_ldm[path].removeprefix(UNET_PREFIX)
        return f"text_encoders.{COMFY_TEXT_ENCODER[self.family]}.transformer.{path}"

    def comfy_name(self, kohya_name: str) -> str | None:
        return self._comfy_of(kohya_name) if kohya_name in self._paths else None

    def from_comfy(self, comfy_name: str) -> str | None:
        return self._comfy.get(comfy_name)

    def checkpoint_target(self, kohya_name: str, text_width: int) -> CheckpointTarget | None:
        """Where the module's update goes in this version's single-file checkpoint."""
        found = self._paths.get(kohya_name)
        if found is None:
            return None
        part, path = found
        if part == "unet":
            return CheckpointTarget(self._unet_ldm[path] + ".weight")
        inner = path.removeprefix("text_model.")
        if self.family == "sd1":
            return CheckpointTarget(CLIP_PREFIX + inner + ".weight")
        m = re.fullmatch(r"encoder\.layers\.(\d+)\.(.+)", inner)
        assert m is not None
        block = f"{OPEN_CLIP_PREFIX}transformer.resblocks.{m[1]}"
        if qkv := re.fullmatch(r"self_attn\.([qkv])_proj", m[2]):
            index = "qkv".index(qkv[1])
            return CheckpointTarget(f"{block}.attn.in_proj_weight", (index * text_width, (index + 1) * text_width))
        return CheckpointTarget(f"{block}.{_OPEN_CLIP_PARTS[m[2]]}.weight")


@functools.lru_cache(maxsize=4)
def shipped_key_map(version: str) -> SdKeyMap:
    """The key map of SD 1.5's (sd1) or SD 2.1's (sd2) architecture."""
    return SdKeyMap(version)


register_key_map("sd1", lambda: shipped_key_map("sd1"))
register_key_map("sd2", lambda: shipped_key_map("sd2"))
