"""Load FLUX.1 (dev, schnell and their fine-tunes) strictly offline, one component at a time.

``base_model`` may be:

- a BFL-layout single file (``flux1-dev.safetensors``: ``double_blocks.0.img_attn.qkv.weight``...),
  with or without ComfyUI's ``model.diffusion_model.`` prefix, in bf16/fp16/fp32 or float8
  (``float8_e4m3fn`` weights, also ComfyUI's "scaled fp8" with per-layer ``scale_weight``);
  then ``clip_l``, ``t5xxl`` and ``ae`` name the separate files ComfyUI/Forge users keep (unless
  the checkpoint bundles them, as ComfyUI's "checkpoint" releases do);
- a diffusers folder (``model_index.json``, ``transformer/``, ``vae/``, ``text_encoder/``,
  ``text_encoder_2/``, ``tokenizer/``, ``tokenizer_2/``), or a Hub id already in the local cache.

``clip_l``/``t5xxl``/``ae`` override a folder's own components too. Nothing is ever downloaded:
the configs a single file lacks are the FLUX.1 ones shipped in ``flux_configs/`` (depth taken
from the file, so compact models with fewer blocks load too) or ``model_config_dir``'s.

:func:`resolve_flux_model` does every cheap check (paths, file kinds, key names and shapes,
dev vs schnell, configs, tokenizers) without reading weights; the ``load_*`` functions then read
one component each, so a caller can encode captions with the text encoders, free them, and only
then load the transformer (T5-XXL and the transformer need never be resident together).
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from diffusers import AutoencoderKL, FluxTransformer2DModel
from diffusers.loaders.single_file_utils import (
    convert_flux_transformer_checkpoint_to_diffusers,
    convert_ldm_vae_checkpoint,
)
from safetensors import SafetensorError, safe_open
from transformers import CLIPTextConfig, CLIPTextModel, PreTrainedTokenizerBase, T5Config, T5EncoderModel

from lorad.errors import ModelLoadError
from lorad.families.flux.key_map import COMFY_CHECKPOINT_PREFIX, FluxShape, bfl_to_diffusers
from lorad.models.flux_tokenizers import CLIP_L, T5XXL, find_tokenizer, open_clip_tokenizer, open_t5_tokenizer
from lorad.models.sd_loader import resolve_base_model

SHIPPED_CONFIGS = Path(__file__).parent / "flux_configs"
SAFETENSORS_SUFFIXES = (".safetensors", ".sft")
T5_MAX_LENGTH = {"dev": 512, "schnell": 256}
# Bundled components in ComfyUI's all-in-one FLUX checkpoints.
BUNDLED_PREFIXES = {
    "ae": ("vae.", "first_stage_model."),
    "clip_l": ("text_encoders.clip_l.transformer.",),
    "t5xxl": ("text_encoders.t5xxl.transformer.",),
}
_PROBE_KEY = "double_blocks.0.img_attn.norm.key_norm.scale"
_FLUX_HINT = (
    "`base_model` must be a FLUX.1 transformer in BFL's single-file layout (flux1-dev.safetensors, with or "
    "without ComfyUI's `model.diffusion_model.` prefix), a FLUX.1 diffusers folder, or a Hub id in the local cache."
)


@dataclass(frozen=True)
class Component:
    """Where one part of the model comes from: a diffusers subfolder, or tensors in a safetensors file.

    ``prefix`` is stripped from the file's keys (ComfyUI's ``model.diffusion_model.``, a bundle's
    ``vae.``); ``config`` is the part's diffusers/transformers config; ``where`` names the config
    key and path for messages.
    """

    where: str
    path: Path
    config: dict[str, Any]
    is_folder: bool = False
    prefix: str = ""


@dataclass(frozen=True)
class FluxSources:
    """Everything :func:`resolve_flux_model` found; the ``load_*`` functions read weights from it."""

    variant: str  # "dev" (guidance embedder present) or "schnell"
    transformer: Component
    vae: Component
    clip_l: Component
    t5xxl: Component
    clip_tokenizer: Path
    t5_tokenizer: Path
    scheduler_config: dict[str, Any]
    t5_max_length: int
    shape: FluxShape = field(repr=False)

    @property
    def source(self) -> str:
        """The transformer's location; what a registry keys the resident transformer by."""
        return str(self.transformer.path)


