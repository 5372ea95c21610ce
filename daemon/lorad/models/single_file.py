"""Single-file checkpoints in the original LDM / AUTOMATIC1111 layout: read, recognise, convert.

Reading never runs code from the file: ``.safetensors`` is plain data, and pickle-based files
(``.ckpt``/``.pt``/``.pth``/``.bin``) are read only when the caller allows it, and then with
``torch.load(weights_only=True)``, which refuses anything but tensors and plain containers.
Conversion to diffusers modules is diffusers' own single-file code, fed configs from a local
folder so nothing is downloaded.
"""

from __future__ import annotations

import contextlib
import logging
import pickle
import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from diffusers.loaders.single_file_utils import create_diffusers_clip_model_from_ldm
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file
from transformers import CLIPTextModel

from lorad.config.pickle_policy import PICKLE_SUFFIXES
from lorad.errors import ModelLoadError
from lorad.models.ldm_layout import CLIP_PREFIX, OPEN_CLIP_PREFIX, UNET_PREFIX, VAE_PREFIX

PICKLE_HINT = (
    "Convert it to .safetensors (which cannot carry code), or set `allow_pickle: true` if you trust "
    "the file; lorad then reads it with torch.load(weights_only=True), which loads tensors only."
)
SDXL_FAMILY_HINT = (
    "Train it as an SDXL model: lorad tells the family from `base_model` by itself, so remove "
    "`model_family` or set it to sdxl."
)
SD_LAYOUT_HINT = (
    "`base_model` must be a Stable Diffusion 1.x/2.x checkpoint in the single-file (AUTOMATIC1111) "
    "layout, a diffusers model folder, or a Hugging Face model id already in the local cache."
)


@dataclass(frozen=True)
class CheckpointInfo:
    """What the key names and shapes of a single-file SD checkpoint say about its architecture."""

    version: str  # "sd1" (CLIP-L text encoder) or "sd2" (OpenCLIP text encoder)
    context_dim: int  # width of the UNet's cross-attention context
    text_width: int  # hidden size of the text encoder
    model_channels: int  # width of the UNet's first level


def is_pickle_path(path: Path) -> bool:
    """True for the suffixes of pickle-based checkpoints (which need ``allow_pickle``)."""
    return path.suffix.lower() in PICKLE_SUFFIXES


def read_safetensors_shapes(path: Path, where: str) -> dict[str, tuple[int, ...]]:
    """Key -> shape from a safetensors header, without reading the tensors.

    ``where`` names the config key and value for error messages.
    """
    try:
        with safe_open(str(path), framework="pt") as handle:
            return {key: tuple(handle.get_slice(key).get_shape()) for key in handle.keys()}  # noqa: SIM118
    except (SafetensorError, OSError, ValueError) as exc:
        raise ModelLoadError(
            f"{where} is not a readable .safetensors file ({exc})",
            "Check that the download is complete; " + SD_LAYOUT_HINT,
        ) from exc


def read_safetensors(path: Path, where: str) -> dict[str, torch.Tensor]:
    """All tensors of a safetensors file, on the CPU."""
    try:
        return load_file(str(path), device="cpu")
    except (SafetensorError, OSError, ValueError) as exc:
        raise ModelLoadError(f"{where} could not be read ({exc})", "Check that the download is complete.") from exc


def read_pickle_checkpoint(path: Path, where: str) -> dict[str, torch.Tensor]:
    """Tensors of a pickle-based checkpoint, read with ``torch.load(weights_only=True)``.

    Lightning-style files nest the weights under ``state_dict``; that nesting is removed. Entries
    that are not tensors (step counters and the like) are dropped.
    """
    try:
        data: Any = torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
        if lines and lines[0].lower().startswith("weights only load failed"):
            found = re.search(r"Unsupported global: GLOBAL (\S+)", str(exc))
            raise ModelLoadError(
                f"{where} holds Python objects besides tensors, which weights_only loading refuses"
                + (f" (it contains {found[1]})" if found else ""),
                "Use the model's .safetensors release, or convert the file to .safetensors with a tool you trust.",
            ) from exc
        raise ModelLoadError(
            f"{where} is not a readable PyTorch checkpoint ({lines[0] if lines else 'unpickling failed'})",
            "Check that the download is complete; " + SD_LAYOUT_HINT,
        ) from exc
    except Exception as exc:
        # A file that is not a checkpoint makes the unpickler fail in arbitrary ways (IndexError,
        # KeyError, UnicodeDecodeError, RuntimeError from the zip reader, ...); all mean "unreadable".
        first_line = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise ModelLoadError(
            f"{where} is not a readable PyTorch checkpoint ({first_line})",
            "Check that the download is complete; " + SD_LAYOUT_HINT,
        ) from exc
    while isinstance(data, dict) and isinstance(data.get("state_dict"), dict):
        data = data["state_dict"]
    if not isinstance(data, dict):
        raise ModelLoadError(f"{where} holds a {type(data).__name__}, not a dict of tensors", SD_LAYOUT_HINT)
    return {key: value for key, value in data.items() if isinstance(key, str) and isinstance(value, torch.Tensor)}


