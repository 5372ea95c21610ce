"""What an SD-style run (SD 1.x/2.x, SDXL) needs to know about its model beyond the UNet and VAE, shared by
its training steps and its sample images: how text becomes the UNet's conditioning, and how the UNet is
called with it. SD 1.x/2.x's traits are :data:`SD_TRAITS`; SDXL's live in its family."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from lorad.config import TrainConfig
from lorad.diffusion.clip_skip import clip_hidden_states, clip_token_ids
from lorad.families.sd.outputs import SD_LAYOUT, LoraFileLayout
from lorad.lora.kohya_format import PREFIXES, kohya_module_name, portable_path
from lorad.models.sd_components import SDComponents
from lorad.training.transfer import to_device


@dataclass(frozen=True)
class SampleView:
    """How one picture the UNet denoises was framed: the upright ``width`` x ``height`` of its source image,
    its ``bucket`` (width, height), whether it is mirrored, and with ``random_crop`` the (top, left) pixel
    offset of its window in the scaled image (None: centre-cropped). A sample image is its own source,
    uncropped: ``SampleView(w, h, (w, h), False, (0, 0))``."""

    width: int
    height: int
    bucket: tuple[int, int]
    flipped: bool
    crop: tuple[int, int] | None


@dataclass(frozen=True)
class ModelTraits:
    """What an SD-style run needs to know about its model beyond the UNet and VAE: its text encoders (attribute
    names on the loaded model), the kohya names of its layers, how captions become the UNet's conditioning,
    and the layout of its LoRA files.

    - ``kohya_name(model, part, path)``: the layer's module name in kohya's file.
    - ``encode(model, captions, device, config)``: the text encoders' outputs for ``captions`` (name ->
      tensor, batch first; autograd as the caller has it).
    - ``denoise(denoiser, noisy, timesteps, text, views)``: the UNet's prediction with ``text`` (rows of
      ``encode``'s output, in the dtype of ``noisy``'s computation) and each row's ``views`` entry.
    - ``text_settings(config)``: what else changes ``encode``'s output, for the text-encoder cache key.
    """

    text_parts: tuple[str, ...]
    kohya_name: Callable[[Any, str, str], str]
    encode: Callable[[Any, Sequence[str], torch.device, TrainConfig], dict[str, torch.Tensor]]
    denoise: Callable[[nn.Module, torch.Tensor, torch.Tensor, dict[str, torch.Tensor], Sequence[SampleView]], Any]
    text_settings: Callable[[TrainConfig], dict[str, object]]
    layout: LoraFileLayout


def _sd_encode(model: SDComponents, captions: Sequence[str], device: torch.device, config: TrainConfig) -> dict:
    ids = clip_token_ids(model.tokenizer, captions)
    return {"hidden": clip_hidden_states(model.text_encoder, to_device(ids, device), config.clip_skip)}


SD_TRAITS = ModelTraits(
    text_parts=("text_encoder",),
    kohya_name=lambda model, part, path: kohya_module_name(PREFIXES[part], portable_path(part, path)),
    encode=_sd_encode,
    denoise=lambda denoiser, noisy, timesteps, text, views: denoiser(noisy, timesteps, text["hidden"]).sample,
    text_settings=lambda config: {"output": "hidden_states", "clip_skip": config.clip_skip or 1},
    layout=SD_LAYOUT,
)
