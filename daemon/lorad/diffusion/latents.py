"""VAE latents for every (image, bucket) pair, from the cache or encoded once now.

An image can be cached in several *views*: ``""`` (centre-cropped to its bucket, the default), ``"hflip"``
(mirrored, for ``flip_aug``), and ``"cover"`` / ``"cover:hflip"`` (the whole scaled image, uncropped, for
``random_crop``: its latents are cropped at a random offset each step). A view is part of the cache key.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch
from diffusers import AutoencoderKL

from lorad.data.dataset import TrainImage, load_image_for_bucket
from lorad.data.latent_cache import LatentCache
from lorad.diffusion.noise import host_generator
from lorad.training.transfer import stack_to_device

VIEWS = ("", "hflip", "cover", "cover:hflip")


def view_key(content_hash: str, view: str) -> str:
    """The cache's content key of an image's ``view``: the content hash itself for the default view."""
    return f"{content_hash}:{view}" if view else content_hash


def latent_views(*, flip: bool, random_crop: bool) -> tuple[str, ...]:
    """The views a run needs: cropped or covering, and mirrored too with ``flip``."""
    base = "cover" if random_crop else ""
    return (base, f"{base}:hflip".lstrip(":")) if flip else (base,)


def view_pixels(image: TrainImage, bucket: tuple[int, int], view: str) -> torch.Tensor:
    """The pixels of ``image``'s ``view`` at ``bucket`` (see :data:`VIEWS`)."""
    pixels = load_image_for_bucket(image.path, bucket, crop=not view.startswith("cover"))
    return pixels.flip(-1) if view.endswith("hflip") else pixels


@dataclass(frozen=True)
class LatentStats:
    """How the latents were obtained: from the cache, or encoded by the VAE in this run."""

    cached: int
    encoded: int


def encode_latents(
    images: Sequence[TrainImage],
    buckets: Sequence[tuple[int, int]],
    *,
    vae: AutoencoderKL | Callable[[], AutoencoderKL],
    cache: LatentCache,
    device: torch.device,
    batch_size: int = 4,
    views: Sequence[str] = ("",),
) -> tuple[dict[tuple[str, tuple[int, int]], tuple[torch.Tensor, torch.Tensor]], LatentStats]:
    """Return {(view_key(content_hash, view), bucket): (mean, std)} of the VAE posterior for each image and
    each of ``views`` (by default only the centre-cropped view, keyed by the plain content hash).

    Mean and std are kept (not a single sample) so each step can draw a fresh latent sample, as
    training on the uncached VAE would. Only entries missing from ``cache`` go through the VAE;
    they are encoded in batches of one bucket size and view and written to the cache. ``vae`` may be a
    function returning the VAE: it is then called only if some entry is missing (a warm cache
    never loads a VAE).
    """
    result: dict[tuple[str, tuple[int, int]], tuple[torch.Tensor, torch.Tensor]] = {}
    todo: dict[tuple[tuple[int, int], str], list[TrainImage]] = {}
    cached = 0
    for image, bucket in zip(images, buckets, strict=True):
        for view in views:
            key = (view_key(image.content_hash, view), bucket)
            if key in result:
                continue
            hit = cache.get(key[0], bucket)
            if hit is not None and {"mean", "std"} <= hit.keys():
                result[key] = (hit["mean"], hit["std"])
                cached += 1
            elif image not in todo.setdefault((bucket, view), []):
                todo[(bucket, view)].append(image)
    encoded = 0
    if todo and not isinstance(vae, torch.nn.Module):
        vae = vae()
    dtype = next(vae.parameters()).dtype if todo else None
    for (bucket, view), pending in todo.items():
        for start in range(0, len(pending), batch_size):
            chunk = pending[start : start + batch_size]
            # Covering views of one bucket can differ in size (different aspect ratios): encode those one by one.
            groups = [chunk] if not view.startswith("cover") else [[image] for image in chunk]
            for group in groups:
                pixels = torch.stack([view_pixels(i, bucket, view) for i in group])
                with torch.no_grad():
                    dist = vae.encode(pixels.to(device, dtype)).latent_dist
                for i, image in enumerate(group):
                    mean, std = dist.mean[i].float().cpu(), dist.std[i].float().cpu()
                    key = view_key(image.content_hash, view)
                    cache.put(key, bucket, {"mean": mean, "std": std})
                    result[(key, bucket)] = (mean, std)
            encoded += len(chunk)
    return result, LatentStats(cached=cached, encoded=encoded)


@dataclass(frozen=True)
class LatentSample:
    """One sample of a micro-batch: its image's content hash, its bucket, and whether the plan mirrors it."""

    content_hash: str
    bucket: tuple[int, int]
    flipped: bool = False


@dataclass(frozen=True)
class CleanLatents:
    """A micro-batch's clean latents (scaled for the denoiser) and, with masked_loss, each sample's mask at latent
    size (None: no sample of the batch has a mask)."""

    latents: torch.Tensor
    masks: torch.Tensor | None
    # With random_crop: each sample's (top, left) window offset in pixels of its covering view; else empty.
    crops: tuple[tuple[int, int], ...] = ()


def draw_latents(
    samples: Sequence[LatentSample],
    latents: Mapping[tuple[str, tuple[int, int]], tuple[torch.Tensor, torch.Tensor]],
    masks: Mapping[tuple[str, tuple[int, int]], torch.Tensor],
    *,
    random_crop: bool,
    factor: int,
    scaling_factor: float,
    generator: torch.Generator,
) -> CleanLatents:
    """The clean latents of ``samples`` from :func:`encode_latents`' posteriors: each sample's view (mirrored when
    ``flipped``; the covering view cut at a random latent offset with ``random_crop``, its mask cut alike),
    a fresh draw ``mean + std * noise`` on ``generator``'s device, times ``scaling_factor``. ``masks``
    (latent-size, by the same keys) may lack entries: such samples are weighted 1 everywhere. Every random
    number comes from ``generator``."""
    base = "cover" if random_crop else ""
    offsets = host_generator(generator, stream=2)  # crop windows are shapes: decided on the host
    means, stds, found, crops = [], [], [], []
    for sample in samples:
        view = f"{base}:hflip".lstrip(":") if sample.flipped else base
        key = (view_key(sample.content_hash, view), sample.bucket)
        mean, std = latents[key]
        mask = masks.get(key)
        if random_crop:
            height, width = sample.bucket[1] // factor, sample.bucket[0] // factor
            top = int(torch.randint(0, mean.shape[-2] - height + 1, (), generator=offsets))
            left = int(torch.randint(0, mean.shape[-1] - width + 1, (), generator=offsets))
            window = (..., slice(top, top + height), slice(left, left + width))
            crops.append((top * factor, left * factor))
            mean, std = mean[window], std[window]
            mask = mask[window] if mask is not None else None
        means.append(mean)
        stds.append(std)
        found.append(mask)
    # The cached posteriors go to the device in one copy (pinned, non-blocking on CUDA); the draw happens there.
    mean, std = stack_to_device(means + stds, generator.device).chunk(2)
    draw = torch.randn(mean.shape, generator=generator, dtype=mean.dtype, device=generator.device)
    clean = (mean + std * draw) * scaling_factor
    stacked = None
    if any(m is not None for m in found):
        ones = torch.ones_like(means[0][:1])
        stacked = stack_to_device([m if m is not None else ones for m in found], generator.device)
    return CleanLatents(clean, stacked, tuple(crops))