_V = TypeVar("_V")


def normalize_keys(state_dict: dict[str, _V]) -> dict[str, _V]:
    """Bring early SD 1.x files (CLIP keys without ``text_model.``) to the layout diffusers reads."""
    old = "cond_stage_model.transformer."
    if any(k.startswith(CLIP_PREFIX) for k in state_dict) or not any(k.startswith(old) for k in state_dict):
        return state_dict
    return {(CLIP_PREFIX + k.removeprefix(old)) if k.startswith(old) else k: v for k, v in state_dict.items()}


def probe_checkpoint(shapes: Mapping[str, Sequence[int]], where: str) -> CheckpointInfo:
    """Recognise an SD 1.x/2.x single-file checkpoint from its key names and shapes.

    Raises ModelLoadError for SDXL, LoRA files, diffusers-layout component files, other model
    families, inpainting and other variant UNets, and checkpoints missing a component.
    """
    keys = list(shapes)
    if any(k.startswith("conditioner.embedders.") for k in keys):
        raise ModelLoadError(
            f"{where} is an SDXL checkpoint, which the SD 1.x/2.x loader does not load", SDXL_FAMILY_HINT
        )
    if not any(k.startswith(UNET_PREFIX) for k in keys):
        raise ModelLoadError(
            f"{where} is not a Stable Diffusion checkpoint: {_what_it_looks_like(keys)}", SD_LAYOUT_HINT
        )
    conv_in = shapes.get(UNET_PREFIX + "input_blocks.0.0.weight")
    if conv_in is None or len(conv_in) != 4:
        raise ModelLoadError(
            f"{where} has a `model.diffusion_model` that is not an SD 1.x/2.x UNet "
            "(SD3, Flux and others are not supported)",
            SD_LAYOUT_HINT,
        )
    check_unet_in_channels(conv_in[1], where)
    if any(k.startswith(UNET_PREFIX + "label_emb.") for k in keys):
        raise ModelLoadError(
            f"{where} has a class-conditioned UNet (unCLIP, upscaler or SDXL-like), not SD 1.x/2.x text-to-image",
            SD_LAYOUT_HINT,
        )
    if any(k.startswith(CLIP_PREFIX) for k in keys):
        version, token_key = "sd1", CLIP_PREFIX + "embeddings.token_embedding.weight"
    elif any(k.startswith(OPEN_CLIP_PREFIX) for k in keys):
        version, token_key = "sd2", OPEN_CLIP_PREFIX + "token_embedding.weight"
    else:
        raise ModelLoadError(
            f"{where} has no text encoder weights (`cond_stage_model.*`); it may be a UNet-only export",
            "lorad needs a full checkpoint (UNet, VAE and text encoder) or a diffusers model folder.",
        )
    if token_key not in shapes:
        raise ModelLoadError(f"{where} has an incomplete text encoder (no `{token_key}`)", SD_LAYOUT_HINT)
    if not any(k.startswith(VAE_PREFIX) for k in keys):
        raise ModelLoadError(
            f"{where} has no VAE weights (`first_stage_model.*`)",
            "lorad needs a full checkpoint (UNet, VAE and text encoder) or a diffusers model folder.",
        )
    context_keys = sorted(k for k in keys if k.startswith(UNET_PREFIX) and k.endswith("attn2.to_k.weight"))
    if not context_keys:
        raise ModelLoadError(f"{where} has a UNet without cross-attention", SD_LAYOUT_HINT)
    context_dim, text_width = shapes[context_keys[0]][1], shapes[token_key][1]
    if context_dim != text_width:
        raise ModelLoadError(
            f"{where} is inconsistent: the UNet attends to {context_dim}-wide text features but the text "
            f"encoder is {text_width} wide",
            "The file is probably a broken merge; use another copy of the model.",
        )
    return CheckpointInfo(version, int(context_dim), int(text_width), int(conv_in[0]))


def check_unet_in_channels(in_channels: int, where: str) -> None:
    """Refuse a UNet that does not take plain 4-channel latents (inpainting, depth, instruct-pix2pix)."""
    if in_channels != 4:
        raise ModelLoadError(
            f"{where} has a UNet with {in_channels} input channels (an inpainting or other special model), "
            "not a text-to-image base model",
            "Train on the plain text-to-image version of the model.",
        )


def _what_it_looks_like(keys: Sequence[str]) -> str:
    """A short guess at what a non-SD tensor file is, for the error message."""
    if any("lora" in k.lower() for k in keys):
        return "it looks like a LoRA, not a base model"
    if any(k.startswith(("down_blocks.", "up_blocks.", "mid_block.", "encoder.down_blocks.")) for k in keys):
        return "it looks like a single diffusers component; point `base_model` at the whole model folder instead"
    sample = ", ".join(sorted(keys)[:3]) or "no tensors at all"
    return f"none of its {len(keys)} tensors has a `model.diffusion_model.` key (first keys: {sample})"


