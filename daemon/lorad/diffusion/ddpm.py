"""Diffusion training objective: noising, targets, and min-SNR weighting."""

from __future__ import annotations

import torch
from diffusers import DDPMScheduler


def sample_noise(latents: torch.Tensor, *, offset: float, generator: torch.Generator) -> torch.Tensor:
    """Gaussian noise like ``latents``, drawn where ``generator`` lives (the run's device); with
    ``offset`` a per-channel constant is added, which lets the model learn very dark or bright images
    (the "noise offset" trick)."""
    draw = {"generator": generator, "dtype": latents.dtype, "device": generator.device}
    noise = torch.randn(latents.shape, **draw)
    if offset:
        noise = noise + offset * torch.randn((latents.shape[0], latents.shape[1], 1, 1), **draw)
    return noise.to(latents.device)


def training_target(
    scheduler: DDPMScheduler, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor
) -> torch.Tensor:
    """What the UNet should output: the noise (epsilon) or the velocity (v-prediction)."""
    if scheduler.config.prediction_type == "v_prediction":
        return scheduler.get_velocity(latents, noise, timesteps)
    return noise


def snr_weights(scheduler: DDPMScheduler, timesteps: torch.Tensor, gamma: float) -> torch.Tensor:
    """Per-sample loss weights of Min-SNR-γ (Hang et al. 2023): min(SNR, γ)/SNR for epsilon,
    min(SNR, γ)/(SNR+1) for v-prediction. They stop easy (low-noise) steps dominating the loss.
    The SNR is diffusers' own (``compute_snr``), as its training examples use it."""
    from diffusers.training_utils import compute_snr

    snr = compute_snr(scheduler, timesteps)
    clipped = torch.clamp(snr, max=gamma)
    if scheduler.config.prediction_type == "v_prediction":
        return clipped / (snr + 1.0)
    # With zero terminal SNR the last timestep has SNR 0, where min(SNR, γ)/SNR tends to 1.
    return torch.where(snr > 0, clipped / snr.clamp(min=torch.finfo(snr.dtype).tiny), torch.ones_like(snr))


def per_sample_mse(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """The mean squared error of each sample (fp32), each element weighted by ``mask`` (batch, 1, h, w; 1 =
    trained, 0 = ignored, broadcast over channels) when given, as kohya's masked loss: the weighted errors
    are averaged over every element, so a half-masked image contributes half the loss."""
    import torch.nn.functional as F

    error = F.mse_loss(pred.float(), target.float(), reduction="none")
    if mask is not None:
        error = error * mask.to(error.dtype)
    return error.mean(dim=tuple(range(1, error.dim())))
