"""The SDXL training config: the image-family keys with SDXL's defaults, plus SDXL's own keys.

Light on purpose (no torch): the CLI, the TUI and config checks import it through the registry.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lorad.config.example import render_annotated
from lorad.config.loader import image_checks, parse_family_config
from lorad.config.schema import REQUIRED_KEYS, TrainConfig, redefault, spec
from lorad.errors import ConfigProblem

# Sample images: 1024 px (the resolution's default), and steps and CFG that suit SDXL (SD 1.x: 20 steps, CFG 7).
SDXL_SAMPLE_STEPS = 30
SDXL_SAMPLE_CFG = 5.0


@dataclass(frozen=True, kw_only=True)
class SdxlTrainConfig(TrainConfig):
    """A validated SDXL LoRA config (SDXL base 1.0 and its fine-tunes). All paths are absolute."""

    resolution: int = redefault(
        TrainConfig,
        "resolution",
        1024,
        help="Training resolution (pixels per side of the target area). SDXL was trained at 1024.",
    )
    min_bucket_reso: int = redefault(TrainConfig, "min_bucket_reso", 512)
    max_bucket_reso: int = redefault(TrainConfig, "max_bucket_reso", 2048)
    sample_steps: int = redefault(
        TrainConfig,
        "sample_steps",
        SDXL_SAMPLE_STEPS,
        help=f"Denoising steps per sample image (--s). SDXL: {SDXL_SAMPLE_STEPS} (kohya's default for sample images).",
    )
    sample_cfg_scale: float = redefault(
        TrainConfig,
        "sample_cfg_scale",
        SDXL_SAMPLE_CFG,
        help=f"Classifier-free guidance scale of the samples (--l). SDXL: {SDXL_SAMPLE_CFG} (diffusers' SDXL "
        "pipeline default).",
    )
    model_config_dir: Path | None = redefault(
        TrainConfig,
        "model_config_dir",
        None,
        help="A diffusers-layout folder whose configs (and tokenizer/) describe a single-file base_model. "
        "Unset: lorad's built-in SDXL base 1.0 configs (right for Pony, Illustrious, NoobAI and other fine-tunes).",
    )
    prediction_type: str = redefault(
        TrainConfig,
        "prediction_type",
        "auto",
        help="What the UNet predicts. auto: from the model (a single file's v_pred marker, or the scheduler "
        "config); SDXL base and most fine-tunes: epsilon; v-pred fine-tunes such as NoobAI-XL v-pred: v_prediction.",
    )
    zero_terminal_snr: bool | None = field(
        default=None,
        metadata=spec(
            "model",
            "Rescale the noise schedule so the last timestep is pure noise, as v-prediction fine-tunes such as "
            "NoobAI-XL v-pred were trained (kohya's zero_terminal_snr). Unset: from the model (its ztsnr marker).",
        ),
    )
    fp8_base: bool = field(
        default=False,
        metadata=spec(
            "model",
            "Store the frozen UNet weights as float8 (e4m3, scaled per channel) and upcast each layer as it "
            "computes: about half the memory of bf16 for the UNet, as kohya's fp8_base. The fp8 model is kept "
            "resident apart from the full-precision one.",
        ),
    )


# What `lorad config --example sdxl` shows active: a first SDXL LoRA on a consumer GPU.
_SEED: dict[str, Any] = {
    "train_data_dir": "./data/style_train",
    "metadata_path": "./data/style_train/metadata.csv",
    "base_model": "./models/Stable-diffusion/sd_xl_base_1.0.safetensors",
    "lora_rank": 16,
    "unet_target_modules": ["to_q", "to_k", "to_v", "to_out.0"],
    "batch_size": 1,
    "gradient_accumulation_steps": 4,
    "epochs": 10,
    "learning_rate": "1e-4",
    "gradient_checkpointing": True,
    "output_dir": "./output/my_sdxl_lora",
    "save_steps": 100,
}


def render_sdxl_example() -> str:
    """An annotated SDXL config listing every key with its help text, default and choices."""
    return render_annotated(SdxlTrainConfig, _SEED, title="lorad SDXL training config")


def _sdxl_checks(values: dict[str, Any]) -> list[ConfigProblem]:
    if values.get("clip_skip"):
        # kohya only warns ("clip_skip will be unexpected" for SDXL); an error says it before a wasted run.
        return [
            ConfigProblem(
                "clip_skip",
                f"is {values['clip_skip']}, but SDXL always conditions on its text encoders' penultimate layers",
                "remove clip_skip (it applies to SD 1.x/2.x)",
            )
        ]
    return []


def parse_sdxl_config(raw: Any, *, base_dir: Path, source: str = "config") -> SdxlTrainConfig:
    """Validate a mapping of config keys into an :class:`SdxlTrainConfig` (every problem at once)."""
    return parse_family_config(
        raw,
        config_class=SdxlTrainConfig,
        family="sdxl",
        base_dir=base_dir,
        source=source,
        required=REQUIRED_KEYS,
        default_name="lora",
        checks=[*image_checks(base_dir, SdxlTrainConfig), _sdxl_checks],
    )