def check_config_fits(
    info: CheckpointInfo, unet: Mapping[str, Any], text: Mapping[str, Any], where: str, config_where: str
) -> None:
    """Compare the checkpoint's widths with the diffusers UNet and text encoder configs.

    Catches the common mistake (shipped SD 1.5/2.1 configs for a resized model, or the wrong
    ``model_config_dir``) before diffusers fails with a shape error deep inside.
    """
    found = {
        "UNet cross-attention width": (unet.get("cross_attention_dim"), info.context_dim),
        "UNet first-level width": ((unet.get("block_out_channels") or [None])[0], info.model_channels),
        "text encoder width": (text.get("hidden_size"), info.text_width),
    }
    wrong = [
        f"{name} {got} in the checkpoint vs {want} in the config" for name, (want, got) in found.items() if want != got
    ]
    if wrong:
        raise ModelLoadError(
            f"{where} does not match {config_where}: " + "; ".join(wrong),
            "Set `model_config_dir` to a diffusers-layout folder (model_index.json, unet/, vae/, "
            "text_encoder/, scheduler/ configs) that describes this checkpoint's architecture.",
        )


def convert_components(
    state_dict: dict[str, torch.Tensor], config_dir: Path, dtype: torch.dtype, where: str
) -> tuple[UNet2DConditionModel, AutoencoderKL, CLIPTextModel]:
    """Build the UNet, VAE and text encoder from an LDM-layout state dict with diffusers' converters.

    ``config_dir`` is a local diffusers-layout folder; nothing is fetched from the network.
    """
    unet, vae, (text_encoder,) = convert_single_file(
        state_dict, config_dir, dtype, where, text_encoders=(("text_encoder", CLIPTextModel),)
    )
    return unet, vae, text_encoder


def convert_single_file(
    state_dict: dict[str, torch.Tensor],
    config_dir: Path,
    dtype: torch.dtype,
    where: str,
    *,
    text_encoders: Sequence[tuple[str, type]],
) -> tuple[UNet2DConditionModel, AutoencoderKL, list[torch.nn.Module]]:
    """The UNet, VAE and ``text_encoders`` ((subfolder, transformers class) pairs, in order) of an
    LDM/SGM-layout state dict, converted by diffusers' single-file code with the configs in the
    local diffusers-layout folder ``config_dir``; nothing is fetched from the network.

    diffusers picks each text encoder's weights from the checkpoint by its key layout (SD 1.x
    CLIP-L, SD 2.x OpenCLIP, or SDXL's ``conditioner.embedders.0``/``.1`` told apart by width).
    Raises ModelLoadError, naming ``where`` and ``model_config_dir`` as the fix, when conversion
    fails or leaves weights the config expects unset.
    """
    config = str(config_dir)
    try:
        with _quiet_empty_fp32_warning():
            unet = UNet2DConditionModel.from_single_file(
                state_dict, config=config, subfolder="unet", local_files_only=True, torch_dtype=dtype
            )
            vae = AutoencoderKL.from_single_file(
                state_dict, config=config, subfolder="vae", local_files_only=True, torch_dtype=dtype
            )
            encoders = [
                create_diffusers_clip_model_from_ldm(
                    cls,
                    checkpoint=state_dict,
                    subfolder=subfolder,
                    config=config,
                    torch_dtype=dtype,
                    local_files_only=True,
                )
                for subfolder, cls in text_encoders
            ]
    except (ValueError, RuntimeError, KeyError, OSError, TypeError) as exc:
        raise ModelLoadError(
            f"{where} could not be converted with the configs in {config_dir}: {exc}",
            "Set `model_config_dir` to a diffusers-layout folder whose configs match this checkpoint.",
        ) from exc
    names = ["UNet", "VAE", *(subfolder.replace("_", " ") for subfolder, _ in text_encoders)]
    for name, module in zip(names, (unet, vae, *encoders), strict=True):
        missing = [n for n, t in (*module.named_parameters(), *module.named_buffers()) if t.is_meta]
        if missing:
            # diffusers loads into empty (meta) modules and leaves absent weights unset.
            raise ModelLoadError(
                f"{where} lacks {len(missing)} {name} weights that the config expects (e.g. `{missing[0]}`)",
                "The checkpoint is incomplete or has a different architecture; set `model_config_dir` "
                "to configs that match it.",
            )
    return unet, vae, encoders


class _EmptyFp32ListFilter(logging.Filter):
    """Drops diffusers' "modules that should be kept in float32: []" warning.

    diffusers (0.42) warns on every ``ModelMixin.to(dtype)``, even when that list is empty, and
    ``from_single_file`` casts that way itself; the warning is a false alarm for SD models.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        return "should be kept in float32: []" not in record.getMessage()


@contextlib.contextmanager
def _quiet_empty_fp32_warning() -> Iterator[None]:
    logger = logging.getLogger("diffusers.models.modeling_utils")
    flt = _EmptyFp32ListFilter()
    logger.addFilter(flt)
    try:
        yield
    finally:
        logger.removeFilter(flt)
