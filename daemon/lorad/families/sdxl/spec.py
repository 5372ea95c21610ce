"""SDXL as the registry sees it: config, detection, and where its plug-in lives."""

from __future__ import annotations

from lorad.families.registry import FamilySpec
from lorad.families.sd.spec import memory_tips
from lorad.families.sdxl.config import SdxlTrainConfig, parse_sdxl_config, render_sdxl_example
from lorad.models.sdxl_detection import is_sdxl_model


def preflight(config: SdxlTrainConfig) -> list:
    """``lorad config --check``'s cheap look at the images, the model (built on the meta device) and targets."""
    from lorad.families.sd.preflight import image_preflight

    def on_meta():
        from lorad.models.sdxl_loader import sdxl_modules_on_meta

        return sdxl_modules_on_meta(
            config.base_model, allow_pickle=config.allow_pickle, model_config_dir=config.model_config_dir
        )

    return image_preflight(config, on_meta)


def out_of_memory_hint(config: SdxlTrainConfig) -> str:
    """Concrete settings to lower after an out-of-memory failure, with their current values."""
    tips = memory_tips(config, small_resolution=768)
    if not config.fp8_base:
        tips.append("fp8_base: true")
    if not config.cache_text_encoder_outputs and not config.train_text_encoder:
        tips.append("cache_text_encoder_outputs: true")
    return "Out of memory. Try " + "; ".join(tips or ["closing other programs using the GPU"]) + "."


SPEC = FamilySpec(
    name="sdxl",
    title="Stable Diffusion XL (SDXL base, Pony, Illustrious, NoobAI, ...)",
    config_class=SdxlTrainConfig,
    parse=lambda raw, base_dir, source: parse_sdxl_config(raw, base_dir=base_dir, source=source),
    render_example=render_sdxl_example,
    detect=is_sdxl_model,
    priority=50,
    plugin="lorad.families.sdxl.family:FAMILY",
    data_key="train_data_dir",
    output_kind="image_lora",
    uses_captioner=True,
    preflight=preflight,
    out_of_memory_hint=out_of_memory_hint,
)
