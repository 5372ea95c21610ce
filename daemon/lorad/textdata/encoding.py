"""Samples → token ids and labels, with the loss mask computed from token boundaries.

The rendered text is tokenized once with character offsets; a token is trained on exactly when its
characters overlap a response span (see :mod:`lorad.textdata.templates`). Everything else (system,
user, template markers, the generation prompt) gets the label -100. No string is searched for in
token ids, so a reply whose text also appears in the prompt is still masked correctly.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from lorad.textdata.shapes import Sample
from lorad.textdata.templates import render_chat

IGNORE = -100  # the label cross-entropy skips


@dataclass(frozen=True)
class Encoded:
    """One sample as ids and labels (same length; labels are -100 where no loss is taken)."""

    where: str
    input_ids: tuple[int, ...]
    labels: tuple[int, ...]
    original_length: int  # tokens before the cut to max_seq_len

    @property
    def truncated(self) -> bool:
        return self.original_length > len(self.input_ids)

    @property
    def trained_tokens(self) -> int:
        return sum(1 for label in self.labels if label != IGNORE)


def _labels_in_spans(
    offsets: Sequence[tuple[int, int]], ids: Sequence[int], spans: Sequence[tuple[int, int]]
) -> list[int]:
    """A token is trained on when its characters overlap a response span. Overlap, not "starts
    inside": SentencePiece-style tokenizers fold the space before a word into it ("▁Hello" starts at
    the space), so after a prompt ending in a space ("ASSISTANT: ") the reply's first token starts one
    character before the span and would otherwise never be learned."""
    labels = []
    span_index = 0
    for token_id, (start, end) in zip(ids, offsets, strict=True):
        while span_index < len(spans) and start >= spans[span_index][1]:
            span_index += 1
        inside = span_index < len(spans) and end > start and start < spans[span_index][1] and end > spans[span_index][0]
        labels.append(token_id if inside else IGNORE)
    return labels


def encode_sample(sample: Sample, tokenizer: object, *, max_seq_len: int) -> Encoded:
    """Tokenize one sample and mask its labels; cut to ``max_seq_len`` tokens.

    Chat and alpaca samples go through the tokenizer's chat template (which brings its own BOS when
    it wants one). Plain text gets the tokenizer's usual specials, then EOS if it is not already last;
    every token of it is trained on. The first token is never a label: nothing predicts it.
    """
    eos_id = tokenizer.eos_token_id
    if sample.messages:
        chat = render_chat(tokenizer, sample.messages, tokenizer.eos_token)
        encoding = tokenizer(chat.text, add_special_tokens=False, return_offsets_mapping=True)
        ids = list(encoding["input_ids"])
        labels = _labels_in_spans(encoding["offset_mapping"], ids, chat.response_spans)
    else:
        ids = list(tokenizer(sample.text, add_special_tokens=True)["input_ids"])
        if not ids or ids[-1] != eos_id:
            ids.append(eos_id)
        labels = list(ids)
    labels[0] = IGNORE
    return Encoded(
        where=sample.where,
        input_ids=tuple(ids[:max_seq_len]),
        labels=tuple(labels[:max_seq_len]),
        original_length=len(ids),
    )
