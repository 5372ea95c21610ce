"""SDXL on the one training loop: LoRA on the UNet, and optionally on both CLIP text encoders.

The data side is SD's (images, captions, aspect buckets); SDXL adds the conditioning it was trained
with: both encoders' penultimate hidden states plus the second's pooled embedding, and each image's
size/crop time ids (:mod:`lorad.families.sdxl.conditioning`). Frozen encoders run once per distinct
caption before the first step (cached on disk) and leave the GPU for the run. The VAE encodes in
fp32 (SDXL's overflows in fp16) and latents are scaled by 0.13025. The export writes kohya's SDXL
file (SGM UNet names, ``lora_te1_``/``lora_te2_``: A1111, Forge, ComfyUI) and diffusers' file.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lorad.diffusion.captions import caption_conditioning, move_off_device, run_epochs
from lorad.diffusion.ddpm import denoising_loss
from lorad.diffusion.image_samples import ImageSamples, MicroBatch, train_parts
from lorad.events import EventSink, LogLine
from lorad.families.sd.family import FAMILY as SD_FAMILY
from lorad.families.sd.family import SdData
from lorad.families.sd.init_lora import apply_init_lora
from lorad.families.sd.outputs import SAVE_DTYPES, SdRunFacts, kohya_metadata
from lorad.families.sdxl.conditioning import HIDDEN, POOLED, encode_prompts, time_ids, time_ids_tensor
from lorad.families.sdxl.config import SdxlTrainConfig
from lorad.families.sdxl.kohya_keys import MODELSPEC_ARCHITECTURE, SS_BASE_MODEL_VERSION, sdxl_kohya_name
from lorad.lora.adapters import attach_lora, detach_lora, lora_state_dict
from lorad.lora.diffusers_format import save_diffusers_lora
from lorad.lora.kohya_format import save_kohya, to_kohya
from lorad.lora.targets import ADAPTABLE, TEXT_ENCODER_SUGGESTIONS, UNET_ALIASES, UNET_SUGGESTIONS, resolve_targets
from lorad.models.fp8 import store_in_fp8
from lorad.models.registry import ModelKey
from lorad.models.sdxl_components import SDXLComponents
from lorad.models.single_file import is_pickle_path
from lorad.training.activation_checkpointing import (
    disable_activation_checkpointing,
    is_activation_checkpointing,
)
from lorad.training.family import ADAPTER, RunFacts, RunHooks, Scalars, ScannedData
from lorad.training.placement import Placement

TEXT_PARTS = ("text_encoder", "text_encoder_2")


def place_for_training(components: SDXLComponents, placement: Placement, *, fp8_base: bool) -> SDXLComponents:
    """Put a loaded SDXL model where a run trains it: UNet and text encoders in the weight dtype on
    the device (with ``fp8_base``, the UNet's Linear/Conv weights in float8, converted before the move
    so the device never holds the full-precision copy), the VAE in fp32 (SDXL's VAE overflows in
    fp16; latents are encoded once, so fp32 costs little)."""
    if fp8_base:
        components.fp8_layers = store_in_fp8(components.unet, compute_dtype=placement.weight_dtype).layers
    if components.vae.dtype != torch.float32:
        components.vae.to(dtype=torch.float32)
    for module in (components.vae, components.unet, components.text_encoder, components.text_encoder_2):
        module.to(placement.device)
    return components


@dataclass(frozen=True)
class _Targets:
    unet: list[str]
    text: dict[str, list[str]]  # per text part; empty without train_text_encoder


def _resolve(config: SdxlTrainConfig, model: SDXLComponents) -> _Targets:
    unet = resolve_targets(
        model.unet,
        config.unet_target_modules,
        key="unet_target_modules",
        aliases=UNET_ALIASES,
        suggestions=UNET_SUGGESTIONS,
    )
    text = {
        part: resolve_targets(
            getattr(model, part),
            config.text_encoder_target_modules,
            key="text_encoder_target_modules",
            suggestions=TEXT_ENCODER_SUGGESTIONS,
        )
        for part in TEXT_PARTS
        if config.train_text_encoder
    }
    return _Targets(unet, text)


class SdxlRun:
    """A run on one SDXL model: see :class:`lorad.training.family.FamilyRun` for the contract."""

    def __init__(
        self,
        config: SdxlTrainConfig,
        components: SDXLComponents,
        data: SdData,
        placement: Placement,
        on_event: EventSink,
    ) -> None:
        self.config, self.components, self.data = config, components, data
        self.device = placement.device
        self.scalars = Scalars()
        # Resolve targets before encoding anything, so a typo costs nothing.
        targets = _resolve(config, components)
        adaptable = {
            part: [p for p, m in getattr(components, part).named_modules() if isinstance(m, ADAPTABLE)]
            for part in ("unet", *TEXT_PARTS)
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
        # Each sample position keeps its image's size and crop as SDXL's micro-conditioning.
        self.time_ids = [
            time_ids(self.samples.image(i).width, self.samples.image(i).height, self.samples.bucket_of[i])
            for i in range(len(self.samples))
        ]

        lora = {"rank": config.lora_rank, "alpha": config.effective_lora_alpha, "dropout": config.lora_dropout}
        unet_params = attach_lora(components.unet, adapter_name=ADAPTER, target_paths=targets.unet, **lora)
        text_params = [
            p
            for part, paths in targets.text.items()
            for p in attach_lora(getattr(components, part), adapter_name=ADAPTER, target_paths=paths, **lora)
        ]
        self.parts: dict[str, nn.Module] = {"unet": components.unet} | {
            part: getattr(components, part) for part in targets.text
        }
        if config.init_lora:
            apply_init_lora(
                config,
                self.parts,
                ADAPTER,
                targeted={"unet": targets.unet, **targets.text},
                adaptable=adaptable,
                on_event=on_event,
                name_for=self.kohya_name,
            )
        self.param_groups: list[dict[str, Any]] = [{"params": unet_params, "lr": config.learning_rate}]
        if text_params:
            self.param_groups.append({"params": text_params, "lr": config.effective_text_encoder_lr})

        def encode(captions: list[str]) -> dict[str, torch.Tensor]:
            return encode_prompts(
                captions,
                tokenizer=components.tokenizer,
                tokenizer_2=components.tokenizer_2,
                text_encoder=components.text_encoder,
                text_encoder_2=components.text_encoder_2,
                device=self.device,
            )

        self.text = caption_conditioning(
            config,
            raw_captions=self.samples.raw_captions(),
            epochs=run_epochs(config, len(self.plan(0))),
            encode=encode,
            identity=lambda: components.text_encoder_identity({"output": "penultimate+pooled"}),
            trainable=bool(text_params),
            device=self.device,
            on_event=on_event,
            scalars=self.scalars,
        )
        if not text_params and config.cache_text_encoder_outputs:
            move_off_device([components.text_encoder, components.text_encoder_2], self.device)
        if components.fp8_layers:
            on_event(LogLine(f"fp8_base: {components.fp8_layers} UNet layers hold float8 weights"))

    def kohya_name(self, part: str, module_path: str) -> str:
        """kohya's SDXL name of a module of this model (SGM UNet names; lora_te1_/lora_te2_)."""
        return sdxl_kohya_name(part, module_path, self.components.unet.config)

    def plan(self, epoch: int) -> Sequence[MicroBatch]:
        return self.samples.plan(epoch)

    def loss(self, micro_batch: MicroBatch, generator: torch.Generator) -> torch.Tensor:
        scheduler = self.components.noise_scheduler
        noisy, timesteps, target = self.samples.noised(
            micro_batch, generator, scaling=self.components.vae_scaling_factor, scheduler=scheduler
        )
        text = self.text(self.samples.captions(micro_batch))
        dtype = text[HIDDEN].dtype
        ids = [self.time_ids[i] for i in micro_batch.samples]
        added = {"text_embeds": text[POOLED], "time_ids": time_ids_tensor(ids, device=self.device, dtype=dtype)}
        pred = self.components.unet(noisy.to(dtype), timesteps, text[HIDDEN], added_cond_kwargs=added).sample
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
        config = self.config
        parts = {name: lora_state_dict(module, ADAPTER) for name, module in self.parts.items()}
        report = self.data.report.to_dict()
        sd_facts = SdRunFacts(
            model_version="sdxl",
            num_train_images=len(self.samples),
            tag_frequency=report["tag_frequency"],
            run=facts,
        )
        metadata = kohya_metadata(config, sd_facts) | {
            "ss_base_model_version": SS_BASE_MODEL_VERSION,
            "modelspec.sai_model_spec": "1.0.0",
            "modelspec.architecture": MODELSPEC_ARCHITECTURE,
            "modelspec.implementation": "https://github.com/Stability-AI/generative-models",
            "modelspec.title": config.output_name,
            "modelspec.resolution": f"{config.resolution}x{config.resolution}",
            "modelspec.prediction_type": self.components.prediction_type,
        }
        dtype = SAVE_DTYPES[config.save_precision]
        kohya_path = config.output_dir / f"{config.output_name}.safetensors"
        tensors = to_kohya(parts, config.effective_lora_alpha, dtype, name_for=self.kohya_name)
        save_kohya(kohya_path, tensors, metadata)
        lora_configs = {name: module.peft_config[ADAPTER] for name, module in self.parts.items()}
        diffusers_path = save_diffusers_lora(config.output_dir, parts, lora_configs, dtype, pipeline="sdxl")
        return {"kohya": str(kohya_path), "diffusers": str(diffusers_path)}


