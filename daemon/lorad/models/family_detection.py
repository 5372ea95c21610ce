"""Which image model family a ``base_model`` belongs to, told cheaply before anything is loaded.

A diffusers folder is told by its JSON files and folder names; a ``.safetensors`` file by the key
names in its header (SDXL-family files have ``conditioner.embedders.*``). Only a pickle-based
file must be opened, memory-mapped where the format allows, so its tensors are not read.
The family's own loader then checks the model properly and explains what is wrong with it.
"""

from __future__ import annotations

from pathlib import Path

import torch

from lorad.errors import ModelLoadError
from lorad.models.sd_loader import resolve_base_model
from lorad.models.sdxl_loader import is_sdxl_folder, is_sdxl_keys
from lorad.models.single_file import is_pickle_path, read_pickle_checkpoint, read_safetensors_shapes

#: Families this module tells apart: SD 1.x/2.x ("sd") and SDXL ("sdxl").
IMAGE_FAMILIES = ("sd", "sdxl")


def detect_image_family(base_model: str, *, base_dir: Path | None = None, allow_pickle: bool = False) -> str:
    """ "sdxl" for an SDXL-family model (base, fine-tune, or the refiner, which the SDXL loader
    refuses with its reason), else "sd".

    ``base_model`` resolves as for the loaders (path against ``base_dir``, or a cached Hub id);
    a missing model raises the loaders' ModelLoadError. A pickle file without ``allow_pickle``
    counts as "sd": the SD loader then refuses it with the pickle hint, as it would anyway.
    """
    source = resolve_base_model(base_model, base_dir=base_dir)
    where = f"`base_model` {base_model!r}"
    if source.is_dir():
        return "sdxl" if is_sdxl_folder(source) else "sd"
    if is_pickle_path(source):
        if not allow_pickle:
            return "sd"
        return "sdxl" if is_sdxl_keys(_pickle_keys(source, where)) else "sd"
    return "sdxl" if is_sdxl_keys(list(read_safetensors_shapes(source, where))) else "sd"


def _pickle_keys(path: Path, where: str) -> list[str]:
    """The tensor names of a pickle checkpoint; memory-mapped (zip format) so no tensor data is read."""
    try:
        data = torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
    except Exception:
        # Legacy (non-zip) files cannot be mapped; the full reader also explains unreadable files.
        return list(read_pickle_checkpoint(path, where))
    while isinstance(data, dict) and isinstance(data.get("state_dict"), dict):
        data = data["state_dict"]
    if not isinstance(data, dict):
        raise ModelLoadError(f"{where} holds a {type(data).__name__}, not a dict of tensors", "Check the file.")
    return [key for key in data if isinstance(key, str)]
