"""Sample images of an SD-style run (SD 1.x/2.x and SDXL): its resident UNet (with the live LoRA), text
encoders and VAE, and a diffusers scheduler per image; nothing is copied or reloaded.

The model's traits (:class:`lorad.families.sd.traits.ModelTraits`) say how text becomes conditioning, as in
training: SD's CLIP hidden states (with ``clip_skip``); SDXL's two encoders' penultimate hidden states and
pooled embedding, beside the time ids of an uncropped image at its own size (original = target = (h, w),
crop (0, 0)), which is how SDXL pipelines generate. The negative prompt is encoded like any text (the empty
one too, as A1111 does, whose PNG info the files carry).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from lorad.config import TrainConfig
from lorad.errors import ConfigError, ConfigProblem
from lorad.events import Event, EventSink, LogLine
from lorad.families.sd.traits import ModelTraits, SampleView
from lorad.lora.networks import evaluating, network_off
from lorad.sampling.prompts import ResolvedPrompt, SampleSettings, resolve_prompts
from lorad.sampling.rounds import ImageRound
from lorad.sampling.samplers import build_sampler, sampler_problem
from lorad.training.family import ADAPTER
from lorad.training.placement import Placement

#: One text's encoding: the traits' output names -> that text's row (no batch axis).
Encoding = dict[str, torch.Tensor]


def sd_sample_settings(config: TrainConfig) -> SampleSettings:
    """The family's defaults for what a prompt leaves unset: the training resolution, and the config's
    sample_* keys (whose defaults each family's config class sets: SDXL's suit SDXL)."""
    return SampleSettings(
        width=config.sample_width or config.resolution,
        height=config.sample_height or config.resolution,
        steps=config.sample_steps,
        cfg_scale=config.sample_cfg_scale,
        sampler=config.sample_sampler,
        seed=config.seed,
        trigger_word=config.trigger_word or "",
    )


class SdSampler:
    """The run's sample prompts, resolved and checked before training, with their encodings made once when the
    text encoders are frozen (so sampling never needs them again), and the round that draws them.

    ``components`` is the run's resident model (SD's or SDXL's components), ``traits`` its model traits, and
    ``trainable`` whether the run trains the text encoders (then prompts are encoded at each round, through
    the live LoRA)."""

    def __init__(
        self,
        config: TrainConfig,
        components: Any,
        traits: ModelTraits,
        placement: Placement,
        on_event: EventSink,
        *,
        trainable: bool,
    ) -> None:
        self.config, self.components, self.traits, self.placement = config, components, traits, placement
        self.trainable = trainable
        self.text_encoders = [getattr(components, part) for part in traits.text_parts]
        self.prompts = resolve_prompts(config.sample_prompts, sd_sample_settings(config))
        problems = [
            ConfigProblem("sample_prompts" if p.sampler != config.sample_sampler else "sample_sampler", f"{why}")
            for p in self.prompts
            if (why := sampler_problem(p.sampler, flow=False))
        ]
        if problems:
            raise ConfigError(problems[:1], "sample prompts")
        self._warn_long_prompts(on_event)
        self.texts = sorted({t for p in self.prompts for t in (p.prompt, p.negative)})
        self.encodings: dict[str, Encoding] = {} if trainable else self._encode(self.texts)
        self.round = ImageRound.of_run(self.prompts, config, on_event)

    def _warn_long_prompts(self, on_event: EventSink) -> None:
        # SDXL's second tokenizer has the first one's vocabulary and limit, so the first one tells for both.
        tokenizer = self.components.tokenizer
        for p in self.prompts:
            for text in (p.prompt, p.negative):
                tokens = len(tokenizer(text).input_ids)
                if tokens > tokenizer.model_max_length:
                    on_event(
                        LogLine(
                            message=f"sample prompt {p.index} is {tokens} tokens; the text encoder reads "
                            f"{tokenizer.model_max_length}, so the rest is cut: {text[:60]!r}…",
                            level="warning",
                        )
                    )

    def _encode(self, texts: Sequence[str]) -> dict[str, Encoding]:
        """Each text's encoding by the text encoders as they are now, in eval mode, without gradients (one
        text at a time, so an encoding never depends on which texts were encoded beside it)."""
        encode, device = self.traits.encode, self.placement.device
        with torch.no_grad(), evaluating(self.text_encoders, ADAPTER):
            return {
                text: {name: rows[0] for name, rows in encode(self.components, [text], device, self.config).items()}
                for text in texts
            }

    def sample(self, step: int, *, baseline: bool = False) -> list[Event]:
        """Every prompt at ``step`` (see :meth:`lorad.training.family.FamilyRun.sample`)."""
        if not self.prompts:
            return []
        parts = [self.components.unet, *self.text_encoders]
        with evaluating(parts, ADAPTER):
            if baseline:
                with network_off(parts, ADAPTER):
                    return self._draw(step, baseline=True)
            return self._draw(step, baseline=False)

    def _draw(self, step: int, *, baseline: bool) -> list[Event]:
        # Trained text encoders change every step (and the baseline reads them without the LoRA): encode now.
        encodings = self._encode(self.texts) if self.trainable else self.encodings
        return self.round.draw(
            step, lambda prompt, generator: self.render(prompt, generator, encodings), baseline=baseline
        )

    @torch.no_grad()
    def render(self, prompt: ResolvedPrompt, generator: torch.Generator, encodings: dict[str, Encoding]) -> Any:
        """One PIL image: classifier-free guidance over the (uncompiled) UNet with ``prompt``'s sampler, then
        the VAE in its own dtype (fp32 for every run: SD's and SDXL's VAEs overflow in fp16)."""
        from PIL import Image

        components, placement = self.components, self.placement
        unet, vae = components.unet, components.vae
        # The UNet computes in the weight dtype (not ``unet.dtype``: with fp8_base its first weight is float8).
        device, dtype = placement.device, placement.weight_dtype
        scheduler = build_sampler(prompt.sampler, components.noise_scheduler.config)
        scheduler.set_timesteps(prompt.steps, device=device)
        factor = components.vae_scale_factor
        shape = (1, unet.config.in_channels, prompt.height // factor, prompt.width // factor)
        latents = torch.randn(shape, generator=generator, dtype=torch.float32).to(device) * scheduler.init_noise_sigma
        guided = prompt.cfg_scale > 1.0  # as diffusers' pipelines: at 1 or less, no unconditional pass
        rows = [encodings[prompt.negative], encodings[prompt.prompt]] if guided else [encodings[prompt.prompt]]
        text = {name: torch.stack([row[name] for row in rows]).to(device=device, dtype=dtype) for name in rows[0]}
        size = (prompt.width, prompt.height)
        views = [SampleView(prompt.width, prompt.height, size, flipped=False, crop=(0, 0))] * len(rows)
        autocast = torch.autocast(
            device.type, dtype=placement.autocast_dtype, enabled=placement.autocast_dtype is not None
        )
        for t in scheduler.timesteps:
            model_input = scheduler.scale_model_input(torch.cat([latents] * len(rows)), t)
            with autocast:
                noise = self.traits.denoise(unet, model_input.to(dtype), t, text, views).float()
            if guided:
                uncond, cond = noise.chunk(2)
                noise = uncond + prompt.cfg_scale * (cond - uncond)
            latents = scheduler.step(noise, t, latents, generator=generator).prev_sample
        decoded = vae.decode(latents.to(vae.dtype) / components.vae_scaling_factor).sample
        pixels = ((decoded[0].float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
        return Image.fromarray(pixels.permute(1, 2, 0).cpu().numpy())
