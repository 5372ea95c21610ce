"""Tiny random FLUX.1 models, for tests, the demo and benchmarks.

A tiny model has FLUX.1's real architecture (same block types and module names, so every LoRA
target and every BFL key exists) at toy width:

- images 64x64 RGB -> latents 16x8x8 (a four-level VAE, downsampling factor 8, with FLUX's
  ``shift_factor`` and ``scaling_factor``) -> 16 packed 2x2 patches of 64 channels;
- transformer: 2 double and 2 single blocks, 2 heads of 16 (``axes_dims_rope`` (4, 6, 6)),
  with the guidance embedder for "dev" and without it for "schnell";
- CLIP-L stand-in: CLIP text model of width 32 (pooled output feeds ``pooled_projection_dim``),
  tokenizer: the tiny CLIP BPE of :mod:`lorad.models.tiny_tokenizer`;
- T5-XXL stand-in: T5 encoder (gated-GELU, relative attention) of width 32 (``joint_attention_dim``),
  tokenizer: the tiny Unigram of :mod:`lorad.models.tiny_t5_tokenizer`.

:func:`build_tiny_flux` writes a diffusers folder that ``FluxPipeline.from_pretrained`` loads;
:func:`write_flux_files` writes the same weights the way ComfyUI/Forge/kohya users keep them: the
transformer as one BFL-layout file (optionally with ComfyUI's ``model.diffusion_model.`` prefix,
optionally in float8), and ``clip_l``, ``t5xxl`` and ``ae`` as separate files. Everything is
deterministic: the same variant and seed give bit-identical files.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import diffusers
import torch
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel
from safetensors.torch import load_file, save_file
from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

from lorad.atomic import atomic_directory, write_text_atomic, write_with_atomic
from lorad.families.flux.key_map import COMFY_CHECKPOINT_PREFIX, FluxShape, diffusers_to_bfl
from lorad.models.ldm_layout import VAE_PREFIX, vae_to_ldm
from lorad.models.tiny import save_text_encoder
from lorad.models.tiny_t5_tokenizer import write_tiny_t5_tokenizer
from lorad.models.tiny_tokenizer import BOS, EOS, MODEL_MAX_LENGTH, write_tiny_clip_tokenizer

FLUX_VARIANTS = ("dev", "schnell")
TINY_FLUX_IMAGE_SIZE = 64
TINY_FLUX_LATENT_CHANNELS = 16
TINY_T5_MAX_LENGTH = {"dev": 512, "schnell": 256}
# FLUX.1's VAE: latents are stored as (z - shift) * scale.
FLUX_VAE_SHIFT = 0.1159
FLUX_VAE_SCALE = 0.3611
_CLIP_WIDTH = 32
_T5_WIDTH = 32


def tiny_flux_transformer(variant: str = "dev", *, num_layers: int = 2, num_single_layers: int = 2):
    """A tiny random ``FluxTransformer2DModel`` (uses the caller's torch RNG)."""
    return FluxTransformer2DModel(
        patch_size=1,
        in_channels=4 * TINY_FLUX_LATENT_CHANNELS,
        num_layers=num_layers,
        num_single_layers=num_single_layers,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=_T5_WIDTH,
        pooled_projection_dim=_CLIP_WIDTH,
        guidance_embeds=variant == "dev",
        axes_dims_rope=(4, 6, 6),
    )


def _vae() -> AutoencoderKL:
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 16, 32, 32),
        layers_per_block=1,
        latent_channels=TINY_FLUX_LATENT_CHANNELS,
        norm_num_groups=8,
        sample_size=TINY_FLUX_IMAGE_SIZE,
        scaling_factor=FLUX_VAE_SCALE,
        shift_factor=FLUX_VAE_SHIFT,
        use_quant_conv=False,
        use_post_quant_conv=False,
    )


def _clip_l(vocab: dict[str, int]) -> CLIPTextModel:
    config = CLIPTextConfig(
        vocab_size=len(vocab),
        hidden_size=_CLIP_WIDTH,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=MODEL_MAX_LENGTH,
        hidden_act="quick_gelu",
        projection_dim=_CLIP_WIDTH,
        layer_norm_eps=1e-5,
        bos_token_id=vocab[BOS],
        eos_token_id=vocab[EOS],
        pad_token_id=vocab[EOS],
    )
    return CLIPTextModel(config)


def _t5(vocab_size: int) -> T5EncoderModel:
    config = T5Config(
        vocab_size=vocab_size,
        d_model=_T5_WIDTH,
        d_kv=8,
        d_ff=64,
        num_layers=2,
        num_heads=4,
        relative_attention_num_buckets=32,
        relative_attention_max_distance=128,
        feed_forward_proj="gated-gelu",
        is_encoder_decoder=False,
        use_cache=False,
        tie_word_embeddings=False,
        pad_token_id=0,
        eos_token_id=1,
        decoder_start_token_id=0,
    )
    return T5EncoderModel(config)


def _scheduler(variant: str) -> FlowMatchEulerDiscreteScheduler:
    # FLUX.1-dev shifts its sampling schedule by resolution; schnell samples the plain schedule.
    if variant == "dev":
        return FlowMatchEulerDiscreteScheduler(
            num_train_timesteps=1000,
            shift=3.0,
            use_dynamic_shifting=True,
            base_shift=0.5,
            max_shift=1.15,
            base_image_seq_len=256,
            max_image_seq_len=4096,
        )
    return FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=1.0, use_dynamic_shifting=False)