@dataclass(frozen=True)
class TransformerSource:
    """The transformer part of a FLUX.1 model, found and checked without reading weights.

    ``folder`` is the diffusers folder (None for a single file); ``bundled`` maps "ae"/"clip_l"/
    "t5xxl" to their key prefix when a single file carries them too; ``config_dir`` is
    ``model_config_dir`` made absolute.
    """

    variant: str
    transformer: Component
    shape: FluxShape
    base: Path
    folder: Path | None
    bundled: dict[str, str]
    config_dir: Path | None

    @property
    def source(self) -> str:
        return str(self.transformer.path)


def _absolute(path: Path | None, base_dir: Path | None) -> Path | None:
    if path is None:
        return None
    path = Path(path).expanduser()
    return (path if path.is_absolute() else (Path(base_dir) if base_dir else Path.cwd()) / path).resolve()


def resolve_flux_transformer(
    base_model: str, *, model_config_dir: Path | None = None, base_dir: Path | None = None
) -> TransformerSource:
    """Find and check ``base_model``'s transformer (all a resident model needs) without reading weights.

    Raises ModelLoadError naming ``base_model`` or ``model_config_dir`` and the fix.
    """
    config_dir = _absolute(model_config_dir, base_dir)
    if config_dir is not None and not config_dir.is_dir():
        raise ModelLoadError(
            f"`model_config_dir` {str(config_dir)!r} is not a folder",
            "Set it to a FLUX.1 diffusers folder (its transformer/, vae/, text_encoder/, text_encoder_2/ configs).",
        )
    base = resolve_base_model(base_model, base_dir=base_dir)
    where = f"`base_model` {base_model!r}"
    if base.is_dir():
        transformer, variant = _folder_transformer(base, where)
        return TransformerSource(
            variant, transformer, FluxShape.from_config(transformer.config), base, base, {}, config_dir
        )
    transformer, variant, bundled = _file_transformer(base, where, config_dir)
    return TransformerSource(
        variant, transformer, FluxShape.from_config(transformer.config), base, None, bundled, config_dir
    )


def resolve_flux_model(
    base_model: str,
    *,
    clip_l: Path | None = None,
    t5xxl: Path | None = None,
    ae: Path | None = None,
    clip_l_tokenizer: Path | None = None,
    t5xxl_tokenizer: Path | None = None,
    model_config_dir: Path | None = None,
    t5xxl_max_token_length: int | None = None,
    base_dir: Path | None = None,
    transformer_source: TransformerSource | None = None,
) -> FluxSources:
    """Find and check every part of a FLUX.1 model without reading its weights.

    Relative paths are resolved against ``base_dir`` (default: the current folder).
    ``t5xxl_max_token_length`` defaults to 512 for dev and 256 for schnell (kohya's defaults).
    ``transformer_source`` skips finding the transformer again (a resident model's).
    Raises ModelLoadError whose message names the config key and value at fault and whose hint
    says the fix: a missing or unreadable file, a file that is not what its key says (an SD
    checkpoint as ``base_model``, an SDXL VAE as ``ae``), configs that do not fit, a missing tokenizer.
    """
    found = transformer_source or resolve_flux_transformer(
        base_model, model_config_dir=model_config_dir, base_dir=base_dir
    )
    clip_l, t5xxl, ae = (_absolute(p, base_dir) for p in (clip_l, t5xxl, ae))
    variant, transformer, base, folder, bundled, config_dir = (
        found.variant,
        found.transformer,
        found.base,
        found.folder,
        found.bundled,
        found.config_dir,
    )
    shape = found.shape

    def configs_of(part: str) -> tuple[Path, str]:
        """The folder holding ``part``'s config, and how to name it in messages."""
        if config_dir is not None and (config_dir / part).is_dir():
            return config_dir / part, f"`model_config_dir` {str(config_dir)!r}"
        return SHIPPED_CONFIGS / variant / part, "the shipped FLUX.1 configs"

    vae = _component(
        "ae", ae, folder, "vae", bundled, base, configs_of("vae"), _check_vae, "FLUX.1's autoencoder (ae.safetensors)"
    )
    clip = _component(
        "clip_l", clip_l, folder, "text_encoder", bundled, base, configs_of("text_encoder"), _check_clip, "CLIP-L"
    )
    t5 = _component(
        "t5xxl", t5xxl, folder, "text_encoder_2", bundled, base, configs_of("text_encoder_2"), _check_t5, "T5-XXL"
    )
    local = [folder] if folder is not None else []
    if config_dir is not None:
        local.append(config_dir)
    clip_tokenizer = find_tokenizer(
        CLIP_L, explicit=_absolute(clip_l_tokenizer, base_dir), local_dirs=[d / CLIP_L.subfolder for d in local]
    )
    t5_tokenizer = find_tokenizer(
        T5XXL, explicit=_absolute(t5xxl_tokenizer, base_dir), local_dirs=[d / T5XXL.subfolder for d in local]
    )
    scheduler_path = next(
        (
            d / "scheduler" / "scheduler_config.json"
            for d in local
            if (d / "scheduler" / "scheduler_config.json").is_file()
        ),
        SHIPPED_CONFIGS / variant / "scheduler" / "scheduler_config.json",
    )
    return FluxSources(
        variant=variant,
        transformer=transformer,
        vae=vae,
        clip_l=clip,
        t5xxl=t5,
        clip_tokenizer=clip_tokenizer,
        t5_tokenizer=t5_tokenizer,
        scheduler_config=_read_json(scheduler_path, str(scheduler_path)),
        t5_max_length=t5xxl_max_token_length or T5_MAX_LENGTH[variant],
        shape=shape,
    )


