"""Telling an SDXL-family base model from its files, cheaply: JSON files, folder names and the key
names in a ``.safetensors`` header. No tensor is read and nothing heavy is imported (no torch, no
diffusers), so the CLI, the TUI and config checks can call it.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Sequence
from pathlib import Path
from typing import Any

# safetensors: an 8-byte little-endian header length, then that many bytes of JSON.
_MAX_HEADER = 100 * 1024 * 1024


def is_sdxl_keys(keys: Sequence[str]) -> bool:
    """True for the keys of an SGM-layout (SDXL-family) single file, base or refiner."""
    return any(k.startswith("conditioner.embedders.") for k in keys)


def safetensors_keys(path: Path) -> list[str] | None:
    """The tensor names in a ``.safetensors`` file's header, or None when it is not readable as one."""
    try:
        with open(path, "rb") as fh:
            (length,) = struct.unpack("<Q", fh.read(8))
            if length > _MAX_HEADER:
                return None
            header = json.loads(fh.read(length))
    except (OSError, ValueError, struct.error):
        return None
    return [k for k in header if k != "__metadata__"] if isinstance(header, dict) else None


def _json_object(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def is_sdxl_folder(folder: Path) -> bool:
    """True for a diffusers folder of the SDXL family (base or refiner), from its JSON and folder names."""
    index = _json_object(folder / "model_index.json")
    unet = _json_object(folder / "unet" / "config.json")
    return (
        "XL" in str(index.get("_class_name", ""))
        or "text_encoder_2" in index
        or (folder / "text_encoder_2").is_dir()
        or unet.get("addition_embed_type") == "text_time"
    )


def _cached_file(repo_id: str, filename: str) -> Path | None:
    """A file of a hub repo from the local Hugging Face cache, never downloading."""
    try:
        from huggingface_hub import try_to_load_from_cache

        found = try_to_load_from_cache(repo_id, filename)
    except Exception:  # an id huggingface_hub rejects is simply not a model we know
        return None
    return Path(found) if isinstance(found, (str, os.PathLike)) else None


def is_sdxl_model(base_model: str) -> bool:
    """Whether ``base_model`` (a resolved path, or a hub id in the local cache) is an SDXL-family model.

    Pickle checkpoints cannot be told without unpickling them and count as not SDXL (the SD loader
    then names what it found); ``model_family: sdxl`` says it outright.
    """
    path = Path(base_model)
    if path.is_dir():
        return is_sdxl_folder(path)
    if path.is_file():
        return path.suffix.lower() == ".safetensors" and is_sdxl_keys(safetensors_keys(path) or [])
    if path.is_absolute():
        return False
    index = _cached_file(base_model, "model_index.json")
    return index is not None and is_sdxl_folder(index.parent)
