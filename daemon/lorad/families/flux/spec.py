"""FLUX.1 as the registry sees it: config, detection from file headers, and where its plug-in lives.

Light on purpose (no torch): the CLI, the TUI and config checks import it.
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

from lorad.config.example import render_annotated
from lorad.families.flux.config import FluxTrainConfig, parse_flux_config
from lorad.families.registry import FamilySpec

# A FLUX.1 transformer weight, with and without ComfyUI's checkpoint prefix.
_PROBES = (
    "double_blocks.0.img_attn.norm.key_norm.scale",
    "model.diffusion_model.double_blocks.0.img_attn.norm.key_norm.scale",
)
_HEADER_LIMIT = 100 * 1024 * 1024  # safetensors headers are far smaller; anything larger is not one

_SEED = {
    "train_data_dir": "./data/style_train",
    "base_model": "./models/unet/flux1-dev.safetensors",
    "clip_l": "./models/clip/clip_l.safetensors",
    "t5xxl": "./models/clip/t5xxl_fp16.safetensors",
    "ae": "./models/vae/ae.safetensors",
    "lora_rank": 16,
    "batch_size": 1,
    "epochs": 10,
    "learning_rate": "1e-4",
    "gradient_checkpointing": True,
    "output_dir": "./output/my_flux_lora",
}


def safetensors_keys(path: Path) -> list[str]:
    """The tensor names in a .safetensors file's header (no tensor is read); [] if it is not one."""
    try:
        with path.open("rb") as handle:
            (length,) = struct.unpack("<Q", handle.read(8))
            if length > _HEADER_LIMIT:
                return []
            header = json.loads(handle.read(length))
    except (OSError, struct.error, ValueError):
        return []
    return [k for k in header if k != "__metadata__"] if isinstance(header, dict) else []


def _json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _hub_snapshot_file(repo_id: str, name: str) -> Path | None:
    try:
        from huggingface_hub import try_to_load_from_cache

        found = try_to_load_from_cache(repo_id, name)
    except Exception:  # an id huggingface_hub rejects is simply not a FLUX model we know
        return None
    return Path(found) if isinstance(found, (str, os.PathLike)) else None


def is_flux(base_model: str) -> bool:
    """Whether ``base_model`` (a resolved path or hub id) is a FLUX.1 transformer, file or diffusers folder."""
    path = Path(base_model)
    if path.is_file():
        keys = set(safetensors_keys(path))
        return any(probe in keys for probe in _PROBES)
    if path.is_dir():
        return _json(path / "transformer" / "config.json").get("_class_name") == "FluxTransformer2DModel"
    if path.is_absolute():
        return False
    config = _hub_snapshot_file(base_model, "transformer/config.json")
    return config is not None and _json(config).get("_class_name") == "FluxTransformer2DModel"


def out_of_memory_hint(config: FluxTrainConfig) -> str:
    """The FLUX settings to lower after an out-of-memory failure, with their current values."""
    tips = []
    if not config.gradient_checkpointing:
        tips.append("gradient_checkpointing: true")
    if config.base_quantization == "none" and not config.fp8_base:
        tips.append("fp8_base: true (or base_quantization: nf4 for the least memory)")
    if config.blocks_to_swap < 18:
        tips.append(f"blocks_to_swap: {max(18, config.blocks_to_swap + 8)} (now {config.blocks_to_swap})")
    if config.batch_size > 1:
        tips.append(f"batch_size: 1 (now {config.batch_size}) with gradient_accumulation_steps")
    if config.resolution > 512:
        tips.append(f"resolution: 512 (now {config.resolution})")
    if config.lora_rank > 16:
        tips.append(f"lora_rank: 16 (now {config.lora_rank})")
    if config.train_text_encoder:
        tips.append("train_text_encoder: false")
    return "Out of memory. Try " + "; ".join(tips or ["closing other programs using the GPU"]) + "."


def preflight(config: FluxTrainConfig) -> list:
    """`lorad config --check`'s cheap checks of the model files, tokenizers, data and target names."""
    from lorad.families.flux.preflight import flux_preflight

    return flux_preflight(config)


def render_flux_example() -> str:
    """The annotated FLUX.1 config (`lorad config --example flux`)."""
    return render_annotated(FluxTrainConfig, _SEED, title="lorad FLUX.1 LoRA config")


SPEC = FamilySpec(
    name="flux",
    title="FLUX.1 (dev, schnell and fine-tunes)",
    config_class=FluxTrainConfig,
    parse=lambda raw, base_dir, source: parse_flux_config(raw, base_dir=base_dir, source=source),
    render_example=render_flux_example,
    detect=is_flux,
    priority=40,
    plugin="lorad.families.flux.family:FAMILY",
    data_key="train_data_dir",
    output_kind="image_lora",
    uses_captioner=True,
    preflight=preflight,
    out_of_memory_hint=out_of_memory_hint,
)