def _read_json(path: Path, where: str) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"{where} cannot be read ({exc})", "Check the file.") from exc
    if not isinstance(data, dict):
        raise ModelLoadError(f"{where} is not a JSON object", "Check the file.")
    return data


def _shapes(path: Path, where: str) -> dict[str, tuple[int, ...]]:
    """Key -> shape from a safetensors header, without reading tensors."""
    if path.suffix.lower() not in SAFETENSORS_SUFFIXES:
        raise ModelLoadError(
            f"{where} is a {path.suffix or 'suffix-less'} file; FLUX.1 weights are read from .safetensors only",
            "Use the model's .safetensors release (pickle-based .ckpt/.pt files can run code when loaded).",
        )
    try:
        with safe_open(str(path), framework="pt") as handle:
            return {key: tuple(handle.get_slice(key).get_shape()) for key in handle.keys()}  # noqa: SIM118
    except (SafetensorError, OSError, ValueError) as exc:
        raise ModelLoadError(
            f"{where} is not a readable .safetensors file ({exc})", "Check that the download is complete."
        ) from exc


def _folder_transformer(folder: Path, where: str) -> tuple[Component, str]:
    config_path = folder / "transformer" / "config.json"
    if not config_path.is_file():
        raise ModelLoadError(f"{where} is a folder without transformer/config.json", _FLUX_HINT)
    config = _read_json(config_path, f"{where}: transformer/config.json")
    if config.get("_class_name") != "FluxTransformer2DModel":
        raise ModelLoadError(
            f"{where} holds a {config.get('_class_name')!r} transformer, not FLUX.1's FluxTransformer2DModel",
            _FLUX_HINT,
        )
    variant = "dev" if config.get("guidance_embeds") else "schnell"
    return Component(where, folder / "transformer", config, is_folder=True), variant


def _what_it_looks_like(keys: list[str]) -> str:
    if any("lora" in k.lower() for k in keys):
        return "it looks like a LoRA, not a base model"
    if any(k.startswith("model.diffusion_model.input_blocks.") for k in keys):
        return "it looks like a Stable Diffusion (UNet) checkpoint"
    if any(k.startswith("transformer_blocks.") for k in keys):
        return "it looks like a diffusers transformer file; point `base_model` at the whole diffusers folder instead"
    if any(k.startswith("double_blocks.") or ".double_blocks." in k for k in keys):
        return "it has FLUX-like blocks but not FLUX.1's (FLUX.2 and others are not supported)"
    return f"none of its {len(keys)} tensors is a FLUX.1 transformer weight (first keys: {', '.join(sorted(keys)[:3])})"


