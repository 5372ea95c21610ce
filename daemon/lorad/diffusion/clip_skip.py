"""CLIP text-encoder hidden states with ``clip_skip`` (the layer A1111 and kohya condition on)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn


def clip_token_ids(tokenizer: Any, captions: Sequence[str]) -> torch.Tensor:
    """``captions`` as CLIP token ids, padded and truncated to the tokenizer's ``model_max_length`` (77):
    (batch, 77), on the CPU."""
    return tokenizer(
        list(captions),
        padding="max_length",
        truncation=True,
        max_length=tokenizer.model_max_length,
        return_tensors="pt",
    ).input_ids


def final_layer_norm(text_encoder: nn.Module) -> nn.Module:
    """The CLIP text model's final LayerNorm (transformers >= 5.6 dropped the ``text_model.`` level)."""
    return getattr(text_encoder, "text_model", text_encoder).final_layer_norm


def clip_hidden_states(text_encoder: nn.Module, input_ids: torch.Tensor, clip_skip: int | None) -> torch.Tensor:
    """The hidden states a UNet is conditioned on: the last layer's output (``clip_skip`` unset or 1), or the
    ``clip_skip``-th hidden state from the end with the final layer norm applied, as A1111 and kohya do
    (2 = the penultimate layer). SDXL's first text encoder uses the same rule."""
    if not clip_skip or clip_skip == 1:
        return text_encoder(input_ids)[0]
    out = text_encoder(input_ids, output_hidden_states=True)
    return final_layer_norm(text_encoder)(out.hidden_states[-clip_skip])
