"""Sample images of a FLUX.1 run: the resident transformer with the live LoRA, the run's cached CLIP-L/T5
outputs of the prompts (encoded once before training), a fresh flow-match Euler scheduler per image, and
FLUX's VAE to decode; nothing of the transformer is copied and no text encoder is reloaded.

The denoising follows diffusers' ``FluxPipeline``: noise of shape (1, 16, H/8, W/8) packed into 2x2
patches, sigmas ``linspace(1, 1/steps, steps)`` shifted by the resolution-dependent ``mu`` (FLUX.1-dev's
scheduler; schnell's uses a fixed shift), the transformer called with ``timestep = sigma``, FLUX.1-dev's
guidance embedding set to the prompt's guidance (``--g``), and true classifier-free guidance with the
negative prompt only when ``--l`` (CFG) is above 1, as ``FluxPipeline(true_cfg_scale=...)`` does.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import replace
from typing import Any

import numpy as np
import torch
from diffusers import FluxTransformer2DModel
from torch import nn

from lorad.diffusion.flow_matching import (
    flux_mu,
    image_position_ids,
    pack_latents,
    text_position_ids,
    unpack_latents,
    unscale_latents,
)
from lorad.errors import ConfigError
from lorad.events import Event, EventSink, LogLine
from lorad.families.flux.config import DEFAULT_SAMPLE_STEPS, FluxTrainConfig, sample_problems
from lorad.lora.networks import evaluating, network_off
from lorad.models.block_swap import BlockSwap
from lorad.sampling.prompts import ResolvedPrompt, SampleSettings, resolve_prompts
from lorad.sampling.rounds import ImageRound
from lorad.sampling.samplers import build_sampler
from lorad.training.family import ADAPTER
from lorad.training.placement import Placement

# Text conditioning of captions: (T5 hidden states, CLIP-L pooled output), batch first, on the run's device.
Conditioning = Callable[[list[str]], tuple[torch.Tensor, torch.Tensor]]
VAE_FACTOR = 8  # FLUX's VAE: 8 pixels per latent (and 2x2 latents per transformer token)


def flux_sample_settings(config: FluxTrainConfig, *, variant: str, guidance_embeds: bool) -> SampleSettings:
    """FLUX's defaults for what a prompt leaves unset: the training resolution, 20 steps for dev and 4 for
    schnell (unless ``sample_steps``), flow-match Euler, CFG 1 (off), and ``sample_guidance_scale`` for
    models with a guidance embedding (dev; schnell has none)."""
    return SampleSettings(
        width=config.sample_width or config.resolution,
        height=config.sample_height or config.resolution,
        steps=config.sample_steps or DEFAULT_SAMPLE_STEPS.get(variant, DEFAULT_SAMPLE_STEPS["dev"]),
        cfg_scale=config.sample_cfg_scale,
        sampler=config.sample_sampler,
        seed=config.seed,
        guidance=config.sample_guidance_scale if guidance_embeds else None,
        trigger_word=config.trigger_word or "",
    )


def flux_prompts(
    config: FluxTrainConfig, *, variant: str, guidance_embeds: bool, on_event: EventSink
) -> list[ResolvedPrompt]:
    """The config's sample prompts with FLUX's defaults filled in. ConfigError when one cannot be drawn by
    FLUX (a denoising sampler, a side that is not a multiple of 16); a ``--g`` on a model without a guidance
    embedding is dropped with a warning (the image's metadata then names no guidance)."""
    problems = sample_problems(config.sample_prompts, config.sample_sampler, config.sample_width, config.sample_height)
    if problems:
        raise ConfigError(problems, "sample prompts")
    prompts = resolve_prompts(
        config.sample_prompts, flux_sample_settings(config, variant=variant, guidance_embeds=guidance_embeds)
    )
    if guidance_embeds:
        return prompts
    ignored = [p.index for p, written in zip(prompts, config.sample_prompts.prompts, strict=True) if written.guidance]
    if ignored:
        on_event(
            LogLine(
                message=f"sample prompts {ignored}: --g is ignored, FLUX.1-{variant} has no guidance embedding",
                level="warning",
            )
        )
    return [replace(p, guidance=None) for p in prompts]


def warn_long_prompts(
    prompts: Sequence[ResolvedPrompt], clip_tokenizer: Any, t5_tokenizer: Any, t5_max_length: int, on_event: EventSink
) -> None:
    """A warning for each prompt (or negative prompt) longer than an encoder reads: CLIP-L's 77 tokens (its
    pooled output sees only those) or T5's ``t5_max_length``; the encoders cut the rest, as in training."""
    for p in prompts:
        for text in dict.fromkeys((p.prompt, p.negative) if p.cfg_scale > 1 else (p.prompt,)):
            for name, tokenizer, limit in (("CLIP-L", clip_tokenizer, 77), ("T5", t5_tokenizer, t5_max_length)):
                tokens = len(tokenizer(text).input_ids)
                if tokens > limit:
                    on_event(
                        LogLine(
                            message=f"sample prompt {p.index} is {tokens} {name} tokens; {name} reads {limit}, "
                            f"so the rest is cut: {text[:60]!r}…",
                            level="warning",
                        )
                    )


def flow_timesteps(scheduler: Any, steps: int, image_seq_len: int, device: torch.device) -> torch.Tensor:
    """Set ``scheduler`` (a fresh FlowMatchEulerDiscreteScheduler) to FluxPipeline's schedule for ``steps``
    steps at ``image_seq_len`` packed tokens, and return its timesteps (sigma x 1000)."""
    config = scheduler.config
    mu = flux_mu(
        image_seq_len,
        base_seq_len=config.get("base_image_seq_len", 256),
        max_seq_len=config.get("max_image_seq_len", 4096),
        base_shift=config.get("base_shift", 0.5),
        max_shift=config.get("max_shift", 1.15),
    )
    scheduler.set_timesteps(sigmas=np.linspace(1.0, 1 / steps, steps), mu=mu, device=device)
    scheduler.set_begin_index(0)
    return scheduler.timesteps


class FluxSampler:
    """The run's sample prompts and the round that draws them (see :meth:`FamilyRun.sample`).

    ``conditioning`` gives the prompts' text conditioning (the run pre-encoded them with its captions and
    runs a trained CLIP-L live); ``adapted`` are the modules carrying the adapter (put in eval mode for the
    round, and without the adapter for a baseline); ``vae`` returns FLUX's VAE, kept in CPU memory between
    images and on the device only while one decodes.
    """

    def __init__(
        self,
        prompts: Sequence[ResolvedPrompt],
        *,
        config: FluxTrainConfig,
        transformer: FluxTransformer2DModel,
        swap: BlockSwap | None,
        placement: Placement,
        scheduler_config: dict[str, Any],
        conditioning: Conditioning,
        adapted: Sequence[nn.Module],
        vae: Callable[[], nn.Module],
        on_event: EventSink,
    ) -> None:
        self.prompts = list(prompts)
        self.transformer, self.swap, self.placement = transformer, swap, placement
        self.scheduler_config, self.conditioning, self.adapted, self.vae = scheduler_config, conditioning, adapted, vae
        self.round = ImageRound.of_run(self.prompts, config, on_event)

    def sample(self, step: int, *, baseline: bool = False) -> list[Event]:
        """Every prompt at ``step``; ``baseline``: without the adapter."""
        if not self.prompts:
            return []
        with evaluating(self.adapted, ADAPTER), self._settled():
            if baseline:
                with network_off(self.adapted, ADAPTER):
                    return self.round.draw(step, self.render, baseline=True)
            return self.round.draw(step, self.render)

    @contextlib.contextmanager
    def _settled(self) -> Iterator[None]:
        """Swapped blocks at rest before the round and after it, as the next training step expects them."""
        if self.swap is not None:
            self.swap.settle()
        try:
            yield
        finally:
            if self.swap is not None:
                self.swap.settle()

    def _velocity(
        self,
        latents: torch.Tensor,
        timestep: torch.Tensor,
        text: tuple[torch.Tensor, torch.Tensor],
        guidance: torch.Tensor | None,
        image_ids: torch.Tensor,
    ) -> torch.Tensor:
        transformer, dtype = self.transformer, self.placement.weight_dtype  # as training feeds it
        t5, pooled = text
        autocast = self.placement.autocast_dtype
        with torch.autocast(latents.device.type, dtype=autocast, enabled=autocast is not None):
            velocity = transformer(
                hidden_states=latents.to(dtype),
                timestep=(timestep / 1000).to(dtype),
                guidance=guidance,
                pooled_projections=pooled.to(dtype),
                encoder_hidden_states=t5.to(dtype),
                txt_ids=text_position_ids(t5.shape[1], device=latents.device),
                img_ids=image_ids,
            ).sample
        if self.swap is not None:
            self.swap.settle()  # the next call runs the blocks in forward order again (no backward between)
        return velocity.float()

    @torch.no_grad()
    def render(self, prompt: ResolvedPrompt, generator: torch.Generator) -> Any:
        """One image of ``prompt``: noise from ``generator`` (CPU), the flow-match Euler steps, the VAE in fp32."""
        from PIL import Image

        device = self.placement.device
        channels = self.transformer.config.in_channels // 4
        height, width = prompt.height // VAE_FACTOR, prompt.width // VAE_FACTOR
        noise = torch.randn((1, channels, height, width), generator=generator, dtype=torch.float32)
        latents = pack_latents(noise).to(device)
        scheduler = build_sampler(prompt.sampler, self.scheduler_config)
        timesteps = flow_timesteps(scheduler, prompt.steps, latents.shape[1], device)
        text = self.conditioning([prompt.prompt])
        guided = prompt.cfg_scale > 1.0  # FluxPipeline's true CFG: only above 1, with the negative prompt
        negative = self.conditioning([prompt.negative]) if guided else None
        guidance = None
        if self.transformer.config.guidance_embeds and prompt.guidance is not None:
            guidance = torch.full((1,), prompt.guidance, device=device, dtype=torch.float32)
        image_ids = image_position_ids(height, width, device=device)
        for t in timesteps:
            timestep = t.expand(1).to(torch.float32)
            velocity = self._velocity(latents, timestep, text, guidance, image_ids)
            if negative is not None:
                unguided = self._velocity(latents, timestep, negative, guidance, image_ids)
                velocity = unguided + prompt.cfg_scale * (velocity - unguided)
            latents = scheduler.step(velocity, t, latents).prev_sample
        vae = self.vae()
        raw = unscale_latents(
            unpack_latents(latents, height, width), vae.config.shift_factor, vae.config.scaling_factor
        )
        home = next(vae.parameters()).device
        vae.to(device)  # kept in CPU memory between images: the transformer has the device to itself while training
        try:
            decoded = vae.decode(raw.to(device, torch.float32)).sample
        finally:
            vae.to(home)
        pixels = ((decoded[0].float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
        return Image.fromarray(pixels.permute(1, 2, 0).cpu().numpy())
