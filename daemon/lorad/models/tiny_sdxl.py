"""Tiny random SDXL models, for tests, the demo and benchmarks.

A tiny SDXL model has the real SDXL architecture at toy width, so every module name (and with it
every kohya/SGM LoRA key) exists as in SDXL base:

- UNet: three levels like SDXL (a plain first level, then two cross-attention levels),
  ``layers_per_block`` 2 (so SGM block numbers match SDXL's: ``input_blocks.4.1`` is the first
  attention), ``transformer_layers_per_block`` (1, 1, 2), linear projections, and
  ``addition_embed_type="text_time"``: the pooled text embedding plus six size/crop time ids,
  each embedded in ``TINY_TIME_EMBED_DIM`` sinusoidal features;
- two text encoders of different widths, as in SDXL (CLIP-L 768 and OpenCLIP bigG 1280): a
  ``CLIPTextModel`` (``TINY_TE1_WIDTH``, quick_gelu) and a ``CLIPTextModelWithProjection``
  (``TINY_TE2_WIDTH``, gelu, projecting to ``TINY_POOLED_DIM``); the UNet attends to their
  concatenation (``TINY_CONTEXT_DIM``);
- two tokenizers from the tiny CLIP BPE: the first pads with ``<|endoftext|>``, the second with
  ``!`` (as SDXL's tokenizer_2 does);
- the tiny SD VAE (64x64 images -> 4x8x8 latents) with SDXL's scaling factor 0.13025;
- SDXL base's Euler scheduler config (epsilon, or v_prediction for v-pred fine-tunes).

:func:`write_sdxl_checkpoint` writes the same model as one SGM / AUTOMATIC1111 single file. Both
are deterministic: the same ``seed`` gives bit-identical files.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import diffusers
import torch
from diffusers import UNet2DConditionModel
from safetensors.torch import load_file, save_file
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from lorad.atomic import atomic_directory, write_text_atomic, write_with_atomic
from lorad.models.ldm_layout import (
    SDXL_CLIP_PREFIX,
    SDXL_OPEN_CLIP_PREFIX,
    clip_to_ldm,
    clip_to_open_clip,
    unet_to_ldm,
    vae_to_ldm,
)
from lorad.models.sdxl_components import SDXL_VAE_SCALING_FACTOR
from lorad.models.tiny import TINY_LATENT_SIZE, save_text_encoder, tiny_vae
from lorad.models.tiny_tokenizer import BOS, EOS, MODEL_MAX_LENGTH, write_tiny_clip_tokenizer

TINY_TE1_WIDTH = 32
TINY_TE2_WIDTH = 48
TINY_CONTEXT_DIM = TINY_TE1_WIDTH + TINY_TE2_WIDTH
TINY_POOLED_DIM = 40
TINY_TIME_EMBED_DIM = 8
# SDXL's added conditioning: the pooled embedding and six time ids, each embedded sinusoidally.
TINY_ADDED_COND_DIM = TINY_POOLED_DIM + 6 * TINY_TIME_EMBED_DIM
PREDICTION_TYPES = ("epsilon", "v_prediction")


def _unet() -> UNet2DConditionModel:
    return UNet2DConditionModel(
        sample_size=TINY_LATENT_SIZE,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        block_out_channels=(32, 64, 64),
        layers_per_block=2,
        transformer_layers_per_block=(1, 1, 2),
        norm_num_groups=32,
        cross_attention_dim=TINY_CONTEXT_DIM,
        # SDXL gives channels/64 per level (heads 64 wide); here channels/16.
        attention_head_dim=(2, 4, 4),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=TINY_TIME_EMBED_DIM,
        projection_class_embeddings_input_dim=TINY_ADDED_COND_DIM,
    )


def _text_config(vocab: dict[str, int], width: int, act: str, **extra: object) -> CLIPTextConfig:
    return CLIPTextConfig(
        vocab_size=len(vocab),
        hidden_size=width,
        intermediate_size=2 * width,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=MODEL_MAX_LENGTH,
        hidden_act=act,
        layer_norm_eps=1e-5,
        bos_token_id=vocab[BOS],
        eos_token_id=vocab[EOS],
        pad_token_id=vocab[EOS],
        **extra,
    )


def _scheduler_config(prediction_type: str) -> dict[str, object]:
    return {
        "_class_name": "EulerDiscreteScheduler",
        "_diffusers_version": diffusers.__version__,
        "beta_end": 0.012,
        "beta_schedule": "scaled_linear",
        "beta_start": 0.00085,
        "clip_sample": False,
        "interpolation_type": "linear",
        "num_train_timesteps": 1000,
        "prediction_type": prediction_type,
        "sample_max_value": 1.0,
        "set_alpha_to_one": False,
        "skip_prk_steps": True,
        "steps_offset": 1,
        "timestep_spacing": "leading",
        "trained_betas": None,
        "use_karras_sigmas": False,
    }


def _model_index() -> dict[str, object]:
    return {
        "_class_name": "StableDiffusionXLPipeline",
        "_diffusers_version": diffusers.__version__,
        "force_zeros_for_empty_prompt": True,
        "add_watermarker": None,
        "scheduler": ["diffusers", "EulerDiscreteScheduler"],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "tokenizer_2": ["transformers", "CLIPTokenizer"],
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
    }


def build_tiny_sdxl(dest: Path, *, seed: int = 0, prediction_type: str = "epsilon") -> Path:
    """Write a complete diffusers folder for a tiny random SDXL model at ``dest`` and return ``dest``.

    ``prediction_type`` goes into the scheduler config ("v_prediction" stands for v-pred
    fine-tunes such as NoobAI's). Weights are safetensors. ``dest`` is replaced whole and
    atomically if it exists. The caller's torch RNG state is left untouched.
    """
    if prediction_type not in PREDICTION_TYPES:
        raise ValueError(f"prediction_type must be one of {PREDICTION_TYPES}, not {prediction_type!r}")
    dest = Path(dest)
    with atomic_directory(dest) as tmp:
        vocab = write_tiny_clip_tokenizer(tmp / "tokenizer", pad_token=EOS)
        write_tiny_clip_tokenizer(tmp / "tokenizer_2", pad_token="!")
        # Each part gets its own seed so changing one part's architecture leaves the others' weights.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            unet = _unet()
            torch.manual_seed(seed + 1)
            vae = tiny_vae(scaling_factor=SDXL_VAE_SCALING_FACTOR)
            torch.manual_seed(seed + 2)
            text_encoder = CLIPTextModel(_text_config(vocab, TINY_TE1_WIDTH, "quick_gelu"))
            torch.manual_seed(seed + 3)
            text_encoder_2 = CLIPTextModelWithProjection(
                _text_config(vocab, TINY_TE2_WIDTH, "gelu", projection_dim=TINY_POOLED_DIM)
            )
        unet.save_pretrained(tmp / "unet", safe_serialization=True)
        vae.register_to_config(force_upcast=True)
        vae.save_pretrained(tmp / "vae", safe_serialization=True)
        save_text_encoder(text_encoder, tmp / "text_encoder")
        save_text_encoder(text_encoder_2, tmp / "text_encoder_2")
        (tmp / "scheduler").mkdir()
        write_text_atomic(
            tmp / "scheduler" / "scheduler_config.json",
            json.dumps(_scheduler_config(prediction_type), indent=2, sort_keys=True) + "\n",
        )
        write_text_atomic(tmp / "model_index.json", json.dumps(_model_index(), indent=2, sort_keys=True) + "\n")
    return dest


def write_sdxl_checkpoint(diffusers_dir: Path, dest: Path) -> Path:
    """Write the SDXL model in ``diffusers_dir`` as ONE ``.safetensors`` in the SGM / A1111 layout.

    Keys: ``model.diffusion_model.*`` (UNet, with ``label_emb`` for the added conditioning),
    ``first_stage_model.*`` (VAE), ``conditioner.embedders.0.transformer.text_model.*`` (CLIP-L) and
    ``conditioner.embedders.1.model.*`` (OpenCLIP layout: fused qkv, transposed ``text_projection``,
    and the ``logit_scale`` real SDXL files carry). Reading it back with the SDXL loader and
    ``model_config_dir=diffusers_dir`` gives bit-identical weights. Meant for tiny models: weights
    must be unsharded ``.safetensors``. Written atomically; returns ``dest``.
    """
    diffusers_dir, dest = Path(diffusers_dir), Path(dest)
    unet_config = json.loads((diffusers_dir / "unet" / "config.json").read_text())
    vae_config = json.loads((diffusers_dir / "vae" / "config.json").read_text())
    unet = load_file(str(diffusers_dir / "unet" / "diffusion_pytorch_model.safetensors"))
    vae = load_file(str(diffusers_dir / "vae" / "diffusion_pytorch_model.safetensors"))
    text = load_file(str(diffusers_dir / "text_encoder" / "model.safetensors"))
    text_2 = load_file(str(diffusers_dir / "text_encoder_2" / "model.safetensors"))
    tensors = {
        **unet_to_ldm(unet, unet_config),
        **vae_to_ldm(vae, vae_config),
        **clip_to_ldm(text, prefix=SDXL_CLIP_PREFIX),
        **clip_to_open_clip(text_2, prefix=SDXL_OPEN_CLIP_PREFIX),
        # CLIP's contrastive temperature, unused for generation; log(100) as in trained CLIPs.
        SDXL_OPEN_CLIP_PREFIX + "logit_scale": torch.tensor(math.log(100.0)),
    }
    tensors = {key: tensor.contiguous() for key, tensor in sorted(tensors.items())}
    write_with_atomic(dest, lambda tmp: save_file(tensors, str(tmp), metadata={"format": "pt"}))
    return dest
