"""Rectified flow (flow matching): the training objective of FLUX.1 and the flow models after it.

A training example at noise level σ ∈ (0, 1) is the straight-line mix ``x_σ = (1 - σ)·x + σ·ε``
of clean latents ``x`` and Gaussian noise ``ε``; the model predicts the velocity ``ε - x`` (the
direction from data to noise), and the loss is the mean squared error against it. σ is drawn by
one of kohya's ``timestep_sampling`` methods (sd-scripts ``library/flux_train_utils.py``, documented
in ``docs/flux_train_network.md``):

- ``uniform``: σ ~ U(0, 1);
- ``sigmoid``: σ = sigmoid(``sigmoid_scale`` · n), n ~ N(0, 1) (as x-flux and ai-toolkit sample);
- ``shift``: the sigmoid sample, then σ ← s·σ / (1 + (s - 1)·σ) with s = ``discrete_flow_shift``
  (s > 1 moves training toward noisier steps);
- ``flux_shift``: the sigmoid sample shifted by FLUX.1-dev's resolution-dependent schedule,
  μ = linear in the packed sequence length from 0.5 at 256 tokens to 1.15 at 4096, and
  σ ← e^μ / (e^μ + (1/σ - 1)) (kohya's recommended method for FLUX.1, and lorad's default).

Also here, since every flow transformer needs them: packing latents into 2×2 patches (a sequence
of ``4·C``-wide tokens), the position ids FLUX's rotary embedding reads for image and text tokens,
and the VAE latent shift/scale. Nothing here knows a model family; all randomness comes from a
caller's ``torch.Generator``, so the same generator state gives the same batch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

TIMESTEP_SAMPLINGS = ("flux_shift", "shift", "sigmoid", "uniform")
# FLUX.1-dev's schedule shift: mu rises linearly from BASE_SHIFT at BASE_SEQ_LEN packed tokens
# (256 = 512 px) to MAX_SHIFT at MAX_SEQ_LEN (4096 = 1024 px); the values of its scheduler config.
BASE_SEQ_LEN, MAX_SEQ_LEN = 256, 4096
BASE_SHIFT, MAX_SHIFT = 0.5, 1.15


@dataclass(frozen=True)
class TimestepSampling:
    """How noise levels are drawn; names and defaults are kohya's (``--timestep_sampling`` etc.).

    ``sigmoid_scale`` widens (>1) or narrows (<1) the sigmoid-of-normal draw used by ``sigmoid``,
    ``shift`` and ``flux_shift``; ``discrete_flow_shift`` is used by ``shift`` only.
    """

    method: str = "flux_shift"
    sigmoid_scale: float = 1.0
    discrete_flow_shift: float = 3.0

    def __post_init__(self) -> None:
        if self.method not in TIMESTEP_SAMPLINGS:
            raise ValueError(f"timestep_sampling must be one of {TIMESTEP_SAMPLINGS}, not {self.method!r}")
        if not self.sigmoid_scale > 0 or not self.discrete_flow_shift > 0:
            raise ValueError("sigmoid_scale and discrete_flow_shift must be positive")


def flux_mu(
    image_seq_len: int,
    *,
    base_seq_len: int = BASE_SEQ_LEN,
    max_seq_len: int = MAX_SEQ_LEN,
    base_shift: float = BASE_SHIFT,
    max_shift: float = MAX_SHIFT,
) -> float:
    """The resolution-dependent schedule shift μ for ``image_seq_len`` packed image tokens: linear
    from ``base_shift`` at ``base_seq_len`` to ``max_shift`` at ``max_seq_len`` (not clamped).
    The defaults are FLUX.1-dev's; other flow models' scheduler configs carry their own four values."""
    slope = (max_shift - base_shift) / (max_seq_len - base_seq_len)
    return base_shift + slope * (image_seq_len - base_seq_len)


def time_shift(mu: float, sigmas: torch.Tensor) -> torch.Tensor:
    """σ ← e^μ / (e^μ + (1/σ - 1)): the shift FLUX.1-dev applies to its sampling schedule."""
    return math.exp(mu) / (math.exp(mu) + (1.0 / sigmas - 1.0))


def sample_sigmas(
    sampling: TimestepSampling, batch_size: int, *, image_seq_len: int, generator: torch.Generator
) -> torch.Tensor:
    """``batch_size`` noise levels in (0, 1) as float32 on the generator's device.

    ``image_seq_len`` is the number of packed image tokens ((H/2)·(W/2) for latents H×W); only
    ``flux_shift`` reads it.
    """
    device = generator.device
    if sampling.method == "uniform":
        return torch.rand(batch_size, generator=generator, device=device)
    sigmas = torch.sigmoid(sampling.sigmoid_scale * torch.randn(batch_size, generator=generator, device=device))
    if sampling.method == "shift":
        shift = sampling.discrete_flow_shift
        return (sigmas * shift) / (1 + (shift - 1) * sigmas)
    if sampling.method == "flux_shift":
        return time_shift(flux_mu(image_seq_len), sigmas)
    return sigmas


def noisy_latents(latents: torch.Tensor, noise: torch.Tensor, sigmas: torch.Tensor) -> torch.Tensor:
    """``(1 - σ)·latents + σ·noise`` with one σ per batch item (broadcast over the other dims)."""
    sigmas = sigmas.to(latents.dtype).view(-1, *([1] * (latents.ndim - 1)))
    return (1.0 - sigmas) * latents + sigmas * noise


def velocity_target(latents: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """What the model learns to predict: ``noise - latents`` (the constant velocity along the straight path)."""
    return noise - latents


def flow_matching_loss(prediction: torch.Tensor, latents: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """Per-item MSE between ``prediction`` and the velocity target, in float32 (shape: batch)."""
    error = F.mse_loss(prediction.float(), velocity_target(latents, noise).float(), reduction="none")
    return error.flatten(1).mean(dim=1)


def pack_latents(latents: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) latents -> (B, H/2·W/2, 4·C) tokens of 2×2 patches, row-major (FLUX's layout).

    H and W must be even; each token holds its patch's channels as (C, 2, 2) flattened.
    """
    b, c, h, w = latents.shape
    if h % 2 or w % 2:
        raise ValueError(f"latent height and width must be even to pack 2x2 patches, got {h}x{w}")
    patches = latents.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return patches.reshape(b, (h // 2) * (w // 2), c * 4)


def unpack_latents(tokens: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """The inverse of :func:`pack_latents` for latents of ``height`` × ``width``."""
    b, n, d = tokens.shape
    c = d // 4
    if n != (height // 2) * (width // 2):
        raise ValueError(f"{n} tokens do not make {height}x{width} latents")
    patches = tokens.view(b, height // 2, width // 2, c, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return patches.reshape(b, c, height, width)


def image_position_ids(height: int, width: int, *, device: torch.device | str = "cpu") -> torch.Tensor:
    """(H/2·W/2, 3) position ids of packed image tokens: (0, row, column) per 2×2 patch, float32."""
    rows, cols = height // 2, width // 2
    ids = torch.zeros(rows, cols, 3, device=device)
    ids[..., 1] = torch.arange(rows, device=device)[:, None]
    ids[..., 2] = torch.arange(cols, device=device)[None, :]
    return ids.reshape(rows * cols, 3)


def text_position_ids(length: int, *, device: torch.device | str = "cpu") -> torch.Tensor:
    """(length, 3) position ids of text tokens: all zero (FLUX gives text no 2-D position)."""
    return torch.zeros(length, 3, device=device)


def scale_latents(
    raw: torch.Tensor, shift_factor: float | torch.Tensor, scaling_factor: float | torch.Tensor
) -> torch.Tensor:
    """VAE latents as the transformer sees them: ``(raw - shift) · scale``. Floats (FLUX's VAE) or
    per-channel tensors shaped (C, 1, 1) (VAEs with ``latents_mean``/``latents_std``: shift = mean,
    scale = 1/std)."""
    return (raw - shift_factor) * scaling_factor


def unscale_latents(
    latents: torch.Tensor, shift_factor: float | torch.Tensor, scaling_factor: float | torch.Tensor
) -> torch.Tensor:
    """The inverse of :func:`scale_latents`, for decoding."""
    return latents / scaling_factor + shift_factor
