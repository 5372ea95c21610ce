"""An SD 1.x/2.x model's modules without its weights: built on PyTorch's ``meta`` device from the
configs the loader would use, so target layer names are checked in milliseconds (``config --check``)."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from lorad.models.sd_folder import read_json_object
from lorad.models.sd_loader import inspect_sd_model


def sd_modules_on_meta(
    base_model: str, *, allow_pickle: bool = False, model_config_dir: Path | None = None
) -> tuple[nn.Module, nn.Module]:
    """(UNet, text encoder) of ``base_model`` with every parameter on the ``meta`` device (no memory).

    Raises ModelLoadError as loading would (missing file, not a model, SDXL, ...); reads no weights.
    """
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    _, configs = inspect_sd_model(base_model, allow_pickle=allow_pickle, model_config_dir=model_config_dir)
    where = f"`base_model` {base_model!r}"
    unet_config = read_json_object(configs / "unet" / "config.json", where)
    text_config = CLIPTextConfig.from_dict(read_json_object(configs / "text_encoder" / "config.json", where))
    with torch.device("meta"):
        return UNet2DConditionModel.from_config(unet_config), CLIPTextModel(text_config)
