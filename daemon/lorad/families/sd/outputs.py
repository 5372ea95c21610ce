"""The files a run leaves in ``output_dir``: both LoRA formats and the run summary when it finishes,
kohya's per-epoch LoRA files (``save_every_n_epochs``), and a partial LoRA when it is stopped."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from peft import LoraConfig

from lorad.config import TrainConfig
from lorad.disk_space import disk_full_as_error, ensure_room
from lorad.errors import DiskFull
from lorad.events import EventSink, LogLine
from lorad.lora.diffusers_format import save_diffusers_lora
from lorad.lora.kohya_format import save_kohya, to_kohya
from lorad.lora.networks import NetworkSpec, network_file_tensors, network_metadata, network_spec
from lorad.training.family import RunFacts
from lorad.training.optimizers import OPTIMIZERS
from lorad.training.run_folder import EXPORT_FULL_HINT

SAVE_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
BASE_VERSION_NAMES = {"sd1": "sd_v1", "sd2": "sd_v2", "sdxl": "sdxl_base_v1-0"}
# kohya's EPOCH_FILE_NAME ("{}-{:06d}"): A1111 users know `my_lora-000004` as "after epoch 4".
EPOCH_FILE_NAME = "{name}-{epoch:06d}.safetensors"
PARTIAL_FILE_NAME = "{name}-partial-step{step:08d}.safetensors"
# Room for safetensors headers, metadata and the summary beyond the tensors themselves.
_EXPORT_SLACK_BYTES = 256 * 1024


@dataclass(frozen=True)
class LoraFileLayout:
    """How a family's LoRA files name layers: kohya's module name of a (part, module path); which diffusers
    pipeline's loader writes its diffusers file ("sd" or "sdxl"); metadata beyond kohya's ``ss_*`` keys."""

    kohya_name: Callable[[str, str], str] | None = None  # None: SD 1.x/2.x's (diffusers names)
    pipeline: str = "sd"
    metadata: Mapping[str, str] = field(default_factory=dict)


SD_LAYOUT = LoraFileLayout()


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
        **network_metadata(network_spec(config)),
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
        "ss_optimizer": optimizer_description(config),
        "ss_seed": config.seed,
        "ss_noise_offset": config.noise_offset,
        "ss_min_snr_gamma": config.min_snr_gamma or 0,
        "ss_mixed_precision": facts.run.precision,
        "ss_max_grad_norm": config.max_grad_norm,
        "ss_caption_dropout_rate": config.caption_dropout,
        "ss_shuffle_caption": config.shuffle_caption,
        "ss_keep_tokens": config.keep_tokens,
        "ss_keep_tokens_separator": config.keep_tokens_separator,
        "ss_caption_tag_dropout_rate": config.caption_tag_dropout_rate,
        "ss_flip_aug": config.flip_aug,
        "ss_random_crop": config.random_crop,
        "ss_clip_skip": config.clip_skip or 1,
        "ss_multires_noise_iterations": config.multires_noise_iterations,
        "ss_multires_noise_discount": config.multires_noise_discount,
        "ss_ip_noise_gamma": config.ip_noise_gamma,
        "ss_min_timestep": config.min_timestep,
        "ss_max_timestep": config.max_timestep,
        "ss_masked_loss": config.masked_loss,
        "ss_reg_dataset_dirs": json.dumps([str(config.reg_data_dir)] if config.reg_data_dir else []),
        "ss_prior_loss_weight": config.prior_loss_weight,
        "ss_ema_decay": config.ema_decay or 0,
        "ss_ema": facts.run.variant == "ema",
        "ss_training_comment": f"trained with lorad; trigger word: {config.trigger_word or '(none)'}",
    }
    return {k: str(v) for k, v in meta.items()}


def lora_file_bytes(parts: Mapping[str, Mapping[str, torch.Tensor]], dtype: torch.dtype) -> int:
    """About how many bytes one LoRA file of ``parts`` saved as ``dtype`` takes."""
    elements = sum(t.numel() for state in parts.values() for t in state.values())
    return elements * dtype.itemsize + _EXPORT_SLACK_BYTES


def optimizer_description(config: TrainConfig) -> str:
    """kohya's ``ss_optimizer`` text: the optimizer's class path and its extra arguments."""
    kind = OPTIMIZERS[config.optimizer]
    args = ",".join(f"{k}={v}" for k, v in config.optimizer_args.items)
    return f"{kind.module}.{kind.attr}" + (f"({args})" if args else "")


def write_lora_files(
    config: TrainConfig,
    parts: Mapping[str, Mapping[str, torch.Tensor]],
    lora_configs: Mapping[str, LoraConfig],
    facts: SdRunFacts,
    spec: NetworkSpec | None = None,
    *,
    layout: LoraFileLayout = SD_LAYOUT,
) -> dict[str, str]:
    """Write the kohya file, and for plain LoRA diffusers' file too; return role → path ("kohya",
    "diffusers"). LyCORIS networks (``spec``) are written in their own key layout (A1111/Forge/ComfyUI),
    without a diffusers file. The EMA variant (``facts.run.variant == "ema"``) is
    ``<output_name>-ema.safetensors`` (roles "kohya_ema", "diffusers_ema"; diffusers' file in ``output_dir/ema/``).

    Raises :class:`~lorad.errors.DiskFull` (naming the disk and the room needed) before writing when
    the disk has no room for both, or after removing the partial file when it fills up meanwhile.
    """
    dtype = SAVE_DTYPES[config.save_precision]
    spec = spec or network_spec(config)
    variant = facts.run.variant
    suffix = f"-{variant}" if variant else ""
    role = f"_{variant}" if variant else ""
    kohya_path = config.output_dir / f"{config.output_name}{suffix}.safetensors"
    needed, what = 2 * lora_file_bytes(parts, dtype), f"the LoRA files of `{config.output_name}`"
    ensure_room(config.output_dir, needed, what, EXPORT_FULL_HINT)
    with disk_full_as_error(config.output_dir, what, needed, EXPORT_FULL_HINT):
        metadata = kohya_metadata(config, facts) | dict(layout.metadata)
        save_kohya(kohya_path, kohya_tensors(config, parts, dtype, spec, layout), metadata)
        if spec.is_lycoris:
            return {f"kohya{role}": str(kohya_path)}
        folder = config.output_dir / variant if variant else config.output_dir
        diffusers_path = save_diffusers_lora(folder, parts, lora_configs, dtype, pipeline=layout.pipeline)
    return {f"kohya{role}": str(kohya_path), f"diffusers{role}": str(diffusers_path)}


def kohya_tensors(
    config: TrainConfig,
    parts: Mapping[str, Mapping[str, torch.Tensor]],
    dtype: torch.dtype,
    spec: NetworkSpec,
    layout: LoraFileLayout = SD_LAYOUT,
) -> dict[str, torch.Tensor]:
    """The tensors of the kohya-layout file: LoRA's ``lora_down/lora_up/alpha``, or a LyCORIS type's own keys
    (named when the network was attached)."""
    if spec.is_lycoris:
        return network_file_tensors(parts, dtype)
    if layout.kohya_name is None:
        return to_kohya(parts, config.effective_lora_alpha, dtype)
    return to_kohya(parts, config.effective_lora_alpha, dtype, name_for=layout.kohya_name)


def _write_kohya_file(
    config: TrainConfig,
    parts: Mapping[str, Mapping[str, torch.Tensor]],
    facts: SdRunFacts,
    name: str,
    layout: LoraFileLayout,
) -> Path:
    dtype = SAVE_DTYPES[config.save_precision]
    path = config.output_dir / name
    needed = lora_file_bytes(parts, dtype)
    ensure_room(config.output_dir, needed, f"the LoRA file {name}")
    with disk_full_as_error(config.output_dir, f"the LoRA file {name}", needed):
        tensors = kohya_tensors(config, parts, dtype, network_spec(config), layout)
        save_kohya(path, tensors, kohya_metadata(config, facts) | dict(layout.metadata))
    return path


def write_epoch_lora(
    config: TrainConfig,
    parts: Mapping[str, Mapping[str, torch.Tensor]],
    facts: SdRunFacts,
    *,
    layout: LoraFileLayout = SD_LAYOUT,
) -> Path:
    """Write the kohya LoRA of the epoch ``facts.run.epoch`` just completed, as kohya's ``save_every_n_epochs``
    does: ``<output_name>-<epoch, 6 digits>.safetensors`` in ``output_dir``. DiskFull when it does not fit."""
    return _write_kohya_file(
        config, parts, facts, EPOCH_FILE_NAME.format(name=config.output_name, epoch=facts.run.epoch), layout
    )


def write_partial_lora(
    config: TrainConfig,
    parts: Mapping[str, Mapping[str, torch.Tensor]],
    facts: SdRunFacts,
    on_event: EventSink,
    *,
    layout: LoraFileLayout = SD_LAYOUT,
) -> Path | None:
    """Write the kohya LoRA of a stopped run's last completed step ``facts.run.steps``, named as partial
    (``<output_name>-partial-step<8 digits>.safetensors``), so a cancelled job still leaves a LoRA
    A1111 loads. Its checkpoint matters more: a full disk is reported as a warning and gives None."""
    name = PARTIAL_FILE_NAME.format(name=config.output_name, step=facts.run.steps)
    try:
        return _write_kohya_file(config, parts, facts, name, layout)
    except DiskFull as err:
        on_event(LogLine(message=f"no partial LoRA written: {err}", level="warning"))
        return None