def _file_transformer(path: Path, where: str, config_dir: Path | None) -> tuple[Component, str, dict[str, str]]:
    shapes = _shapes(path, where)
    prefix = COMFY_CHECKPOINT_PREFIX if COMFY_CHECKPOINT_PREFIX + _PROBE_KEY in shapes else ""
    if prefix + _PROBE_KEY not in shapes:
        raise ModelLoadError(f"{where} is not a FLUX.1 transformer: {_what_it_looks_like(list(shapes))}", _FLUX_HINT)
    own = {k.removeprefix(prefix): v for k, v in shapes.items() if k.startswith(prefix)}
    variant = "dev" if "guidance_in.in_layer.weight" in own else "schnell"
    config_where = "the shipped FLUX.1 configs"
    config_path = SHIPPED_CONFIGS / variant / "transformer" / "config.json"
    if config_dir is not None and (config_dir / "transformer" / "config.json").is_file():
        config_path = config_dir / "transformer" / "config.json"
        config_where = f"`model_config_dir` {str(config_dir)!r}"
    config = _read_json(config_path, config_where)
    # Depth comes from the file, so compact FLUX models (fewer double/single blocks) load with the shipped configs.
    config["num_layers"] = _count_blocks(own, "double_blocks.")
    config["num_single_layers"] = _count_blocks(own, "single_blocks.")
    config["guidance_embeds"] = variant == "dev"
    found = {
        "width (img_in rows)": (config["num_attention_heads"] * config["attention_head_dim"], own["img_in.weight"][0]),
        "latent channels x 4 (img_in columns)": (config["in_channels"], own["img_in.weight"][1]),
        "attention head size": (config["attention_head_dim"], own[_PROBE_KEY][0]),
        "T5 width (txt_in columns)": (config["joint_attention_dim"], own["txt_in.weight"][1]),
        "CLIP width (vector_in columns)": (config["pooled_projection_dim"], own["vector_in.in_layer.weight"][1]),
    }
    _check_fits(found, where, config_where, "transformer")
    bundled = {
        part: next(p for p in prefixes if any(k.startswith(p) for k in shapes))
        for part, prefixes in BUNDLED_PREFIXES.items()
        if any(k.startswith(p) for p in prefixes for k in shapes)
    }
    return Component(where, path, config, prefix=prefix), variant, bundled


def _count_blocks(shapes: Mapping[str, object], prefix: str) -> int:
    indices = {int(m[1]) for k in shapes if (m := re.match(re.escape(prefix) + r"(\d+)\.", k))}
    if indices != set(range(len(indices))):
        raise ModelLoadError(
            f"the checkpoint's `{prefix}*` blocks are not numbered 0..{len(indices) - 1} ({sorted(indices)[:8]}...)",
            "The file is incomplete or damaged; use another copy.",
        )
    return len(indices)


def _check_fits(found: Mapping[str, tuple[object, object]], where: str, config_where: str, part: str) -> None:
    wrong = [f"{name} {got} in the file vs {want} in the config" for name, (want, got) in found.items() if want != got]
    if wrong:
        raise ModelLoadError(
            f"{where} does not match {config_where}: " + "; ".join(wrong),
            f"Set `model_config_dir` to a FLUX.1 diffusers-layout folder whose {part}/ config describes this file.",
        )


