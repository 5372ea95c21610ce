"""SDXL's conditioning, as SDXL was trained: text from both encoders, plus size and crop micro-conditioning.

Text: each encoder's penultimate hidden states, concatenated along the feature axis (CLIP-L first),
and the pooled, projected output of the second encoder (what diffusers'
``StableDiffusionXLPipeline.encode_prompt`` computes without ``clip_skip``). A dropped caption is
the empty string, which both encoders then see.

Micro-conditioning: six "time ids" per image, (original height, original width, crop top, crop
left, target height, target width), embedded by the UNet beside the pooled text. The original size
is the image's real (upright) size; the target is its bucket; the crop is the offset, in pixels of
the scaled image, of the window that :func:`lorad.data.dataset.load_image_for_bucket` keeps, as in
the SDXL paper's Algorithm 1 and diffusers' SDXL training scripts.

kohya's scripts compute the crop differently (``BucketManager.get_crop_ltrb``): as the margins of
the image scaled to fit *inside* the bucket, on the other axis. Both agree when the image has its
bucket's aspect ratio (crop 0, 0); for a cropped bucket kohya reports a top margin where the image
lost pixels left and right (kohya-ss/sd-scripts#1443). lorad reports the crop that happened.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from lorad.data.dataset import bucket_crop
from lorad.diffusion.clip_skip import clip_token_ids

#: Names of the tensors in one caption's encoding (and in its text-encoder cache entry).
HIDDEN = "hidden"  # (tokens, width_1 + width_2): the UNet's cross-attention context
POOLED = "pooled"  # (projection_dim,): the second encoder's pooled, projected output

TimeIds = tuple[int, int, int, int, int, int]


def encode_prompts(
    captions: Sequence[str],
    *,
    tokenizer,
    tokenizer_2,
    text_encoder: nn.Module,
    text_encoder_2: nn.Module,
    device: torch.device,
) -> dict[str, torch.Tensor]:
    """``{HIDDEN: (batch, 77, w1 + w2), POOLED: (batch, projection_dim)}`` for ``captions``.

    Runs with autograd as the caller has it (train the encoders under grad; wrap in
    ``torch.no_grad()`` to cache). Each tokenizer pads and truncates to its ``model_max_length``.
    """
    hidden = []
    pooled = None
    for tok, encoder in ((tokenizer, text_encoder), (tokenizer_2, text_encoder_2)):
        out = encoder(clip_token_ids(tok, captions).to(device), output_hidden_states=True)
        hidden.append(out.hidden_states[-2])
        pooled = getattr(out, "text_embeds", None)
    if pooled is None:
        raise TypeError("the second SDXL text encoder must be a CLIPTextModelWithProjection (it gave no text_embeds)")
    return {HIDDEN: torch.cat(hidden, dim=-1), POOLED: pooled}


def time_ids(
    width: int,
    height: int,
    bucket: tuple[int, int],
    *,
    flipped: bool = False,
    crop: tuple[int, int] | None = None,
) -> TimeIds:
    """SDXL's six micro-conditioning values for an upright ``width`` x ``height`` image trained at
    ``bucket`` = (width, height): (original h, original w, crop top, crop left, bucket h, bucket w).

    The crop is the window the sample was cut at, in its own (mirrored, when ``flipped``) frame:
    ``crop`` = (top, left) when it was cut at a random offset (``random_crop``), else the centre crop of
    :func:`lorad.data.dataset.load_image_for_bucket`, whose left edge a mirror moves to the other side."""
    if crop is None:
        fit = bucket_crop(width, height, bucket)
        left = fit.resized[0] - bucket[0] - fit.left if flipped else fit.left
        crop = (fit.top, left)
    return (height, width, crop[0], crop[1], bucket[1], bucket[0])


def time_ids_tensor(ids: Sequence[TimeIds], *, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """A batch of time ids as the UNet's ``added_cond_kwargs["time_ids"]``: shape (batch, 6)."""
    return torch.tensor([list(row) for row in ids], device=device, dtype=dtype)
