"""kohya's SDXL LoRA names, the ones AUTOMATIC1111, Forge and ComfyUI load.

kohya trains SDXL on a UNet whose module names are SGM's (``input_blocks``/``middle_block``/
``output_blocks``), so its SDXL files name UNet modules that way:
``lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q``. The text encoders keep their
transformers names under ``lora_te1_`` (CLIP-L) and ``lora_te2_`` (OpenCLIP bigG, loaded as
``CLIPTextModelWithProjection``): ``lora_te2_text_model_encoder_layers_0_self_attn_q_proj``.
A1111 maps these onto its modules by prefix substitution (see tests/test_a1111_names_sdxl.py).
Each module carries ``.lora_down.weight``, ``.lora_up.weight`` and its ``.alpha``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from lorad.lora.kohya_format import kohya_module_name, portable_path
from lorad.models.ldm_layout import ldm_unet_path

#: kohya's prefix per model part.
PREFIXES = {"unet": "lora_unet_", "text_encoder": "lora_te1_", "text_encoder_2": "lora_te2_"}
#: What kohya writes as ``ss_base_model_version`` for SDXL; A1111 lists a LoRA under SDXL by its ``sdxl_`` prefix.
SS_BASE_MODEL_VERSION = "sdxl_base_v1-0"
#: The SAI model-spec architecture kohya writes for an SDXL LoRA.
MODELSPEC_ARCHITECTURE = "stable-diffusion-xl-v1-base/lora"


def sdxl_kohya_name(part: str, module_path: str, unet_config: Mapping[str, Any]) -> str:
    """The kohya module name of a diffusers/transformers module path of an SDXL model part.

    ``part`` is "unet", "text_encoder" or "text_encoder_2"; ``unet_config`` is the UNet's config
    (its block layout fixes the SGM block numbers). Raises ValueError for a UNet module with no
    SGM equivalent and KeyError for an unknown part.
    """
    prefix = PREFIXES[part]
    if part == "unet":
        return kohya_module_name(prefix, ldm_unet_path(module_path, unet_config))
    # transformers >= 5.6 dropped CLIPTextModel's ``text_model.`` level; files keep the classic names.
    path = module_path if module_path.startswith("text_projection") else portable_path("text_encoder", module_path)
    return kohya_module_name(prefix, path)


def sdxl_kohya_names(
    module_paths: Mapping[str, list[str]], unet_config: Mapping[str, Any]
) -> dict[str, tuple[str, str]]:
    """kohya name -> (part, module path) for the given module paths per part (to read files back)."""
    return {
        sdxl_kohya_name(part, path, unet_config): (part, path) for part, paths in module_paths.items() for path in paths
    }