def _component(
    key: str,
    explicit: Path | None,
    folder: Path | None,
    subfolder: str,
    bundled: Mapping[str, str],
    base: Path,
    configs: tuple[Path, str],
    check: Any,
    what: str,
) -> Component:
    """Resolve one non-transformer part: the config key's file, else the bundle's, else the folder's."""
    config_folder, config_where = configs
    if explicit is not None:
        where = f"`{key}` {str(explicit)!r}"
        if not explicit.is_file():
            raise ModelLoadError(f"{where} does not exist", f"Set `{key}` to the {what} .safetensors file.")
        prefix = ""
        path = explicit
    elif key in bundled:
        where, path, prefix = f"`base_model` {str(base)!r} ({key} part)", base, bundled[key]
    elif folder is not None:
        part = folder / subfolder
        config_path = part / "config.json"
        if not config_path.is_file():
            raise ModelLoadError(
                f"`base_model` {str(folder)!r} has no {subfolder}/config.json",
                f"Set `{key}` to the {what} file, or use a complete FLUX.1 diffusers folder.",
            )
        return Component(
            f"`base_model` {str(folder)!r} ({subfolder}/)", part, _read_json(config_path, str(config_path)), True
        )
    else:
        raise ModelLoadError(
            f"`{key}` is not set, and a FLUX.1 single file holds only the transformer",
            f"Set `{key}` to the {what} .safetensors file (kohya's and ComfyUI's name for it).",
        )
    config = _read_json(config_folder / "config.json", config_where)
    shapes = {k.removeprefix(prefix): v for k, v in _shapes(path, where).items() if k.startswith(prefix)}
    check(shapes, config, where, config_where)
    return Component(where, path, config, prefix=prefix)


def _check_vae(shapes: Mapping[str, tuple[int, ...]], config: Mapping[str, Any], where: str, config_where: str) -> None:
    ldm, diffusers = "encoder.down.0.block.0.conv1.weight", "encoder.down_blocks.0.resnets.0.conv1.weight"
    if ldm not in shapes and diffusers not in shapes:
        raise ModelLoadError(
            f"{where} is not an autoencoder ({_what_it_looks_like(list(shapes))})",
            "Set `ae` to FLUX.1's ae.safetensors.",
        )
    latent = shapes.get("decoder.conv_in.weight", (0, 0))[1]
    if latent != 16:
        raise ModelLoadError(
            f"{where} decodes {latent}-channel latents; FLUX.1's autoencoder has 16 (is it an SD/SDXL VAE?)",
            "Set `ae` to FLUX.1's ae.safetensors.",
        )
    found = {"first width": (config["block_out_channels"][0], shapes["encoder.conv_in.weight"][0])}
    _check_fits(found, where, config_where, "vae")


def _check_clip(
    shapes: Mapping[str, tuple[int, ...]], config: Mapping[str, Any], where: str, config_where: str
) -> None:
    token = "text_model.embeddings.token_embedding.weight"
    if token not in shapes:
        raise ModelLoadError(
            f"{where} is not a CLIP text encoder in transformers' layout (no `{token}`)",
            "Set `clip_l` to clip_l.safetensors (as ComfyUI's flux_text_encoders ship it).",
        )
    layers = len({k.split(".")[3] for k in shapes if k.startswith("text_model.encoder.layers.")})
    found = {
        "width": (config["hidden_size"], shapes[token][1]),
        "layers": (config["num_hidden_layers"], layers),
        "vocabulary": (config["vocab_size"], shapes[token][0]),
    }
    _check_fits(found, where, config_where, "text_encoder")


def _check_t5(shapes: Mapping[str, tuple[int, ...]], config: Mapping[str, Any], where: str, config_where: str) -> None:
    probe = "encoder.block.0.layer.0.SelfAttention.q.weight"
    if probe not in shapes or ("shared.weight" not in shapes and "encoder.embed_tokens.weight" not in shapes):
        raise ModelLoadError(
            f"{where} is not a T5 encoder in transformers' layout (no `{probe}` / `shared.weight`)",
            "Set `t5xxl` to t5xxl_fp16.safetensors (or an fp8 copy) as ComfyUI's flux_text_encoders ship it.",
        )
    layers = len({k.split(".")[2] for k in shapes if k.startswith("encoder.block.")})
    found = {"width": (config["d_model"], shapes[probe][1]), "layers": (config["num_layers"], layers)}
    _check_fits(found, where, config_where, "text_encoder_2")


# ---------------------------------------------------------------- reading weights


