"""SDXL on the one training loop: LoRA on the UNet, and optionally on both CLIP text encoders.

An SDXL run is an SD run (:class:`lorad.families.sd.family.SdRun`: images, captions, buckets, latents,
every data and loss option) with SDXL's traits: two text encoders whose penultimate hidden states and
pooled embedding condition the UNet, beside each sample's size/crop time ids
(:mod:`lorad.families.sdxl.conditioning`); kohya's SDXL names (SGM UNet names, ``lora_te1_``/
``lora_te2_``); diffusers' SDXL LoRA file. Frozen encoders run once per distinct caption before the
first step and leave the GPU for the run. The VAE stays fp32 (SDXL's overflows in fp16) and latents are
scaled by 0.13025. ``fp8_base`` keeps the frozen UNet in float8.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lorad.config.pickle_policy import needs_pickle
from lorad.events import EventSink, LogLine
from lorad.families.sd.family import FAMILY as SD_FAMILY
from lorad.families.sd.family import SdRun, restore_model
from lorad.families.sd.outputs import LoraFileLayout
from lorad.families.sd.traits import ModelTraits, SampleView
from lorad.families.sdxl.conditioning import HIDDEN, POOLED, encode_prompts, time_ids, time_ids_tensor
from lorad.families.sdxl.config import SdxlTrainConfig
from lorad.families.sdxl.kohya_keys import MODELSPEC_ARCHITECTURE, sdxl_kohya_name
from lorad.models.fp8 import store_in_fp8
from lorad.models.registry import ModelKey
from lorad.models.sdxl_components import SDXLComponents
from lorad.training.family import RunHooks, ScannedData
from lorad.training.placement import Placement

TEXT_PARTS = ("text_encoder", "text_encoder_2")


def _encode(model: SDXLComponents, captions: Sequence[str], device: torch.device, config: Any) -> dict:
    return encode_prompts(
        captions,
        tokenizer=model.tokenizer,
        tokenizer_2=model.tokenizer_2,
        text_encoder=model.text_encoder,
        text_encoder_2=model.text_encoder_2,
        device=device,
    )


def _denoise(
    denoiser: nn.Module,
    noisy: torch.Tensor,
    timesteps: torch.Tensor,
    text: dict[str, torch.Tensor],
    views: Sequence[SampleView],
) -> torch.Tensor:
    """The UNet's prediction with SDXL's conditioning: both encoders' hidden states, and the pooled
    embedding beside each sample's original size, crop and bucket (its time ids)."""
    ids = [time_ids(v.width, v.height, v.bucket, flipped=v.flipped, crop=v.crop) for v in views]
    dtype = noisy.dtype
    added = {
        "text_embeds": text[POOLED].to(dtype),
        "time_ids": time_ids_tensor(ids, device=noisy.device, dtype=dtype),
    }
    return denoiser(noisy, timesteps, text[HIDDEN].to(dtype), added_cond_kwargs=added).sample


def sdxl_traits(config: SdxlTrainConfig, model: SDXLComponents) -> ModelTraits:
    """What an SD run needs to train SDXL (see :class:`lorad.families.sd.family.ModelTraits`)."""
    metadata = {
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.architecture": MODELSPEC_ARCHITECTURE,
        "modelspec.implementation": "https://github.com/Stability-AI/generative-models",
        "modelspec.title": config.output_name,
        "modelspec.resolution": f"{config.resolution}x{config.resolution}",
        "modelspec.prediction_type": model.prediction_type,
    }
    return ModelTraits(
        text_parts=TEXT_PARTS,
        kohya_name=lambda model, part, path: sdxl_kohya_name(part, path, model.unet.config),
        encode=_encode,
        denoise=_denoise,
        # SDXL always conditions on the penultimate layers (no clip_skip) and the pooled projection.
        text_settings=lambda config: {"output": "penultimate+pooled"},
        layout=LoraFileLayout(pipeline="sdxl", metadata=metadata),
    )


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


class SdxlFamily:
    """SDXL: see :class:`lorad.training.family.ModelFamily` for the contract."""

    name = "sdxl"

    def scan(self, config: SdxlTrainConfig, *, on_event: EventSink, hooks: RunHooks) -> ScannedData:
        # Images, captions and buckets as for SD 1.x/2.x; only the bucket defaults differ (the config's).
        return SD_FAMILY.scan(config, on_event=on_event, hooks=hooks)

    def model_key(self, config: SdxlTrainConfig, placement: Placement) -> ModelKey:
        options = {
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
            # Only a pickle model's key depends on the opt-in: a .safetensors model is one resident model either way.
            allow_pickle=needs_pickle(config.base_model, config.allow_pickle),
        )

    def load(self, key: ModelKey) -> SDXLComponents:
        from lorad.models.sdxl_loader import load_sdxl_components

        zero_snr = key.option("zero_terminal_snr")
        components = load_sdxl_components(
            key.base_model,
            allow_pickle=key.allow_pickle,
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
    ) -> SdRun:
        if model.fp8_layers:
            on_event(LogLine(f"fp8_base: {model.fp8_layers} UNet layers hold float8 weights"))
        return SdRun(config, model, data.payload, placement, on_event, traits=sdxl_traits(config, model))

    def restore(self, model: SDXLComponents) -> None:
        restore_model(model, TEXT_PARTS)

    def signature(self, config: SdxlTrainConfig) -> dict[str, Any]:
        return SD_FAMILY.signature(config) | {"fp8_base": config.fp8_base}


FAMILY = SdxlFamily()
