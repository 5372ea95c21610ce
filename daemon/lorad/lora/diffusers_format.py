"""diffusers' LoRA format: ``pytorch_lora_weights.safetensors`` that ``pipe.load_lora_weights`` reads.

Written through diffusers' own serializer (so the key prefixes and the adapter metadata that
carries lora_alpha are exactly what its loader expects), into a temporary folder first and then
renamed into place, so the file appears complete or not at all.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from peft import LoraConfig

from lorad.atomic import TEMP_SUFFIX, temp_prefix, user_file_mode
from lorad.lora.kohya_format import portable_path

WEIGHT_NAME = "pytorch_lora_weights.safetensors"


def save_diffusers_lora(
    output_dir: Path,
    parts: Mapping[str, Mapping[str, torch.Tensor]],
    configs: Mapping[str, LoraConfig],
    dtype: torch.dtype,
    *,
    pipeline: str = "sd",
) -> Path:
    """Write ``output_dir/pytorch_lora_weights.safetensors`` for the model parts in ``parts``:
    "unet" and "text_encoder" (``pipeline`` "sd": SD 1.x/2.x), plus "text_encoder_2" ("sdxl"), or
    "transformer" and "text_encoder" (CLIP-L) for ``pipeline`` "flux". A part with no tensors is left out."""
    # The loader mixins, not the pipelines: importing a pipeline drags in image processors.
    from diffusers.loaders import FluxLoraLoaderMixin, StableDiffusionLoraLoaderMixin, StableDiffusionXLLoraLoaderMixin

    mixins = {
        "sd": StableDiffusionLoraLoaderMixin,
        "sdxl": StableDiffusionXLLoraLoaderMixin,
        "flux": FluxLoraLoaderMixin,
    }
    mixin = mixins[pipeline]

    def cast(part: str) -> dict[str, torch.Tensor]:
        return {portable_path(part, k): v.detach().to("cpu", dtype).contiguous() for k, v in parts[part].items()}

    layers: dict[str, Any] = {}
    for part in parts:
        if parts[part]:
            layers[f"{part}_lora_layers"] = cast(part)
            # Without it diffusers would assume alpha == rank and scale the LoRA wrongly.
            layers[f"{part}_lora_adapter_metadata"] = configs[part].to_dict() if part in configs else None

    output_dir.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=temp_prefix("diffusers-lora"), suffix=TEMP_SUFFIX, dir=output_dir))
    try:
        mixin.save_lora_weights(tmp, weight_name=WEIGHT_NAME, **layers)
        dest = output_dir / WEIGHT_NAME
        os.chmod(tmp / WEIGHT_NAME, user_file_mode())  # safetensors writes 0600 whatever the umask
        os.replace(tmp / WEIGHT_NAME, dest)
        return dest
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