def _read_tensors(component: Component, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The component's tensors (prefix stripped) in ``dtype``; float8 weights are dequantized.

    ComfyUI's "scaled fp8" files store ``weight = fp8 * scale_weight``; the scales (and the
    ``scaled_fp8`` marker, ``scale_input``) are consumed here.
    """
    try:
        with safe_open(str(component.path), framework="pt") as handle:
            raw = {
                k.removeprefix(component.prefix): handle.get_tensor(k)
                for k in handle.keys()  # noqa: SIM118
                if k.startswith(component.prefix)
            }
    except (SafetensorError, OSError, ValueError) as exc:
        raise ModelLoadError(
            f"{component.where} could not be read ({exc})", "Check that the download is complete."
        ) from exc
    out: dict[str, torch.Tensor] = {}
    for key, tensor in raw.items():
        if key == "scaled_fp8" or key.endswith((".scale_weight", ".scale_input")):
            continue
        value = tensor.to(torch.float32) if tensor.dtype in (torch.float8_e4m3fn, torch.float8_e5m2) else tensor
        scale = raw.get(key.removesuffix(".weight") + ".scale_weight") if key.endswith(".weight") else None
        if scale is not None:
            value = value.to(torch.float32) * scale.to(torch.float32)
        out[key] = value.to(dtype) if value.is_floating_point() else value
    return out


def _finish(module: torch.nn.Module, where: str) -> torch.nn.Module:
    missing = [n for n, t in (*module.named_parameters(), *module.named_buffers()) if t.is_meta]
    if missing:
        raise ModelLoadError(
            f"{where} lacks {len(missing)} weights its config expects (e.g. `{missing[0]}`)",
            "The file is incomplete or has a different architecture; set `model_config_dir` to configs that match it.",
        )
    module.eval()
    module.requires_grad_(False)
    return module


def _load_into(module: torch.nn.Module, state: Mapping[str, torch.Tensor], where: str) -> None:
    try:
        module.load_state_dict(dict(state), strict=True, assign=True)
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()[0:2]
        raise ModelLoadError(
            f"{where} does not fit its config ({' '.join(first)})",
            "Set `model_config_dir` to a FLUX.1 diffusers folder whose configs describe this file.",
        ) from exc


def convert_bfl_transformer(state: dict[str, torch.Tensor], shape: FluxShape) -> dict[str, torch.Tensor]:
    """BFL-layout transformer tensors (no prefix) to diffusers' names.

    At FLUX.1's own width this is diffusers' converter (it assumes a 3072-wide model with MLP
    ratio 4); other widths (tiny and research models) use lorad's key map, which a test checks
    against diffusers' converter at the real shapes.
    """
    if shape.inner_dim == 3072 and shape.mlp_ratio == 4.0:
        return convert_flux_transformer_checkpoint_to_diffusers(dict(state))
    return bfl_to_diffusers(state, shape)


def load_transformer(sources: FluxSources | TransformerSource, dtype: torch.dtype) -> FluxTransformer2DModel:
    """The FLUX.1 transformer in ``dtype`` (eval mode, frozen)."""
    part = sources.transformer
    if part.is_folder:
        try:
            model = FluxTransformer2DModel.from_pretrained(str(part.path), torch_dtype=dtype, local_files_only=True)
        except (OSError, ValueError, RuntimeError) as exc:
            raise ModelLoadError(f"{part.where} could not be loaded ({exc})", _FLUX_HINT) from exc
        return _finish(model, part.where)
    state = _read_tensors(part, dtype)
    try:
        converted = convert_bfl_transformer(state, sources.shape)
    except (KeyError, ValueError, RuntimeError) as exc:
        key = exc.args[0] if exc.args else exc
        raise ModelLoadError(
            f"{part.where} is not a complete FLUX.1 transformer (missing or unexpected `{key}`)", _FLUX_HINT
        ) from exc
    with torch.device("meta"):
        model = FluxTransformer2DModel.from_config(part.config)
    _load_into(model, converted, part.where)
    return _finish(model, part.where)


def load_vae(sources: FluxSources, dtype: torch.dtype) -> AutoencoderKL:
    """FLUX.1's 16-channel autoencoder (with its ``shift_factor``/``scaling_factor``), frozen."""
    part = sources.vae
    if part.is_folder:
        try:
            model = AutoencoderKL.from_pretrained(str(part.path), torch_dtype=dtype, local_files_only=True)
        except (OSError, ValueError, RuntimeError) as exc:
            raise ModelLoadError(f"{part.where} could not be loaded ({exc})", "Check the folder.") from exc
        return _finish(model, part.where)
    state = _read_tensors(part, dtype)
    if "encoder.down.0.block.0.conv1.weight" in state:
        state = convert_ldm_vae_checkpoint(state, part.config)
    with torch.device("meta"):
        model = AutoencoderKL.from_config(part.config)
    _load_into(model, state, part.where)
    return _finish(model, part.where)


