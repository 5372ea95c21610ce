"""Diffusion training objective: noising, targets, and min-SNR weighting."""

from __future__ import annotations

import torch
from diffusers import DDPMScheduler


def sample_noise(latents: torch.Tensor, *, offset: float, generator: torch.Generator) -> torch.Tensor:
    """Gaussian noise like ``latents``; with ``offset`` a per-channel constant is added, which lets
    the model learn very dark or bright images (the "noise offset" trick)."""
    noise = torch.randn(latents.shape, generator=generator, dtype=latents.dtype).to(latents.device)
    if offset:
        shift = torch.randn((latents.shape[0], latents.shape[1], 1, 1), generator=generator, dtype=latents.dtype).to(
            latents.device
        )
        noise = noise + offset * shift
    return noise


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
    return clipped / snr
