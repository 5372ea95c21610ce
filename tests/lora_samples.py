"""LoRA files of the tiny SD model, written by lorad's own writers, for the LoRA toolbox tests.

Random (non-zero) up and down weights on a spread of layers: attention and feed-forward linears,
1x1 (proj_in) and 3x3 (resnet conv1) convolutions, text-encoder attention and MLP.
"""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import UNet2DConditionModel
from peft import LoraConfig
from transformers import CLIPTextModel

from lorad.lora.adapters import attach_lora, detach_lora, lora_state_dict
from lorad.lora.diffusers_format import save_diffusers_lora
from lorad.lora.kohya_format import save_kohya, to_kohya
from lorad.lora.targets import resolve_targets

UNET_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "proj_in", "ff.net.0.proj", "conv1")
TEXT_TARGETS = ("q_proj", "v_proj", "fc1")
METADATA = {
    "ss_network_module": "networks.lora",
    "ss_base_model_version": "sd_v1",
    "ss_output_name": "sample",
    "ss_training_comment": "trained with lorad; trigger word: zkw",
    "ss_tag_frequency": '{"img": {"zkw": 8, "red": 5, "circle": 3}}',
}


def load_parts(tiny_sd: Path) -> tuple[UNet2DConditionModel, CLIPTextModel]:
    unet = UNet2DConditionModel.from_pretrained(tiny_sd / "unet").eval()
    text = CLIPTextModel.from_pretrained(tiny_sd / "text_encoder").eval()
    return unet, text


def lora_parts(
    tiny_sd: Path, *, rank: int = 4, alpha: float = 2.0, seed: int = 0
) -> tuple[dict[str, dict[str, torch.Tensor]], dict[str, LoraConfig]]:
    """peft-style state dicts {"unet": ..., "text_encoder": ...} with random weights, and their configs."""
    unet, text = load_parts(tiny_sd)
    generator = torch.Generator().manual_seed(seed)
    parts, configs = {}, {}
    for part, model, names in (("unet", unet, UNET_TARGETS), ("text_encoder", text, TEXT_TARGETS)):
        paths = resolve_targets(model, names, key="targets")
        attach_lora(model, adapter_name="t", target_paths=paths, rank=rank, alpha=alpha)
        state = lora_state_dict(model, "t")
        parts[part] = {k: torch.randn(v.shape, generator=generator) * 0.1 for k, v in state.items()}
        configs[part] = LoraConfig(r=rank, lora_alpha=alpha, target_modules=paths)
        detach_lora(model, "t")
    return parts, configs


def write_kohya_sample(
    dest: Path, tiny_sd: Path, *, rank: int = 4, alpha: float = 2.0, seed: int = 0, dtype: torch.dtype = torch.float32
) -> Path:
    """A kohya file as lorad's SD training writes it."""
    parts, _ = lora_parts(tiny_sd, rank=rank, alpha=alpha, seed=seed)
    save_kohya(dest, to_kohya(parts, alpha, dtype), METADATA)
    return dest


def write_diffusers_sample(dest_dir: Path, tiny_sd: Path, *, rank: int = 4, alpha: float = 2.0, seed: int = 0) -> Path:
    """diffusers' pytorch_lora_weights.safetensors as lorad's SD training writes it."""
    parts, configs = lora_parts(tiny_sd, rank=rank, alpha=alpha, seed=seed)
    return save_diffusers_lora(dest_dir, parts, configs, torch.float32)
