"""diffusers' LoRA format: ``pytorch_lora_weights.safetensors`` that ``pipe.load_lora_weights`` reads.

Written through diffusers' own serializer (so the key prefixes and the adapter metadata that
carries lora_alpha are exactly what its loader expects), into a temporary folder first and then
renamed into place, so the file appears complete or not at all.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path

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
) -> Path:
    """Write ``output_dir/pytorch_lora_weights.safetensors`` for the "unet"/"text_encoder" parts."""
    # The loader mixin, not the pipeline: importing the pipeline drags in image processors.
    from diffusers.loaders import StableDiffusionLoraLoaderMixin

    def cast(part: str) -> dict[str, torch.Tensor]:
        return {portable_path(part, k): v.detach().to("cpu", dtype).contiguous() for k, v in parts[part].items()}

    def metadata(part: str) -> dict | None:
        # Without it diffusers would assume alpha == rank and scale the LoRA wrongly.
        return configs[part].to_dict() if part in configs else None

    return write_lora_weights(
        output_dir,
        lambda tmp: StableDiffusionLoraLoaderMixin.save_lora_weights(
            tmp,
            unet_lora_layers=cast("unet") if parts.get("unet") else None,
            text_encoder_lora_layers=cast("text_encoder") if parts.get("text_encoder") else None,
            unet_lora_adapter_metadata=metadata("unet") if parts.get("unet") else None,
            text_encoder_lora_adapter_metadata=metadata("text_encoder") if parts.get("text_encoder") else None,
            weight_name=WEIGHT_NAME,
        ),
    )


def write_lora_weights(output_dir: Path, save: Callable[[Path], object]) -> Path:
    """Run a diffusers ``save_lora_weights`` call (``save(folder)``, writing ``WEIGHT_NAME`` there) in a
    temporary folder inside ``output_dir``, then rename the file into place: it appears complete or
    not at all. Returns its path."""
    output_dir.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=temp_prefix("diffusers-lora"), suffix=TEMP_SUFFIX, dir=output_dir))
    try:
        save(tmp)
        dest = output_dir / WEIGHT_NAME
        os.chmod(tmp / WEIGHT_NAME, user_file_mode())  # safetensors writes 0600 whatever the umask
        os.replace(tmp / WEIGHT_NAME, dest)
        return dest
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
