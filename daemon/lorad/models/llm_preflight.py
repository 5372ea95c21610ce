"""A causal LM's modules without its weights: built on PyTorch's ``meta`` device from its
``config.json`` (a local folder, or the local Hugging Face cache), for ``config --check``."""

from __future__ import annotations

import torch
from torch import nn

from lorad.errors import ModelLoadError


def llm_on_meta(base_model: str) -> nn.Module:
    """The model ``base_model`` names, with every parameter on the ``meta`` device (no memory, no
    weights read). Raises ModelLoadError when it is not a causal LM that can be found offline."""
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        config = AutoConfig.from_pretrained(base_model, local_files_only=True)
        with torch.device("meta"):
            return AutoModelForCausalLM.from_config(config)
    except (OSError, ValueError, KeyError) as err:
        first_line = str(err).split("\n")[0]
        raise ModelLoadError(
            f"`base_model`: {base_model} is not a causal language model lorad can find offline ({first_line})",
            "point base_model at a folder with config.json and *.safetensors, or a hub id that is already downloaded",
        ) from None
