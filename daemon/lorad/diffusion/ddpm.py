"""Diffusion training objective: noising, targets, and min-SNR weighting."""

from __future__ import annotations

import torch
import torch.nn.functional as F
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
    # With zero terminal SNR the last timestep has SNR 0, where min(SNR, γ)/SNR tends to 1.
    return torch.where(snr > 0, clipped / snr.clamp(min=torch.finfo(snr.dtype).tiny), torch.ones_like(snr))


def noised_latents(
    mean: torch.Tensor,
    std: torch.Tensor,
    *,
    scaling: float,
    scheduler: DDPMScheduler,
    noise_offset: float,
    generator: torch.Generator,
    device: torch.device,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One training sample of a micro-batch: ``(noisy latents, timesteps, target)`` on ``device``.

    The clean latents are a fresh draw from the cached VAE posterior (``mean``, ``std``; batch
    first, on the CPU) times ``scaling``; noise (with ``noise_offset``) and uniform timesteps follow.
    Every draw comes from ``generator``, in that order, so a resumed run repeats them exactly.
    """
    clean = (mean + std * torch.randn(mean.shape, generator=generator)) * scaling
    noise = sample_noise(clean, offset=noise_offset, generator=generator)
    timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (len(mean),), generator=generator)
    clean, noise, timesteps = clean.to(device), noise.to(device), timesteps.to(device)
    return scheduler.add_noise(clean, noise, timesteps), timesteps, training_target(scheduler, clean, noise, timesteps)


def denoising_loss(
    pred: torch.Tensor,
    target: torch.Tensor,
    *,
    scheduler: DDPMScheduler,
    timesteps: torch.Tensor,
    min_snr_gamma: float | None,
) -> torch.Tensor:
    """The mean squared error of the prediction, per sample weighted by Min-SNR-γ when set, averaged."""
    loss = F.mse_loss(pred.float(), target.float(), reduction="none").mean(dim=tuple(range(1, pred.ndim)))
    if min_snr_gamma:
        loss = loss * snr_weights(scheduler, timesteps, min_snr_gamma)
    return loss.mean()
