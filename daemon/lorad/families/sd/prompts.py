"""Caption → text-encoder hidden states, cached when the text encoder is frozen."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn


class PromptEncoder:
    """Encodes captions with the tokenizer and text encoder of a model.

    When the text encoder is not trained its output for a caption never changes, so results are
    kept (on the training device) and a caption is encoded only once per run. The cache is
    bounded because shuffled captions can produce many distinct strings.
    """

    def __init__(
        self, tokenizer, text_encoder: nn.Module, device: torch.device, *, trainable: bool, max_cached: int = 4096
    ) -> None:
        self.tokenizer = tokenizer
        self.text_encoder = text_encoder
        self.device = device
        self.trainable = trainable
        self.max_cached = max_cached
        self.encodes = 0
        self._cache: dict[str, torch.Tensor] = {}

    def _encode(self, captions: Sequence[str]) -> torch.Tensor:
        ids = self.tokenizer(
            list(captions),
            padding="max_length",
            truncation=True,
            max_length=self.tokenizer.model_max_length,
            return_tensors="pt",
        ).input_ids
        self.encodes += len(captions)
        return self.text_encoder(ids.to(self.device))[0]

    def __call__(self, captions: Sequence[str]) -> torch.Tensor:
        """Hidden states (batch, tokens, dim) for ``captions``; with grad only when trainable."""
        if self.trainable:
            return self._encode(captions)
        missing = list(dict.fromkeys(c for c in captions if c not in self._cache))
        if missing:
            if len(self._cache) + len(missing) > self.max_cached:
                self._cache.clear()
            with torch.no_grad():
                encoded = self._encode(missing)
            self._cache.update(zip(missing, encoded, strict=True))
        return torch.stack([self._cache[c] for c in captions])
