"""The family-independent flow-matching pieces, checked against diffusers' FLUX pipeline and scheduler."""

from __future__ import annotations

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline
from diffusers.pipelines.flux.pipeline_flux import calculate_shift

from lorad.diffusion.flow_matching import (
    TIMESTEP_SAMPLINGS,
    TimestepSampling,
    flow_matching_loss,
    flux_mu,
    image_position_ids,
    noisy_latents,
    pack_latents,
    sample_sigmas,
    scale_latents,
    text_position_ids,
    time_shift,
    unpack_latents,
    unscale_latents,
    velocity_target,
)


def _draw(sampling: TimestepSampling, n: int = 4096, seq: int = 4096, seed: int = 0) -> torch.Tensor:
    return sample_sigmas(sampling, n, image_seq_len=seq, generator=torch.Generator().manual_seed(seed))


def test_packing_is_fluxs_own_layout_and_round_trips() -> None:
    latents = torch.randn(2, 16, 8, 12)
    packed = pack_latents(latents)
    assert torch.equal(packed, FluxPipeline._pack_latents(latents, 2, 16, 8, 12))
    assert packed.shape == (2, 4 * 6, 64)
    assert torch.equal(unpack_latents(packed, 8, 12), latents)
    assert torch.equal(unpack_latents(packed, 8, 12), FluxPipeline._unpack_latents(packed, 64, 96, 8))
    with pytest.raises(ValueError, match="even"):
        pack_latents(torch.randn(1, 16, 7, 8))


def test_position_ids_match_the_pipeline() -> None:
    ids = image_position_ids(8, 12)
    assert torch.equal(ids, FluxPipeline._prepare_latent_image_ids(1, 4, 6, "cpu", torch.float32))
    assert torch.equal(text_position_ids(5), torch.zeros(5, 3))


@pytest.mark.parametrize("method", TIMESTEP_SAMPLINGS)
def test_sampling_is_deterministic_and_inside_the_unit_interval(method: str) -> None:
    sampling = TimestepSampling(method=method)
    first, again, other = _draw(sampling), _draw(sampling), _draw(sampling, seed=1)
    assert torch.equal(first, again) and not torch.equal(first, other)
    assert first.dtype == torch.float32 and first.shape == (4096,)
    assert ((first >= 0) & (first < 1)).all()


def test_sampling_methods_mean_what_kohya_documents() -> None:
    uniform = _draw(TimestepSampling("uniform"))
    sigmoid = _draw(TimestepSampling("sigmoid"))
    assert abs(uniform.mean().item() - 0.5) < 0.02 and abs(sigmoid.mean().item() - 0.5) < 0.02
    # sigmoid concentrates on the middle; a larger sigmoid_scale spreads it toward uniform and beyond.
    assert sigmoid.std() < uniform.std() < _draw(TimestepSampling("sigmoid", sigmoid_scale=3.0)).std()
    # shift 1 is the plain sigmoid draw; shift 3 moves training toward noisier steps.
    assert torch.allclose(_draw(TimestepSampling("shift", discrete_flow_shift=1.0)), sigmoid)
    shifted = _draw(TimestepSampling("shift", discrete_flow_shift=3.0))
    assert torch.allclose(shifted, 3 * sigmoid / (1 + 2 * sigmoid))
    # flux_shift follows the resolution: more image tokens, noisier steps; same draw underneath.
    small = _draw(TimestepSampling("flux_shift"), seq=256)
    large = _draw(TimestepSampling("flux_shift"), seq=4096)
    assert sigmoid.mean() < small.mean() < large.mean()
    assert torch.allclose(small, time_shift(0.5, sigmoid))


def test_flux_shift_is_the_pipelines_schedule_shift() -> None:
    scheduler = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True)
    sigmas = torch.linspace(0.05, 0.95, 19)
    for seq in (256, 1024, 4096):
        mu = calculate_shift(seq, 256, 4096, 0.5, 1.15)
        assert flux_mu(seq) == pytest.approx(mu)
        # Another model's scheduler values (e.g. a flow model with base 0.5 at 256 and 0.9 at 8192).
        other = dict(base_seq_len=256, max_seq_len=8192, base_shift=0.5, max_shift=0.9)
        assert flux_mu(seq, **other) == pytest.approx(calculate_shift(seq, 256, 8192, 0.5, 0.9))
        assert torch.allclose(time_shift(mu, sigmas), scheduler.time_shift(mu, 1.0, sigmas))


def test_objective_is_rectified_flow() -> None:
    generator = torch.Generator().manual_seed(0)
    latents, noise = torch.randn(3, 16, 4, 4, generator=generator), torch.randn(3, 16, 4, 4, generator=generator)
    sigmas = torch.tensor([0.0, 0.25, 1.0])
    x = noisy_latents(latents, noise, sigmas)
    assert torch.equal(x[0], latents[0]) and torch.equal(x[2], noise[2])
    assert torch.allclose(x[1], 0.75 * latents[1] + 0.25 * noise[1])
    target = velocity_target(latents, noise)
    assert torch.equal(flow_matching_loss(target, latents, noise), torch.zeros(3))
    assert flow_matching_loss(target + 1, latents, noise).tolist() == [1.0, 1.0, 1.0]
    # With the exact velocity, one Euler step of diffusers' flow-matching sampler lands on the clean latents.
    scheduler = FlowMatchEulerDiscreteScheduler()
    scheduler.set_timesteps(sigmas=[0.25], device="cpu")
    step = scheduler.step(target[1:2], scheduler.timesteps[0], x[1:2]).prev_sample
    assert torch.allclose(step, latents[1:2], atol=1e-5)


def test_vae_scaling_matches_the_pipelines_decoding() -> None:
    raw = torch.randn(1, 16, 4, 4)
    scaled = scale_latents(raw, 0.1159, 0.3611)
    assert torch.allclose(scaled, (raw - 0.1159) * 0.3611)
    # FluxPipeline decodes with latents / scaling_factor + shift_factor.
    assert torch.allclose(unscale_latents(scaled, 0.1159, 0.3611), raw, atol=1e-6)
    # Per-channel statistics (latents_mean / latents_std VAEs) broadcast the same way.
    mean, std = torch.linspace(-1, 1, 16).view(16, 1, 1), torch.linspace(0.5, 2, 16).view(16, 1, 1)
    per_channel = scale_latents(raw, mean, 1 / std)
    assert torch.allclose(per_channel, (raw - mean) / std) and torch.allclose(
        unscale_latents(per_channel, mean, 1 / std), raw, atol=1e-6
    )


def test_bad_sampling_settings_are_refused() -> None:
    with pytest.raises(ValueError, match="timestep_sampling"):
        TimestepSampling("sigma")
    with pytest.raises(ValueError, match="positive"):
        TimestepSampling("shift", discrete_flow_shift=0)
