"""The loaded parts of an SDXL model, as the trainer uses them."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from lorad.models.sd_components import memoised_text_identity, state_dict_digest

if TYPE_CHECKING:
    # Annotations only: importing this module must not pull in diffusers/transformers (slow to import).
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, PreTrainedTokenizerBase

#: The latent scale every SDXL VAE was trained with (SD 1.x/2.x: 0.18215). kohya hard-codes it too.
SDXL_VAE_SCALING_FACTOR = 0.13025


@dataclass(eq=False)
class SDXLComponents:
    """Everything needed to train a LoRA on an SDXL base model (SDXL base 1.0, Pony, Illustrious, NoobAI, ...).

    Contract (guaranteed by :func:`lorad.models.sdxl_loader.load_sdxl_components`):

    - ``unet`` is an SDXL UNet (``addition_embed_type == "text_time"``); ``text_encoder`` is CLIP-L
      (``CLIPTextModel``), ``text_encoder_2`` OpenCLIP bigG (``CLIPTextModelWithProjection``), and
      ``unet.config.cross_attention_dim`` equals the sum of their hidden sizes. All four modules are
      in eval mode with ``requires_grad`` False everywhere, in the dtype asked for, on the CPU.
    - ``tokenizer`` pads with ``<|endoftext|>`` and ``tokenizer_2`` with ``!`` (SDXL's convention, as
      kohya and diffusers' SDXL folders do); both give ``input_ids`` of length ``model_max_length``
      (77) below their encoder's ``vocab_size``.
    - ``noise_scheduler`` is a training :class:`DDPMScheduler` whose ``config.prediction_type`` equals
      ``prediction_type`` and whose ``config.rescale_betas_zero_snr`` equals ``zero_terminal_snr``.
    - ``source`` is the absolute path that was loaded (for a hub id, the snapshot folder).
    """

    unet: UNet2DConditionModel
    vae: AutoencoderKL
    text_encoder: CLIPTextModel
    text_encoder_2: CLIPTextModelWithProjection
    tokenizer: PreTrainedTokenizerBase
    tokenizer_2: PreTrainedTokenizerBase
    noise_scheduler: DDPMScheduler
    prediction_type: str
    zero_terminal_snr: bool
    source: str
    model_version: str = "sdxl"
    fp8_layers: int = 0  # UNet layers holding float8 weights (fp8_base); 0 for a full-precision model
    _vae_identity: str | None = field(default=None, init=False, repr=False)
    _text_identities: dict[str, str] = field(default_factory=dict, init=False, repr=False)

    @property
    def vae_scaling_factor(self) -> float:
        """What latents are multiplied by before the UNet sees them (0.13025 for every SDXL VAE)."""
        return SDXL_VAE_SCALING_FACTOR

    @property
    def vae_scale_factor(self) -> int:
        """Pixels per latent along each side (8 for real SDXL and for the tiny test models)."""
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    def vae_identity(self) -> str:
        """Hex SHA-256 over the VAE's state_dict (see :func:`state_dict_digest`); keys a latent cache.

        Memoised: the VAE is frozen and must not be modified in place afterwards.
        """
        if self._vae_identity is None:
            self._vae_identity = state_dict_digest(self.vae.state_dict())
        return self._vae_identity

    def text_encoder_identity(self, settings: dict[str, object]) -> str:
        """Both text encoders' and tokenizers' identity under ``settings``, keying cached text-encoder
        outputs. Memoised like :meth:`vae_identity`: call it only while no adapter is attached."""
        return memoised_text_identity(
            self._text_identities,
            [self.text_encoder, self.text_encoder_2],
            [self.tokenizer, self.tokenizer_2],
            {"family": self.model_version, **settings},
        )