def _model_index() -> dict[str, object]:
    return {
        "_class_name": "FluxPipeline",
        "_diffusers_version": diffusers.__version__,
        "feature_extractor": [None, None],
        "image_encoder": [None, None],
        "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "text_encoder_2": ["transformers", "T5EncoderModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "tokenizer_2": ["transformers", "T5TokenizerFast"],
        "transformer": ["diffusers", "FluxTransformer2DModel"],
        "vae": ["diffusers", "AutoencoderKL"],
    }


def build_tiny_flux(dest: Path, *, variant: str = "dev", seed: int = 0) -> Path:
    """Write a complete diffusers folder for a tiny random FLUX.1 model at ``dest`` and return ``dest``.

    ``variant`` is "dev" (guidance-distilled: the transformer has a guidance embedder) or "schnell".
    ``dest`` is replaced whole and atomically if it exists. The caller's torch RNG is left untouched.
    """
    if variant not in FLUX_VARIANTS:
        raise ValueError(f"variant must be one of {FLUX_VARIANTS}, not {variant!r}")
    dest = Path(dest)
    with atomic_directory(dest) as tmp:
        vocab = write_tiny_clip_tokenizer(tmp / "tokenizer")
        t5_vocab_size = write_tiny_t5_tokenizer(tmp / "tokenizer_2", model_max_length=TINY_T5_MAX_LENGTH[variant])
        # Each part gets its own seed, so changing one part's architecture leaves the others' weights.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            transformer = tiny_flux_transformer(variant)
            torch.manual_seed(seed + 1)
            vae = _vae()
            torch.manual_seed(seed + 2)
            clip_l = _clip_l(vocab)
            torch.manual_seed(seed + 3)
            t5 = _t5(t5_vocab_size)
        transformer.save_pretrained(tmp / "transformer", safe_serialization=True)
        vae.save_pretrained(tmp / "vae", safe_serialization=True)
        save_text_encoder(clip_l, tmp / "text_encoder")
        t5.save_pretrained(tmp / "text_encoder_2", safe_serialization=True)
        _scheduler(variant).save_pretrained(tmp / "scheduler")
        write_text_atomic(tmp / "model_index.json", json.dumps(_model_index(), indent=2, sort_keys=True) + "\n")
    return dest


@dataclass(frozen=True)
class FluxFiles:
    """The separate files a ComfyUI/Forge user keeps for one FLUX.1 model."""

    transformer: Path
    clip_l: Path
    t5xxl: Path
    ae: Path


def write_flux_files(
    diffusers_dir: Path, dest: Path, *, comfy_prefix: bool = False, float8: bool = False, name: str = "flux1"
) -> FluxFiles:
    """Write the model in ``diffusers_dir`` as ComfyUI/Forge users keep FLUX.1, into folder ``dest``.

    - ``<name>.safetensors``: the transformer in BFL's layout (``double_blocks.0.img_attn.qkv.weight``...),
      under ``model.diffusion_model.`` when ``comfy_prefix``; with ``float8`` every linear weight
      is stored as ``float8_e4m3fn`` (as the common "fp8" FLUX checkpoints are), the rest in bf16;
    - ``clip_l.safetensors``: CLIP-L with transformers' ``text_model.*`` keys;
    - ``t5xxl.safetensors``: the T5 encoder with transformers' keys (``encoder.block.0...``, ``shared.weight``);
    - ``ae.safetensors``: the VAE in the original (LDM) layout without a prefix.

    Meant for tiny models (weights must be unsharded ``.safetensors``). Each file is written atomically.
    """
    diffusers_dir, dest = Path(diffusers_dir), Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    config = json.loads((diffusers_dir / "transformer" / "config.json").read_text())
    transformer = diffusers_to_bfl(
        load_file(str(diffusers_dir / "transformer" / "diffusion_pytorch_model.safetensors")),
        FluxShape.from_config(config),
    )
    if float8:
        transformer = {
            k: v.to(torch.float8_e4m3fn if k.endswith(".weight") and v.ndim == 2 else torch.bfloat16)
            for k, v in transformer.items()
        }
    if comfy_prefix:
        transformer = {COMFY_CHECKPOINT_PREFIX + k: v for k, v in transformer.items()}
    vae_config = json.loads((diffusers_dir / "vae" / "config.json").read_text())
    vae = vae_to_ldm(load_file(str(diffusers_dir / "vae" / "diffusion_pytorch_model.safetensors")), vae_config)
    t5 = load_file(str(diffusers_dir / "text_encoder_2" / "model.safetensors"))
    files = FluxFiles(
        transformer=dest / f"{name}.safetensors",
        clip_l=dest / "clip_l.safetensors",
        t5xxl=dest / "t5xxl.safetensors",
        ae=dest / "ae.safetensors",
    )
    _save(files.transformer, transformer)
    _save(files.clip_l, load_file(str(diffusers_dir / "text_encoder" / "model.safetensors")))
    _save(files.t5xxl, {k: v for k, v in t5.items() if k != "encoder.embed_tokens.weight"})
    _save(files.ae, {k.removeprefix(VAE_PREFIX): v for k, v in vae.items()})
    return files


def _save(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    tensors = {k: v.contiguous() for k, v in sorted(tensors.items())}
    write_with_atomic(path, lambda tmp: save_file(tensors, str(tmp), metadata={"format": "pt"}))