class SdxlFamily:
    """SDXL: see :class:`lorad.training.family.ModelFamily` for the contract."""

    name = "sdxl"

    def scan(self, config: SdxlTrainConfig, *, on_event: EventSink, hooks: RunHooks) -> ScannedData:
        # Images, captions and buckets as for SD 1.x/2.x; only the bucket defaults differ (the config's).
        return SD_FAMILY.scan(config, on_event=on_event, hooks=hooks)

    def model_key(self, config: SdxlTrainConfig, placement: Placement) -> ModelKey:
        options = {
            # Only a pickle file's key depends on the opt-in: a .safetensors model is one resident model either way.
            "allow_pickle": "true" if config.allow_pickle and is_pickle_path(Path(config.base_model)) else "",
            # fp8 changes the resident weights (lossily): an fp8 model is resident apart from the full one.
            "fp8_base": "true" if config.fp8_base else "",
            "zero_terminal_snr": "" if config.zero_terminal_snr is None else str(config.zero_terminal_snr).lower(),
        }
        return ModelKey(
            base_model=config.base_model,
            device=str(placement.device),
            dtype=str(placement.weight_dtype).removeprefix("torch."),
            model_config_dir=str(config.model_config_dir or ""),
            tokenizer_path=str(config.tokenizer_path or ""),
            prediction_type=config.prediction_type,
            kind=self.name,
            options=tuple(sorted((k, v) for k, v in options.items() if v)),
        )

    def load(self, key: ModelKey) -> SDXLComponents:
        from lorad.models.sdxl_loader import load_sdxl_components

        zero_snr = key.option("zero_terminal_snr")
        components = load_sdxl_components(
            key.base_model,
            allow_pickle=key.option("allow_pickle") == "true",
            model_config_dir=Path(key.model_config_dir) if key.model_config_dir else None,
            tokenizer_path=Path(key.tokenizer_path) if key.tokenizer_path else None,
            prediction_type=key.prediction_type,
            zero_terminal_snr=None if not zero_snr else zero_snr == "true",
            dtype=getattr(torch, key.dtype),
        )
        # Loading needs only the device and the weight dtype, both part of the key.
        placement = Placement(
            device=torch.device(key.device), autocast_dtype=None, weight_dtype=getattr(torch, key.dtype)
        )
        return place_for_training(components, placement, fp8_base=key.option("fp8_base") == "true")

    def start(
        self,
        config: SdxlTrainConfig,
        model: SDXLComponents,
        data: ScannedData,
        placement: Placement,
        on_event: EventSink,
    ) -> SdxlRun:
        return SdxlRun(config, model, data.payload, placement, on_event)

    def restore(self, model: SDXLComponents) -> None:
        for part in ("unet", *TEXT_PARTS):
            module = getattr(model, part)
            if is_activation_checkpointing(module):
                disable_activation_checkpointing(module)
            module.eval()
            detach_lora(module, ADAPTER)
        # A run with cached text-encoder outputs moved the encoders off the device; the next job needs them.
        device = next(model.unet.parameters()).device
        for part in TEXT_PARTS:
            getattr(model, part).to(device)

    def signature(self, config: SdxlTrainConfig) -> dict[str, Any]:
        return SD_FAMILY.signature(config) | {"fp8_base": config.fp8_base}


FAMILY = SdxlFamily()
