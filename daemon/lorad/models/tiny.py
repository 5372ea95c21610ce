"""Tiny random Stable Diffusion models, for tests, the demo and benchmarks.

A tiny model has the real SD 1.x/2.x architecture (same block types, same module names, so LoRA
targets such as ``to_q``/``to_k``/``to_v``/``to_out.0``/``proj_in``/``proj_out``/``ff.net.*`` exist)
at toy width. Sizes:

- images 64x64 RGB -> latents 4x8x8 (the VAE has four levels: downsampling factor 8, like SD);
- UNet: sample_size 8, block_out_channels (32, 64, 64), two cross-attention levels and a plain
  lowest level (as SD's three plus one), layers_per_block 1, cross_attention_dim 32;
- text encoder: CLIP, hidden size 32, 2 layers, 4 heads, 77 positions (SD 1.x: quick_gelu;
  SD 2.x: gelu);
- tokenizer: CLIP BPE trained on a built-in corpus (~1.2k tokens), padded to 77;
- scheduler: DDPM with SD's betas (epsilon for "sd1", v_prediction for "sd2").

Everything is deterministic: the same ``version`` and ``seed`` give bit-identical files.
"""

from __future__ import annotations

import json
from pathlib import Path

import diffusers
import torch
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from safetensors.torch import load_file, save_file
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from lorad.atomic import atomic_directory, write_text_atomic, write_with_atomic
from lorad.models.ldm_layout import clip_to_ldm, clip_to_open_clip, unet_to_ldm, vae_to_ldm
from lorad.models.tiny_tokenizer import BOS, EOS, MODEL_MAX_LENGTH, write_tiny_clip_tokenizer

TINY_VERSIONS = ("sd1", "sd2")
TINY_IMAGE_SIZE = 64
TINY_LATENT_SIZE = 8
TINY_CONTEXT_DIM = 32


def _unet(version: str) -> UNet2DConditionModel:
    sd2 = version == "sd2"
    return UNet2DConditionModel(
        sample_size=TINY_LATENT_SIZE,
        in_channels=4,
        out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        block_out_channels=(32, 64, 64),
        layers_per_block=1,
        norm_num_groups=32,
        cross_attention_dim=TINY_CONTEXT_DIM,
        # SD 1.x gives a head count here; SD 2.x gives channels/64 per level (the same "head count"
        # misnomer), here channels/16 so heads are 16 wide.
        attention_head_dim=(2, 4, 4) if sd2 else 2,
        use_linear_projection=sd2,
        upcast_attention=sd2,
    )


def tiny_vae(scaling_factor: float = 0.18215) -> AutoencoderKL:
    """The tiny VAE (random weights from the global RNG): 64x64 RGB <-> 4x8x8 latents."""
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 16, 32, 32),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=TINY_IMAGE_SIZE,
        scaling_factor=scaling_factor,
    )


def _text_encoder(version: str, vocab: dict[str, int]) -> CLIPTextModel:
    config = CLIPTextConfig(
        vocab_size=len(vocab),
        hidden_size=TINY_CONTEXT_DIM,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=MODEL_MAX_LENGTH,
        hidden_act="gelu" if version == "sd2" else "quick_gelu",
        projection_dim=TINY_CONTEXT_DIM,
        layer_norm_eps=1e-5,
        bos_token_id=vocab[BOS],
        eos_token_id=vocab[EOS],
        pad_token_id=vocab[EOS],
    )
    return CLIPTextModel(config)


def _scheduler(version: str) -> DDPMScheduler:
    return DDPMScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        steps_offset=1,
        prediction_type="v_prediction" if version == "sd2" else "epsilon",
    )


def _model_index() -> dict[str, object]:
    return {
        "_class_name": "StableDiffusionPipeline",
        "_diffusers_version": diffusers.__version__,
        "feature_extractor": [None, None],
        "requires_safety_checker": False,
        "safety_checker": [None, None],
        "scheduler": ["diffusers", "DDPMScheduler"],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
    }


