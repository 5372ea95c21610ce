"""Sample images of an SD 1.x/2.x run: its resident UNet (with the live LoRA), text encoder and VAE, and a
diffusers scheduler per image; nothing is copied or reloaded."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from lorad.config import TrainConfig
from lorad.errors import ConfigError, ConfigProblem
from lorad.events import Event, EventSink, LogLine
from lorad.families.sd.prompts import PromptEncoder
from lorad.lora.networks import evaluating, network_off
from lorad.models.sd_components import SDComponents
from lorad.sampling.prompts import ResolvedPrompt, SampleSettings, resolve_prompts
from lorad.sampling.rounds import ImageRound
from lorad.sampling.samplers import build_sampler, sampler_problem
from lorad.training.family import ADAPTER
from lorad.training.placement import Placement


def sd_sample_settings(config: TrainConfig) -> SampleSettings:
    """SD's defaults for what a prompt leaves unset: the training resolution, and the config's sample_* keys."""
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
    """The run's sample prompts, resolved and checked before training, with their embeddings encoded once
    when the text encoder is frozen (so sampling never needs it again), and the round that draws them."""

    def __init__(
        self,
        config: TrainConfig,
        components: SDComponents,
        encoder: PromptEncoder,
        placement: Placement,
        on_event: EventSink,
    ) -> None:
        self.components, self.encoder, self.placement = components, encoder, placement
        self.prompts = resolve_prompts(config.sample_prompts, sd_sample_settings(config))
        problems = [
            ConfigProblem("sample_prompts" if p.sampler != config.sample_sampler else "sample_sampler", f"{why}")
            for p in self.prompts
            if (why := sampler_problem(p.sampler, flow=False))
        ]
        if problems:
            raise ConfigError(problems[:1], "sample prompts")
        tokenizer = components.tokenizer
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
        self.embeddings: dict[str, torch.Tensor] = {}
        if not encoder.trainable and self.prompts:
            self.embeddings = self._encode(sorted({t for p in self.prompts for t in (p.prompt, p.negative)}))
        self.round = ImageRound(
            self.prompts,
            output_dir=config.output_dir,
            output_name=config.output_name,
            on_event=on_event,
            model=config.base_model.rsplit("/", 1)[-1],
        )

    def _encode(self, texts: Sequence[str]) -> dict[str, torch.Tensor]:
        """Hidden states of ``texts`` from the text encoder as it is now, in eval mode, without gradients."""
        with torch.no_grad(), evaluating([self.encoder.text_encoder], ADAPTER):
            return {text: self.encoder.encode([text])[0] for text in texts}

    def sample(self, step: int, *, baseline: bool = False) -> list[Event]:
        """Every prompt at ``step`` (see :meth:`lorad.training.family.FamilyRun.sample`)."""
        if not self.prompts:
            return []
        parts = [self.components.unet, self.components.text_encoder]
        with evaluating(parts, ADAPTER):
            if baseline:
                with network_off(parts, ADAPTER):
                    return self._draw(step, baseline=True)
            return self._draw(step, baseline=False)

    def _draw(self, step: int, *, baseline: bool) -> list[Event]:
        # A trained text encoder changes every step (and the baseline reads it without the LoRA): encode now.
        embeddings = self.embeddings
        if self.encoder.trainable or (baseline and not embeddings):
            embeddings = self._encode(sorted({t for p in self.prompts for t in (p.prompt, p.negative)}))
        return self.round.draw(
            step, lambda prompt, generator: self.render(prompt, generator, embeddings), baseline=baseline
        )

    @torch.no_grad()
    def render(self, prompt: ResolvedPrompt, generator: torch.Generator, embeddings: dict[str, torch.Tensor]) -> object:
        """One image: classifier-free guidance over the UNet with ``prompt``'s sampler, then the VAE in fp32."""
        from PIL import Image

        unet, vae = self.components.unet, self.components.vae
        device, dtype = self.placement.device, self.placement.autocast_dtype
        scheduler = build_sampler(prompt.sampler, self.components.noise_scheduler.config)
        scheduler.set_timesteps(prompt.steps, device=device)
        factor = 2 ** (len(vae.config.block_out_channels) - 1)
        shape = (1, unet.config.in_channels, prompt.height // factor, prompt.width // factor)
        latents = torch.randn(shape, generator=generator, dtype=torch.float32).to(device) * scheduler.init_noise_sigma
        guided = prompt.cfg_scale > 1.0  # as diffusers' pipelines: at 1 or less, no unconditional pass
        cond = embeddings[prompt.prompt][None]
        context = torch.cat([embeddings[prompt.negative][None], cond]) if guided else cond
        context = context.to(device=device, dtype=unet.dtype)
        autocast = torch.autocast(device.type, dtype=dtype, enabled=dtype is not None)
        for t in scheduler.timesteps:
            model_input = scheduler.scale_model_input(torch.cat([latents] * 2) if guided else latents, t)
            with autocast:
                noise = unet(model_input.to(unet.dtype), t, encoder_hidden_states=context).sample.float()
            if guided:
                uncond, text = noise.chunk(2)
                noise = uncond + prompt.cfg_scale * (text - uncond)
            latents = scheduler.step(noise, t, latents, generator=generator).prev_sample
        decoded = vae.decode(latents.to(vae.dtype) / vae.config.scaling_factor).sample
        pixels = ((decoded[0].float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
        return Image.fromarray(pixels.permute(1, 2, 0).cpu().numpy())
