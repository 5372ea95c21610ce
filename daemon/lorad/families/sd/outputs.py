"""The files a finished run leaves in ``output_dir``: both LoRA formats and the run summary."""

from __future__ import annotations

import json
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from peft import LoraConfig

from lorad.config import TrainConfig
from lorad.lora.diffusers_format import save_diffusers_lora
from lorad.lora.kohya_format import save_kohya, to_kohya
from lorad.training.family import RunFacts

SAVE_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
BASE_VERSION_NAMES = {"sd1": "sd_v1", "sd2": "sd_v2"}


@dataclass(frozen=True)
class SdRunFacts:
    """What happened in an image run, for the LoRA file's metadata."""

    model_version: str
    num_train_images: int  # samples per epoch, repeats included (kohya's meaning)
    tag_frequency: Mapping[str, Mapping[str, int]]
    run: RunFacts


def kohya_metadata(config: TrainConfig, facts: SdRunFacts) -> dict[str, str]:
    """The ``ss_*`` metadata kohya's scripts write and A1111/Civitai read (all values strings)."""
    meta: dict[str, Any] = {
        "ss_output_name": config.output_name,
        "ss_network_module": "networks.lora",
        "ss_network_dim": config.lora_rank,
        "ss_network_alpha": config.effective_lora_alpha,
        "ss_network_dropout": config.lora_dropout,
        "ss_base_model_version": BASE_VERSION_NAMES.get(facts.model_version, facts.model_version),
        "ss_v2": facts.model_version == "sd2",
        "ss_sd_model_name": Path(config.base_model).name,
        "ss_resolution": f"({config.resolution}, {config.resolution})",
        "ss_enable_bucket": config.enable_bucket,
        "ss_num_train_images": facts.num_train_images,
        "ss_tag_frequency": json.dumps(facts.tag_frequency),
        "ss_training_started_at": facts.run.started_at,
        "ss_training_finished_at": time.time(),
        "ss_steps": facts.run.steps,
        "ss_epoch": facts.run.epoch,
        "ss_num_epochs": config.epochs,
        "ss_max_train_steps": config.max_train_steps or facts.run.steps,
        "ss_learning_rate": config.learning_rate,
        "ss_unet_lr": config.learning_rate,
        "ss_text_encoder_lr": config.effective_text_encoder_lr if config.train_text_encoder else 0,
        "ss_batch_size_per_device": config.batch_size,
        "ss_gradient_accumulation_steps": config.gradient_accumulation_steps,
        "ss_lr_scheduler": config.lr_scheduler,
        "ss_lr_warmup_steps": config.lr_warmup_steps,
        "ss_optimizer": config.optimizer,
        "ss_seed": config.seed,
        "ss_noise_offset": config.noise_offset,
        "ss_min_snr_gamma": config.min_snr_gamma or 0,
        "ss_mixed_precision": facts.run.precision,
        "ss_max_grad_norm": config.max_grad_norm,
        "ss_caption_dropout_rate": config.caption_dropout,
        "ss_shuffle_caption": config.shuffle_caption,
        "ss_keep_tokens": config.keep_tokens,
        "ss_training_comment": f"trained with lorad; trigger word: {config.trigger_word or '(none)'}",
    }
    return {k: str(v) for k, v in meta.items()}


def write_lora_files(
    config: TrainConfig,
    parts: Mapping[str, Mapping[str, torch.Tensor]],
    lora_configs: Mapping[str, LoraConfig],
    facts: SdRunFacts,
) -> dict[str, str]:
    """Write the kohya file and diffusers' file; return {"kohya": path, "diffusers": path}."""
    dtype = SAVE_DTYPES[config.save_precision]
    kohya_path = config.output_dir / f"{config.output_name}.safetensors"
    save_kohya(kohya_path, to_kohya(parts, config.effective_lora_alpha, dtype), kohya_metadata(config, facts))
    diffusers_path = save_diffusers_lora(config.output_dir, parts, lora_configs, dtype)
    return {"kohya": str(kohya_path), "diffusers": str(diffusers_path)}
