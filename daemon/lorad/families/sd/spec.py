"""Stable Diffusion 1.x/2.x as the registry sees it: config, detection, and where its plug-in lives."""

from __future__ import annotations

from lorad.config.example import render_example
from lorad.config.loader import parse_config
from lorad.config.schema import TrainConfig
from lorad.families.registry import FamilySpec


def out_of_memory_hint(config: TrainConfig) -> str:
    """Concrete settings to lower after an out-of-memory failure, with their current values."""
    return "Out of memory. Try " + "; ".join(memory_tips(config) or ["closing other programs using the GPU"]) + "."


def memory_tips(config: TrainConfig, *, small_resolution: int = 512) -> list[str]:
    """The image-family settings that lower memory use, each with its current value."""
    tips = []
    if config.batch_size > 1:
        tips.append(
            f"batch_size: {max(1, config.batch_size // 2)} (now {config.batch_size}) with "
            f"gradient_accumulation_steps: {config.gradient_accumulation_steps * 2}"
        )
    if not config.gradient_checkpointing:
        tips.append("gradient_checkpointing: true")
    if config.resolution > small_resolution:
        tips.append(f"resolution: {small_resolution} (now {config.resolution})")
    if config.lora_rank > 8:
        tips.append(f"lora_rank: {max(4, config.lora_rank // 2)} (now {config.lora_rank})")
    if config.train_text_encoder:
        tips.append("train_text_encoder: false")
    if config.mixed_precision in ("no", "auto"):
        tips.append("mixed_precision: bf16 (or fp16 on older GPUs)")
    return tips


def preflight(config: TrainConfig) -> list:
    """``lorad config --check``'s cheap look at the images, the model (built on the meta device) and targets."""
    from lorad.families.sd.preflight import sd_preflight

    return sd_preflight(config)


SPEC = FamilySpec(
    name="sd",
    title="Stable Diffusion 1.x/2.x",
    config_class=TrainConfig,
    parse=lambda raw, base_dir, source: parse_config(raw, base_dir=base_dir, source=source),
    render_example=render_example,
    # The family of last resort: a base model no other family claims is tried as SD 1.x/2.x (when the
    # config's keys fit it), whose loader names what it found when the file is something else.
    detect=lambda base_model: False,
    preflight=preflight,
    priority=1000,
    plugin="lorad.families.sd.family:FAMILY",
    data_key="train_data_dir",
    output_kind="image_lora",
    uses_captioner=True,
    out_of_memory_hint=out_of_memory_hint,
)
