"""Encoded samples → batches of tensors: padded, or packed without cross-sample attention.

Padding never relies on the pad token's id: attention masks and labels are built from each sample's
length, so a tokenizer whose pad token is EOS still trains on its real EOS tokens (the classic
"the model never learns to stop" bug comes from masking labels by ``== pad_token_id``).

Packing puts several samples in one row. Each sample restarts its position ids at 0 and the row
gets a block-diagonal causal mask, so a token never attends to (or is predicted from) another
sample: the logits of a packed sample equal its logits alone.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from lorad.textdata.encoding import IGNORE, Encoded
from lorad.training.transfer import to_device


@dataclass(frozen=True)
class Batch:
    """Model inputs for one micro-batch. ``attention_mask`` is 2-D (padded) or 4-D (packed)."""

    input_ids: torch.Tensor
    labels: torch.Tensor
    attention_mask: torch.Tensor
    position_ids: torch.Tensor
    tokens: int  # real (non-pad) tokens, for throughput

    def to(self, device: torch.device) -> Batch:
        """The batch on ``device`` (through pinned memory and non-blocking copies to a GPU)."""
        return Batch(
            to_device(self.input_ids, device),
            to_device(self.labels, device),
            to_device(self.attention_mask, device),
            to_device(self.position_ids, device),
            self.tokens,
        )


def epoch_order(count: int, *, seed: int, epoch: int) -> list[int]:
    """The sample order of one epoch: a shuffle that depends only on (seed, epoch), so a resumed run
    sees exactly the batches the interrupted one would have."""
    order = list(range(count))
    random.Random(seed * 100_003 + epoch).shuffle(order)
    return order


def pack_rows(samples: Sequence[Encoded], order: Sequence[int], max_seq_len: int) -> list[list[int]]:
    """Group sample indexes, in ``order``, into rows of at most ``max_seq_len`` tokens (first fit in
    order: a new row starts when the next sample does not fit)."""
    rows: list[list[int]] = []
    used = max_seq_len + 1
    for index in order:
        length = len(samples[index].input_ids)
        if used + length > max_seq_len:
            rows.append([])
            used = 0
        rows[-1].append(index)
        used += length
    return rows


def plan_batches(
    samples: Sequence[Encoded], *, batch_size: int, seed: int, epoch: int, packing: bool, max_seq_len: int
) -> list[list[list[int]]]:
    """One epoch's micro-batches: each is a list of rows, each row a list of sample indexes."""
    order = epoch_order(len(samples), seed=seed, epoch=epoch)
    rows = pack_rows(samples, order, max_seq_len) if packing else [[i] for i in order]
    return [rows[i : i + batch_size] for i in range(0, len(rows), batch_size)]


def collate(
    samples: Sequence[Encoded],
    rows: Sequence[Sequence[int]],
    *,
    pad_id: int,
    packed: bool,
    mask_dtype: torch.dtype = torch.float32,
) -> Batch:
    """Tensors for ``rows`` (each a list of sample indexes), right-padded to the longest row."""
    lengths = [sum(len(samples[i].input_ids) for i in row) for row in rows]
    width = max(lengths)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE, dtype=torch.long)
    position_ids = torch.zeros((len(rows), width), dtype=torch.long)
    # Packed: which sample each position belongs to (-1 = padding); builds the block mask below.
    segment = torch.full((len(rows), width), -1, dtype=torch.long)
    for r, row in enumerate(rows):
        at = 0
        for s, index in enumerate(row):
            sample = samples[index]
            n = len(sample.input_ids)
            input_ids[r, at : at + n] = torch.tensor(sample.input_ids)
            labels[r, at : at + n] = torch.tensor(sample.labels)
            position_ids[r, at : at + n] = torch.arange(n)
            segment[r, at : at + n] = s
            at += n
    if packed:
        same = (segment[:, :, None] == segment[:, None, :]) & (segment[:, :, None] >= 0)
        allowed = same & torch.ones(width, width, dtype=torch.bool).tril()
        # Padding rows attend to themselves only, so softmax never sees an all-masked row (NaN).
        allowed |= torch.eye(width, dtype=torch.bool)
        # Additive form (0 = attend, most negative = blocked): what transformers takes as a 4-D mask.
        attention_mask = torch.zeros(allowed.shape, dtype=mask_dtype).masked_fill(
            ~allowed, torch.finfo(mask_dtype).min
        )[:, None]
    else:
        attention_mask = (segment >= 0).long()
    return Batch(input_ids, labels, attention_mask, position_ids, tokens=sum(lengths))
