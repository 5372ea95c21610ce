"""Noise options of the diffusion objective: multi-resolution (pyramid) noise, input perturbation, and the
timestep range. Every random number comes from the caller's generator (tensors drawn where it lives, the
run's device), so a resumed run draws the same; the few numbers that decide shapes on the host come from
:func:`host_generator`, never from reading a device value."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def host_generator(generator: torch.Generator, stream: int) -> torch.Generator:
    """A CPU generator derived from ``generator``'s seed and ``stream``, for random numbers the host needs
    (sizes, offsets): drawing them on the device and reading them back would stall every step."""
    return torch.Generator().manual_seed((generator.initial_seed() * 1_000_033 + stream) % 2**63)


def multires_noise(
    noise: torch.Tensor, *, iterations: int, discount: float, generator: torch.Generator
) -> torch.Tensor:
    """``noise`` plus ``iterations`` coarser noise levels, each upsampled bilinearly and weighted by
    ``discount ** level``, renormalised to unit std per sample (kohya's ``pyramid_noise_like``). Level
    ``i`` is ``r ** i`` times coarser, with ``r`` drawn in [2, 4) per level; it stops at a 1-pixel level."""
    if iterations <= 0:
        return noise
    batch, channels, height, width = noise.shape
    sizes = host_generator(generator, stream=1)
    out = noise.clone()
    for level in range(1, iterations + 1):
        ratio = 2 + 2 * float(torch.rand((), generator=sizes))
        h, w = max(1, int(height / ratio**level)), max(1, int(width / ratio**level))
        coarse = torch.randn((batch, channels, h, w), generator=generator, dtype=noise.dtype, device=generator.device)
        out = out + F.interpolate(coarse, size=(height, width), mode="bilinear") * discount**level
        if h == 1 or w == 1:
            break
    return out / out.std(dim=(1, 2, 3), keepdim=True)


def input_perturbation(noise: torch.Tensor, *, gamma: float, generator: torch.Generator) -> torch.Tensor:
    """The noise to put into the model's *input* (Ning et al. 2023, kohya's ``ip_noise_gamma``): ``noise``
    plus ``gamma`` times fresh Gaussian noise. The training target stays ``noise``."""
    if not gamma:
        return noise
    extra = torch.randn(noise.shape, generator=generator, dtype=noise.dtype, device=generator.device)
    return noise + gamma * extra


def sample_timesteps(count: int, *, low: int, high: int, generator: torch.Generator) -> torch.Tensor:
    """``count`` timesteps drawn uniformly from ``[low, high)`` (kohya's min_timestep/max_timestep)."""
    return torch.randint(low, high, (count,), generator=generator, device=generator.device)