def load_clip_l(sources: FluxSources, dtype: torch.dtype) -> CLIPTextModel:
    """CLIP-L's text model (its pooled output conditions the transformer), frozen."""
    part = sources.clip_l
    if part.is_folder:
        return _finish(_from_pretrained(CLIPTextModel, part, dtype), part.where)
    state = {k: v for k, v in _read_tensors(part, dtype).items() if not k.endswith("position_ids")}
    with torch.device("meta"):
        model = CLIPTextModel(CLIPTextConfig(**part.config))
    # transformers >= 5.6 names CLIP's weights without the `text_model.` level that files carry.
    if not any(k.startswith("text_model.") for k in model.state_dict()):
        state = {k.removeprefix("text_model."): v for k, v in state.items()}
    _load_into(model, state, part.where)
    for name, buffer in list(model.named_buffers()):
        if buffer.is_meta and name.endswith("position_ids"):  # not stored in files: 0..n-1, as CLIP builds it
            owner = model.get_submodule(name.rpartition(".")[0])
            owner.register_buffer("position_ids", torch.arange(buffer.shape[-1]).expand(buffer.shape), persistent=False)
    return _finish(model.to(dtype), part.where)


def load_t5xxl(sources: FluxSources, dtype: torch.dtype) -> T5EncoderModel:
    """The T5 encoder, frozen. Its embedding is tied: ``shared.weight`` is ``encoder.embed_tokens.weight``."""
    part = sources.t5xxl
    if part.is_folder:
        return _finish(_from_pretrained(T5EncoderModel, part, dtype), part.where)
    state = _read_tensors(part, dtype)
    embedding = state.get("shared.weight", state.get("encoder.embed_tokens.weight"))
    state["shared.weight"] = state["encoder.embed_tokens.weight"] = embedding  # type: ignore[assignment]
    with torch.device("meta"):
        model = T5EncoderModel(T5Config(**part.config))
    _load_into(model, state, part.where)
    return _finish(model.to(dtype), part.where)


def _from_pretrained(cls: Any, part: Component, dtype: torch.dtype) -> Any:
    try:
        return cls.from_pretrained(str(part.path), dtype=dtype, local_files_only=True)
    except (OSError, ValueError, RuntimeError) as exc:
        raise ModelLoadError(f"{part.where} could not be loaded ({exc})", "Check the folder.") from exc


def open_tokenizers(sources: FluxSources) -> tuple[PreTrainedTokenizerBase, PreTrainedTokenizerBase]:
    """(CLIP-L tokenizer, T5 tokenizer), the latter capped at ``sources.t5_max_length`` tokens."""
    clip = open_clip_tokenizer(sources.clip_tokenizer, int(sources.clip_l.config["vocab_size"]))
    t5 = open_t5_tokenizer(sources.t5_tokenizer, int(sources.t5xxl.config["vocab_size"]), sources.t5_max_length)
    return clip, t5


def component_fingerprint(part: Component) -> str:
    """Hex SHA-256 of where a component's weights come from: each weight file's path, size and
    modification time, plus the key prefix and config.

    It names a component for caches of its outputs (latents, text-encoder outputs) without reading
    its weights, so a re-run whose caches are warm loads neither the VAE nor the text encoders.
    Replacing or editing a weight file changes it.
    """
    files = sorted(part.path.glob("*.safetensors")) if part.is_folder else [part.path]
    facts = [part.prefix, json.dumps(part.config, sort_keys=True, default=str)]
    for path in files:
        stat = path.stat()
        facts.append(f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}")
    return hashlib.sha256("\n".join(facts).encode()).hexdigest()
