"""Caption → text-encoder hidden states, cached when the text encoder is frozen."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from lorad.diffusion.clip_skip import clip_hidden_states
from lorad.training.transfer import to_device


class PromptEncoder:
    """Encodes captions with the tokenizer and text encoder of a model.

    When the text encoder is not trained its output for a caption never changes, so results are
    kept (on the training device) and a caption is encoded only once per run. The cache is
    bounded because shuffled captions can produce many distinct strings.
    """

    def __init__(
        self,
        tokenizer,
        text_encoder: nn.Module,
        device: torch.device,
        *,
        trainable: bool,
        max_cached: int = 4096,
        clip_skip: int | None = None,
    ) -> None:
        self.tokenizer = tokenizer
        self.text_encoder = text_encoder
        self.device = device
        self.trainable = trainable
        self.max_cached = max_cached
        self.clip_skip = clip_skip
        self.encodes = 0
        self._cache: dict[str, torch.Tensor] = {}

    def encode(self, captions: Sequence[str]) -> torch.Tensor:
        """Hidden states of ``captions`` from the text encoder as it is now, never cached (the caller
        chooses grad and mode); longer captions are cut at the tokenizer's limit."""
        ids = self.tokenizer(
            list(captions),
            padding="max_length",
            truncation=True,
            max_length=self.tokenizer.model_max_length,
            return_tensors="pt",
        ).input_ids
        self.encodes += len(captions)
        return clip_hidden_states(self.text_encoder, to_device(ids, self.device), self.clip_skip)

    def __call__(self, captions: Sequence[str]) -> torch.Tensor:
        """Hidden states (batch, tokens, dim) for ``captions``; with grad only when trainable."""
        if self.trainable:
            return self.encode(captions)
        missing = list(dict.fromkeys(c for c in captions if c not in self._cache))
        if missing:
            if len(self._cache) + len(missing) > self.max_cached:
                self._cache.clear()
            with torch.no_grad():
                encoded = self.encode(missing)
            self._cache.update(zip(missing, encoded, strict=True))
        return torch.stack([self._cache[c] for c in captions])