def build_tiny_sd(dest: Path, *, version: str = "sd1", seed: int = 0) -> Path:
    """Write a complete diffusers folder for a tiny random SD model at ``dest`` and return ``dest``.

    ``version`` is "sd1" or "sd2". Weights are safetensors. ``dest`` is replaced whole and
    atomically if it exists. The caller's torch RNG state is left untouched.
    """
    if version not in TINY_VERSIONS:
        raise ValueError(f"version must be one of {TINY_VERSIONS}, not {version!r}")
    dest = Path(dest)
    with atomic_directory(dest) as tmp:
        vocab = write_tiny_clip_tokenizer(tmp / "tokenizer", pad_token="!" if version == "sd2" else EOS)
        # Each part gets its own seed so changing one part's architecture leaves the others' weights.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            unet = _unet(version)
            torch.manual_seed(seed + 1)
            vae = tiny_vae()
            torch.manual_seed(seed + 2)
            text_encoder = _text_encoder(version, vocab)
        write_sd_parts(tmp, unet=unet, vae=vae, text_encoder=text_encoder, scheduler=_scheduler(version))
    return dest


def write_sd_parts(
    folder: Path,
    *,
    unet: UNet2DConditionModel,
    vae: AutoencoderKL,
    text_encoder: CLIPTextModel,
    scheduler: DDPMScheduler,
) -> None:
    """Save an SD pipeline's parts into ``folder`` in the diffusers layout lorad's loader reads
    (safetensors, in each part's dtype; the tokenizer is the caller's to save under ``tokenizer/``).
    Used by the tiny builder and by benchmarks that build a real-size model with random weights."""
    unet.save_pretrained(folder / "unet", safe_serialization=True)
    vae.save_pretrained(folder / "vae", safe_serialization=True)
    save_text_encoder(text_encoder, folder / "text_encoder")
    scheduler.save_pretrained(folder / "scheduler")
    write_text_atomic(folder / "model_index.json", json.dumps(_model_index(), indent=2, sort_keys=True) + "\n")


def save_text_encoder(model: CLIPTextModel | CLIPTextModelWithProjection, folder: Path) -> None:
    """Save with the classic ``text_model.``-prefixed keys that SD repos on the Hub have.

    transformers >= 5.6 would save unprefixed keys for ``CLIPTextModel``, which older transformers
    cannot read; the prefixed form loads everywhere (and exercises the path real models take).
    ``CLIPTextModelWithProjection``'s ``text_projection`` sits beside ``text_model`` and keeps its name.
    """
    folder.mkdir(parents=True, exist_ok=True)
    model.config.save_pretrained(folder)
    tensors = {
        (key if key.startswith("text_projection.") else "text_model." + key.removeprefix("text_model.")): (
            tensor.detach().cpu().contiguous()
        )
        for key, tensor in model.state_dict().items()
        if not key.endswith("position_ids")
    }
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})


def write_original_checkpoint(diffusers_dir: Path, dest: Path) -> Path:
    """Write the model in ``diffusers_dir`` as ONE ``.safetensors`` in the original LDM layout.

    Keys: ``model.diffusion_model.*`` (UNet), ``first_stage_model.*`` (VAE), and
    ``cond_stage_model.transformer.*`` (SD 1.x, CLIP) or ``cond_stage_model.model.*`` (SD 2.x,
    OpenCLIP) for the text encoder; SD 2.x is recognised by ``use_linear_projection`` in the UNet
    config. Reading it back with ``load_sd_components(dest, model_config_dir=diffusers_dir)`` gives
    bit-identical weights. Meant for tiny models: weights must be unsharded ``.safetensors``.
    Written atomically; returns ``dest``.
    """
    diffusers_dir, dest = Path(diffusers_dir), Path(dest)
    unet_config = json.loads((diffusers_dir / "unet" / "config.json").read_text())
    vae_config = json.loads((diffusers_dir / "vae" / "config.json").read_text())
    sd2 = bool(unet_config.get("use_linear_projection"))
    unet = load_file(str(diffusers_dir / "unet" / "diffusion_pytorch_model.safetensors"))
    vae = load_file(str(diffusers_dir / "vae" / "diffusion_pytorch_model.safetensors"))
    text = load_file(str(diffusers_dir / "text_encoder" / "model.safetensors"))
    tensors = {
        **unet_to_ldm(unet, unet_config),
        **vae_to_ldm(vae, vae_config),
        **(clip_to_open_clip(text) if sd2 else clip_to_ldm(text)),
    }
    tensors = {key: tensor.contiguous() for key, tensor in sorted(tensors.items())}
    write_with_atomic(dest, lambda tmp: save_file(tensors, str(tmp), metadata={"format": "pt"}))
    return dest
