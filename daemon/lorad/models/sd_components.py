"""The loaded parts of a Stable Diffusion 1.x/2.x model, as the trainer uses them."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    # Annotations only: importing this module must not pull in diffusers/transformers (slow to import).
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, PreTrainedTokenizerBase

#: The SD-style versions these components describe ("sdxl" models load through the SDXL family).
MODEL_VERSIONS = ("sd1", "sd2", "sdxl")
PREDICTION_TYPES = ("epsilon", "v_prediction")


@dataclass(eq=False)
class SDComponents:
    """Everything needed to train a LoRA on an SD 1.x/2.x base model.

    Contract (guaranteed by :func:`lorad.models.sd_loader.load_sd_components`):

    - ``unet``, ``vae`` and ``text_encoder`` are in eval mode, with ``requires_grad`` False on every
      parameter, all in the dtype asked for, on the CPU.
    - ``tokenizer(texts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True)``
      gives ``input_ids`` of length ``tokenizer.model_max_length`` (77 for every SD 1.x/2.x model), all
      below ``text_encoder.config.vocab_size``.
    - ``noise_scheduler`` is a :class:`DDPMScheduler` built from the model's scheduler config, whose
      ``config.prediction_type`` equals ``prediction_type``.
    - ``model_version`` is "sd1" or "sd2"; ``source`` is the absolute path that was loaded (for a hub
      id, the snapshot folder in the local cache).
    """

    unet: UNet2DConditionModel
    vae: AutoencoderKL
    text_encoder: CLIPTextModel
    tokenizer: PreTrainedTokenizerBase
    noise_scheduler: DDPMScheduler
    model_version: str
    prediction_type: str
    source: str
    _vae_identity: str | None = field(default=None, init=False, repr=False)

    @property
    def vae_scale_factor(self) -> int:
        """Pixels per latent along each side (8 for real SD models and for the tiny test models)."""
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    def vae_identity(self) -> str:
        """Hex SHA-256 over the VAE's state_dict: every entry's name, shape, dtype and raw bytes.

        Two VAEs have the same identity exactly when they encode identically, so it keys a latent
        cache. Computed on first call and memoised: the VAE is frozen, so it must not be modified
        in place afterwards (a modified VAE keeps its old identity).
        """
        if self._vae_identity is None:
            self._vae_identity = state_dict_digest(self.vae.state_dict())
        return self._vae_identity


def state_dict_digest(state_dict: dict[str, torch.Tensor]) -> str:
    """Hex SHA-256 of a state dict's names, shapes, dtypes and bytes, in name order.

    Length-prefixing each field keeps distinct dicts from hashing the same bytes stream.
    """
    digest = hashlib.sha256()
    for name in sorted(state_dict):
        tensor = state_dict[name].detach().to("cpu").contiguous()
        # Viewing as bytes works for every dtype (bfloat16 included, which numpy lacks).
        raw = tensor.reshape(-1).view(torch.uint8).numpy().tobytes()
        header = f"{name}|{tuple(tensor.shape)}|{tensor.dtype}|{len(raw)}\n".encode()
        digest.update(len(header).to_bytes(8, "little"))
        digest.update(header)
        digest.update(raw)
    return digest.hexdigest()
