"""Stable Diffusion 1.x/2.x on the one training loop: LoRA on the UNet and optionally the CLIP text encoder.

The scan reads images and captions and assigns buckets; the run encodes each (image, bucket) once
through the VAE (cached on disk by content), attaches the LoRA, and computes the DDPM loss of one
micro-batch (epsilon or v-prediction, noise offset, min-SNR); the export writes kohya's file
(A1111, Forge, ComfyUI) and diffusers' file.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lorad.config import TrainConfig
from lorad.data.buckets import assign_bucket, bucket_counts, make_buckets
from lorad.data.dataset import TrainImage, scan_dataset
from lorad.data.report import DataReport
from lorad.diffusion.captions import caption_conditioning, move_off_device, run_epochs
from lorad.diffusion.ddpm import denoising_loss
from lorad.diffusion.image_samples import ImageSamples, MicroBatch, train_parts
from lorad.events import EventSink
from lorad.families.sd.init_lora import apply_init_lora
from lorad.families.sd.outputs import SdRunFacts, write_lora_files
from lorad.lora.adapters import attach_lora, detach_lora, lora_state_dict
from lorad.lora.targets import ADAPTABLE, TEXT_ENCODER_SUGGESTIONS, UNET_ALIASES, UNET_SUGGESTIONS, resolve_targets
from lorad.models.registry import ModelKey
from lorad.models.sd_components import SDComponents
from lorad.models.single_file import is_pickle_path
from lorad.training.activation_checkpointing import (
    disable_activation_checkpointing,
    is_activation_checkpointing,
)
from lorad.training.family import ADAPTER, RunFacts, RunHooks, Scalars, ScannedData
from lorad.training.placement import Placement


@dataclass(frozen=True)
class SdData:
    """The scan's result: the usable images, each one's bucket, and the report."""

    images: list[TrainImage]
    buckets: list[tuple[int, int]]
    report: DataReport


def load_for_training(
    base_model: str,
    placement: Placement,
    *,
    allow_pickle: bool = False,
    model_config_dir: Path | None = None,
    tokenizer_path: Path | None = None,
    prediction_type: str = "auto",
) -> SDComponents:
    """Load a base model and place it for training: UNet and text encoder in the weight dtype on
    the device, the VAE in fp32 (fp16 VAEs overflow to NaN on some images; latents are encoded
    once, so fp32 costs little)."""
    from lorad.models.sd_loader import load_sd_components

    components = load_sd_components(
        base_model,
        allow_pickle=allow_pickle,
        model_config_dir=model_config_dir,
        tokenizer_path=tokenizer_path,
        prediction_type=prediction_type,
        dtype=placement.weight_dtype,
    )
    if components.vae.dtype != torch.float32:
        components.vae.to(dtype=torch.float32)
    for module in (components.vae, components.unet, components.text_encoder):
        module.to(placement.device)
    return components


class SdRun:
    """A run on one SD model: see :class:`lorad.training.family.FamilyRun` for the contract."""

    def __init__(
        self, config: TrainConfig, components: SDComponents, data: SdData, placement: Placement, on_event: EventSink
    ) -> None:
        self.config, self.components, self.data = config, components, data
        self.device = placement.device
        self.scalars = Scalars()
        unet, text_encoder = components.unet, components.text_encoder

        # Resolve targets before encoding anything, so a typo costs nothing.
        unet_paths = resolve_targets(
            unet,
            config.unet_target_modules,
            key="unet_target_modules",
            aliases=UNET_ALIASES,
            suggestions=UNET_SUGGESTIONS,
        )
        te_paths = (
            resolve_targets(
                text_encoder,
                config.text_encoder_target_modules,
                key="text_encoder_target_modules",
                suggestions=TEXT_ENCODER_SUGGESTIONS,
            )
            if config.train_text_encoder
            else []
        )

        # Layer paths an init_lora file may name, read before the adapter wraps them.
        adaptable = {
            "unet": [p for p, m in unet.named_modules() if isinstance(m, ADAPTABLE)],
            "text_encoder": [p for p, m in text_encoder.named_modules() if isinstance(m, ADAPTABLE)],
        }

        # Latents are encoded once per (image content, bucket, VAE) and reused across runs.
        self.samples = ImageSamples(
            config,
            data.images,
            data.buckets,
            vae=components.vae,
            vae_identity=components.vae_identity(),
            device=self.device,
            on_event=on_event,
            scalars=self.scalars,
        )

        unet_params = attach_lora(
            unet,
            adapter_name=ADAPTER,
            target_paths=unet_paths,
            rank=config.lora_rank,
            alpha=config.effective_lora_alpha,
            dropout=config.lora_dropout,
        )
        te_params = (
            attach_lora(
                text_encoder,
                adapter_name=ADAPTER,
                target_paths=te_paths,
                rank=config.lora_rank,
                alpha=config.effective_lora_alpha,
                dropout=config.lora_dropout,
            )
            if te_paths
            else []
        )
        if config.init_lora:
            apply_init_lora(
                config,
                {"unet": unet, "text_encoder": text_encoder},
                ADAPTER,
                targeted={"unet": unet_paths, "text_encoder": te_paths},
                adaptable=adaptable,
                on_event=on_event,
            )
        self.parts: dict[str, nn.Module] = {"unet": unet} | ({"text_encoder": text_encoder} if te_params else {})
        self.param_groups: list[dict[str, Any]] = [{"params": unet_params, "lr": config.learning_rate}]
        if te_params:
            self.param_groups.append({"params": te_params, "lr": config.effective_text_encoder_lr})
        tokenizer = components.tokenizer

        def encode(captions: list[str]) -> dict[str, torch.Tensor]:
            ids = tokenizer(
                captions,
                padding="max_length",
                truncation=True,
                max_length=tokenizer.model_max_length,
                return_tensors="pt",
            ).input_ids
            return {"hidden": text_encoder(ids.to(self.device))[0]}

        self.text = caption_conditioning(
            config,
            raw_captions=self.samples.raw_captions(),
            epochs=run_epochs(config, len(self.plan(0))),
            encode=encode,
            identity=lambda: components.text_encoder_identity({"output": "last_hidden_state"}),
            trainable=bool(te_params),
            device=self.device,
            on_event=on_event,
            scalars=self.scalars,
        )
        if not te_params and config.cache_text_encoder_outputs:
            move_off_device([text_encoder], self.device)

    def plan(self, epoch: int) -> Sequence[MicroBatch]:
        return self.samples.plan(epoch)

    def loss(self, micro_batch: MicroBatch, generator: torch.Generator) -> torch.Tensor:
        scheduler = self.components.noise_scheduler
        noisy, timesteps, target = self.samples.noised(
            micro_batch, generator, scaling=self.components.vae.config.scaling_factor, scheduler=scheduler
        )
        unet = self.components.unet
        pred = unet(noisy.to(unet.dtype), timesteps, self.text(self.samples.captions(micro_batch))["hidden"]).sample
        return denoising_loss(
            pred, target, scheduler=scheduler, timesteps=timesteps, min_snr_gamma=self.config.min_snr_gamma
        )

    def train_mode(self, gradient_checkpointing: bool) -> None:
        train_parts(list(self.parts.values()), gradient_checkpointing)

    def after_step(self, step: int, total_steps: int) -> None:
        pass

    def finish(self, step: int) -> None:
        pass

    def export(self, facts: RunFacts) -> dict[str, str]:
        parts = {name: lora_state_dict(module, ADAPTER) for name, module in self.parts.items()}
        lora_configs = {name: module.peft_config[ADAPTER] for name, module in self.parts.items()}
        report = self.data.report.to_dict()
        sd_facts = SdRunFacts(
            model_version=self.components.model_version,
            num_train_images=len(self.samples),
            tag_frequency=report["tag_frequency"],
            run=facts,
        )
        return write_lora_files(self.config, parts, lora_configs, sd_facts)


class SdFamily:
    """Stable Diffusion 1.x/2.x: see :class:`lorad.training.family.ModelFamily` for the contract."""

    name = "sd"

    def scan(self, config: TrainConfig, *, on_event: EventSink, hooks: RunHooks) -> ScannedData:
        images, report = scan_dataset(
            config.train_data_dir,
            metadata_path=config.metadata_path,
            caption_extension=config.caption_extension,
            repeats=config.repeats.for_folder,
            caption_missing=hooks.caption_missing,
        )
        bucket_list = make_buckets(
            config.resolution, config.min_bucket_reso, config.max_bucket_reso, config.bucket_reso_steps
        )
        buckets = [
            assign_bucket(
                image.width,
                image.height,
                buckets=bucket_list,
                resolution=config.resolution,
                step=config.bucket_reso_steps,
                no_upscale=config.bucket_no_upscale,
            )
            if config.enable_bucket
            else (config.resolution, config.resolution)
            for image in images
        ]
        report = report.with_buckets(bucket_counts(buckets))
        return ScannedData(report=report.to_dict(), text=report.render(), payload=SdData(images, buckets, report))

    def model_key(self, config: TrainConfig, placement: Placement) -> ModelKey:
        return sd_model_key(
            base_model=config.base_model,
            placement=placement,
            model_config_dir=config.model_config_dir,
            tokenizer_path=config.tokenizer_path,
            prediction_type=config.prediction_type,
            allow_pickle=config.allow_pickle,
        )

    def load(self, key: ModelKey) -> SDComponents:
        # Loading needs only the device and the weight dtype, both part of the key.
        placement = Placement(
            device=torch.device(key.device), autocast_dtype=None, weight_dtype=getattr(torch, key.dtype)
        )
        return load_for_training(
            key.base_model,
            placement,
            allow_pickle=key.option("allow_pickle") == "true",
            model_config_dir=Path(key.model_config_dir) if key.model_config_dir else None,
            tokenizer_path=Path(key.tokenizer_path) if key.tokenizer_path else None,
            prediction_type=key.prediction_type,
        )

    def start(
        self, config: TrainConfig, model: SDComponents, data: ScannedData, placement: Placement, on_event: EventSink
    ) -> SdRun:
        return SdRun(config, model, data.payload, placement, on_event)

    def restore(self, model: SDComponents) -> None:
        for module in (model.unet, model.text_encoder):
            if is_activation_checkpointing(module):
                disable_activation_checkpointing(module)
            module.eval()
            detach_lora(module, ADAPTER)
        # A run with cached text-encoder outputs moved the encoder off the device; the next job needs it.
        model.text_encoder.to(model.unet.device)

    def signature(self, config: TrainConfig) -> dict[str, Any]:
        keys = (
            "lora_rank",
            "unet_target_modules",
            "train_text_encoder",
            "text_encoder_target_modules",
            "batch_size",
            "gradient_accumulation_steps",
            "seed",
            "base_model",
        )
        values = config.to_dict()
        return {k: values[k] for k in keys} | {"lora_alpha": config.effective_lora_alpha}


def sd_model_key(
    *,
    base_model: str,
    placement: Placement,
    model_config_dir: Path | None = None,
    tokenizer_path: Path | None = None,
    prediction_type: str = "auto",
    allow_pickle: bool = False,
    kind: str = "sd",
) -> ModelKey:
    """The registry key of an SD-style base model loaded on ``placement``'s device in its weight dtype."""
    return ModelKey(
        base_model=base_model,
        device=str(placement.device),
        dtype=str(placement.weight_dtype).removeprefix("torch."),
        model_config_dir=str(model_config_dir or ""),
        tokenizer_path=str(tokenizer_path or ""),
        prediction_type=prediction_type,
        kind=kind,
        # Only a pickle file's key depends on the opt-in: a .safetensors model is one resident model either way.
        options=(("allow_pickle", "true"),) if allow_pickle and is_pickle_path(Path(base_model)) else (),
    )


FAMILY = SdFamily()
