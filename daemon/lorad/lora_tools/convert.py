"""``lorad lora convert``: the same LoRA in another layout (kohya, diffusers, PEFT, ComfyUI).

Tensors are carried over unchanged (same dtype, same values), so converting A -> B -> A gives back A's
tensors bit for bit. ComfyUI's layout names modules by the single-file (LDM) paths, whose block numbers
depend on the architecture: SD 1.5's / 2.1's by default, or the one of ``base`` (a single-file checkpoint
or a diffusers folder) for other shapes.
"""

from __future__ import annotations

import json
from pathlib import Path

from lorad.errors import LoraFileError
from lorad.lora_tools.layouts import LAYOUTS, read_lora, write_lora
from lorad.lora_tools.sd_key_map import SdArchitecture, SdKeyMap, layout_from_checkpoint_keys
from lorad.lora_tools.tensor_files import TensorReader


def architecture_of(base: Path) -> SdArchitecture:
    """The SD 1.x/2.x architecture of a single-file checkpoint or a diffusers model folder."""
    base = Path(base)
    if base.is_dir():
        try:
            unet = json.loads((base / "unet" / "config.json").read_text())
            text = json.loads((base / "text_encoder" / "config.json").read_text())
        except (OSError, ValueError) as err:
            raise LoraFileError(f"`--base {base}` is not a diffusers SD folder ({err})") from None
        return SdArchitecture(
            int(unet["layers_per_block"]),
            tuple("CrossAttn" in t for t in unet["down_block_types"]),
            tuple("CrossAttn" in t for t in unet["up_block_types"]),
            int(text["num_hidden_layers"]),
        )
    with TensorReader(base) as reader:
        arch = layout_from_checkpoint_keys(reader.names())
    if arch is None:
        raise LoraFileError(f"`--base {base}` is not an SD 1.x/2.x single-file checkpoint")
    return arch


def convert_lora(path: Path, dest: Path, *, to: str, base: Path | None = None) -> Path:
    """Write ``path``'s LoRA to ``dest`` in layout ``to``; returns what was written."""
    if to not in LAYOUTS:
        raise LoraFileError(f"`--to {to}` is not a layout", "Choose one of: " + ", ".join(LAYOUTS))
    lora = read_lora(Path(path))
    key_map = SdKeyMap(lora.family.name, architecture_of(base)) if base and lora.family.name in ("sd1", "sd2") else None
    if key_map is not None and lora.layout == "comfyui":
        lora = read_lora(Path(path), key_map)  # ComfyUI names depend on the architecture
    return write_lora(lora, Path(dest), to, key_map)
