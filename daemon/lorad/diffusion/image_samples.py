"""An image family's samples: each image repeated, its bucket and cached latents, the plan of an
epoch's micro-batches, and what one micro-batch feeds the model (captions, noised latents).

SD 1.x/2.x and SDXL runs compose one of these; they differ only in the conditioning and the model.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from diffusers import AutoencoderKL, DDPMScheduler

from lorad.config import TrainConfig
from lorad.data.buckets import Bucket, plan_epoch
from lorad.data.dataset import TrainImage
from lorad.data.latent_cache import LatentCache
from lorad.diffusion.captions import epoch_caption
from lorad.diffusion.ddpm import noised_latents
from lorad.diffusion.latents import encode_latents
from lorad.events import EventSink, LatentsCached
from lorad.paths import default_cache_dir
from lorad.training.family import Scalars


@dataclass(frozen=True)
class MicroBatch:
    """One micro-batch of an epoch's plan: positions in the epoch's sample list."""

    epoch: int
    samples: tuple[int, ...]


class ImageSamples:
    """The samples of a run: position ``i`` of every epoch is image ``image_of[i]`` at ``bucket_of[i]``
    (an image with ``repeats`` r holds r positions).

    Building it encodes every (image, bucket) once through ``vae``, or reads it from the latent
    cache (keyed by content, bucket and ``vae_identity``), and reports that as a ``LatentsCached``
    event and the summary's "latents".
    """

    def __init__(
        self,
        config: TrainConfig,
        images: Sequence[TrainImage],
        buckets: Sequence[Bucket],
        *,
        vae: AutoencoderKL,
        vae_identity: str,
        device: torch.device,
        on_event: EventSink,
        scalars: Scalars,
    ) -> None:
        self.config, self.images, self.device = config, list(images), device
        t0 = time.monotonic()
        cache = LatentCache(config.cache_dir or default_cache_dir() / "latents", vae_identity)
        self.latents, stats = encode_latents(self.images, buckets, vae=vae, cache=cache, device=device)
        seconds = time.monotonic() - t0
        on_event(LatentsCached(cached=stats.cached, encoded=stats.encoded, seconds=seconds))
        scalars.summary["latents"] = {"cached": stats.cached, "encoded": stats.encoded, "seconds": seconds}
        self.image_of = [i for i, image in enumerate(self.images) for _ in range(image.repeats)]
        self.bucket_of = [buckets[i] for i in self.image_of]

    def __len__(self) -> int:
        """Samples per epoch (repeats included: kohya's number of training images)."""
        return len(self.image_of)

    def image(self, position: int) -> TrainImage:
        return self.images[self.image_of[position]]

    def raw_captions(self) -> list[str]:
        """The raw caption of every position, before the per-epoch transforms."""
        return [self.image(i).caption for i in range(len(self))]

    def plan(self, epoch: int) -> list[MicroBatch]:
        """The micro-batches of ``epoch``: one bucket each, shuffled by (seed, epoch)."""
        config = self.config
        return [
            MicroBatch(epoch, tuple(batch))
            for batch in plan_epoch(self.bucket_of, config.batch_size, seed=config.seed, epoch=epoch)
        ]

    def captions(self, micro_batch: MicroBatch) -> list[str]:
        """The captions the micro-batch trains with (trigger word, shuffle, dropout applied)."""
        return [
            epoch_caption(self.config, self.image(i).caption, epoch=micro_batch.epoch, position=i)
            for i in micro_batch.samples
        ]

    def noised(
        self, micro_batch: MicroBatch, generator: torch.Generator, *, scaling: float, scheduler: DDPMScheduler
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(noisy latents, timesteps, target)`` of the micro-batch on the device (see ``noised_latents``)."""
        pairs = [self.latents[(self.image(i).content_hash, self.bucket_of[i])] for i in micro_batch.samples]
        return noised_latents(
            torch.stack([m for m, _ in pairs]),
            torch.stack([s for _, s in pairs]),
            scaling=scaling,
            scheduler=scheduler,
            noise_offset=self.config.noise_offset,
            generator=generator,
            device=self.device,
        )


def train_parts(parts: Sequence[torch.nn.Module], gradient_checkpointing: bool) -> None:
    """Training mode for the adapted parts, with activation checkpointing when asked."""
    from lorad.training.activation_checkpointing import enable_activation_checkpointing

    for part in parts:
        part.train()
        if gradient_checkpointing:
            enable_activation_checkpointing(part)
