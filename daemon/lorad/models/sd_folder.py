"""diffusers-layout model folders: recognise SD 1.x/2.x, choose weight files, load the modules.

Recognition (:func:`inspect_folder`) reads only JSON and file names, so a wrong or pickle-only
folder is refused before any weights are read.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from transformers import CLIPTextModel

from lorad.errors import ModelLoadError
from lorad.models.single_file import (
    PICKLE_HINT,
    PICKLE_SUFFIXES,
    SD_LAYOUT_HINT,
    SDXL_FAMILY_HINT,
    check_unet_in_channels,
)

COMPONENTS = ("unet", "vae", "text_encoder")
# Weight file stems: (safetensors stem, pickle stem) per component, as diffusers/transformers name them.
STEMS = {
    "unet": ("diffusion_pytorch_model", "diffusion_pytorch_model"),
    "vae": ("diffusion_pytorch_model", "diffusion_pytorch_model"),
    "text_encoder": ("model", "pytorch_model"),
    "text_encoder_2": ("model", "pytorch_model"),
}


@dataclass(frozen=True)
class FolderInfo:
    """What a diffusers folder holds: its SD family and how to load each component's weights."""

    version: str  # "sd1" | "sd2"
    load_options: dict[str, dict[str, Any]]  # component -> from_pretrained options
    scheduler_config: dict[str, Any] | None  # None when the folder has no scheduler/


def read_json_object(path: Path, where: str) -> dict[str, Any]:
    """A JSON file that must hold an object; ModelLoadError (naming ``where``) otherwise."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"{where}: {path} cannot be read as JSON ({exc})", "Check the file.") from exc
    if not isinstance(data, dict):
        raise ModelLoadError(f"{where}: {path} is not a JSON object", "Check the file.")
    return data


def inspect_folder(folder: Path, where: str, *, allow_pickle: bool) -> FolderInfo:
    """Recognise an SD 1.x/2.x diffusers folder; refuse SDXL, other families and unusable weights.

    SD 2.x is told from SD 1.x by the UNet config (``use_linear_projection`` or a 1024-wide
    cross-attention), which holds for every official 2.x model and the tiny test models.
    """
    index_path = folder / "model_index.json"
    index = read_json_object(index_path, where) if index_path.is_file() else {}
    if not index and not (folder / "unet").is_dir():
        files = sorted(p.name for p in folder.iterdir() if p.suffix.lower() in (".safetensors", *PICKLE_SUFFIXES))
        hint = f"Point `base_model` at a checkpoint file in it, e.g. {folder / files[0]}." if files else SD_LAYOUT_HINT
        raise ModelLoadError(f"{where}: {folder} is a folder but not a diffusers model (no model_index.json)", hint)
    class_name = str(index.get("_class_name", ""))
    unet_path = folder / "unet" / "config.json"
    unet_config = read_json_object(unet_path, where) if unet_path.is_file() else {}
    if (
        "XL" in class_name
        or "text_encoder_2" in index
        or (folder / "text_encoder_2").is_dir()
        or unet_config.get("addition_embed_type") == "text_time"
    ):
        raise ModelLoadError(f"{where} is an SDXL model, which the SD 1.x/2.x loader does not load", SDXL_FAMILY_HINT)
    if class_name and (not class_name.startswith("StableDiffusion") or class_name.startswith("StableDiffusion3")):
        raise ModelLoadError(f"{where} is a {class_name} model, not Stable Diffusion 1.x/2.x", SD_LAYOUT_HINT)
    missing = [f"{c}/config.json" for c in COMPONENTS if not (folder / c / "config.json").is_file()]
    if missing:
        raise ModelLoadError(
            f"{where}: the diffusers folder {folder} lacks {', '.join(missing)}",
            "A diffusers model needs unet/, vae/, text_encoder/, tokenizer/ and scheduler/; "
            "re-download or re-export it completely.",
        )
    check_unet_in_channels(unet_config.get("in_channels", 4), where)
    sd2 = bool(unet_config.get("use_linear_projection")) or unet_config.get("cross_attention_dim") == 1024
    options = {c: weights_options(folder / c, *STEMS[c], allow_pickle=allow_pickle, where=where) for c in COMPONENTS}
    scheduler_path = folder / "scheduler" / "scheduler_config.json"
    scheduler = read_json_object(scheduler_path, where) if scheduler_path.is_file() else None
    return FolderInfo("sd2" if sd2 else "sd1", options, scheduler)


def weights_options(
    component_dir: Path, stem: str, pickle_stem: str, *, allow_pickle: bool, where: str
) -> dict[str, Any]:
    """from_pretrained options that select safetensors (plain, else a variant such as fp16), else pickle.

    Pickle weights (``.bin``) are used only with ``allow_pickle``; diffusers and transformers read
    them with ``torch.load(weights_only=True)``.
    """
    plain = (f"{stem}.safetensors", f"{stem}.safetensors.index.json")
    if any((component_dir / name).is_file() for name in plain):
        return {"use_safetensors": True}
    variants = sorted(p.name.split(".")[1] for p in component_dir.glob(f"{stem}.*.safetensors"))
    if variants:
        return {"use_safetensors": True, "variant": variants[0]}
    pickles = sorted(component_dir.glob(f"{pickle_stem}*.bin"))
    if pickles and allow_pickle:
        name = pickles[0].name
        variant = name.split(".")[1] if name.count(".") == 2 else None
        return {"use_safetensors": False, **({"variant": variant} if variant else {})}
    if pickles:
        raise ModelLoadError(
            f"{where}: {component_dir.name}/ has only pickle-based weights ({pickles[0].name})", PICKLE_HINT
        )
    raise ModelLoadError(
        f"{where}: {component_dir.name}/ has no weights ({stem}.safetensors)",
        "The folder is incomplete; re-download or re-export the model.",
    )


def load_folder_models(
    folder: Path, info: FolderInfo, dtype: torch.dtype, where: str
) -> tuple[UNet2DConditionModel, AutoencoderKL, CLIPTextModel]:
    """Load the UNet, VAE and text encoder of an inspected folder, offline, in ``dtype``."""

    def load(component: str, cls: Any) -> Any:
        return load_component(folder, component, cls, info.load_options[component], dtype, where)

    return load("unet", UNet2DConditionModel), load("vae", AutoencoderKL), load("text_encoder", CLIPTextModel)


def load_component(
    folder: Path, component: str, cls: Any, options: dict[str, Any], dtype: torch.dtype, where: str
) -> Any:
    """``cls.from_pretrained(folder, subfolder=component)`` offline in ``dtype``, with ``options`` from
    :func:`weights_options`. A transformers model missing weights is refused (transformers would
    only warn and leave them random); any failure is a ModelLoadError naming ``where``.
    """
    kwargs = {"subfolder": component, "local_files_only": True, "dtype": dtype, **options}
    try:
        if cls.__module__.startswith("transformers."):
            model, report = cls.from_pretrained(folder, output_loading_info=True, **kwargs)
            if report.get("missing_keys"):
                raise ValueError(f"weights missing for {sorted(report['missing_keys'])[:3]}")
            return model
        return cls.from_pretrained(folder, **kwargs)
    except (OSError, ValueError, RuntimeError, KeyError) as exc:
        raise ModelLoadError(
            f"{where}: cannot load {component}/ ({exc})",
            "The folder may be incomplete or from an unsupported model; re-download or re-export it.",
        ) from exc
