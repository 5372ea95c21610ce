"""VAE latents for every (image, bucket) pair, from the cache or encoded once now."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from diffusers import AutoencoderKL

from lorad.data.dataset import TrainImage, load_image_for_bucket
from lorad.data.latent_cache import LatentCache


@dataclass(frozen=True)
class LatentStats:
    """How the latents were obtained: from the cache, or encoded by the VAE in this run."""

    cached: int
    encoded: int


def encode_latents(
    images: Sequence[TrainImage],
    buckets: Sequence[tuple[int, int]],
    *,
    vae: AutoencoderKL,
    cache: LatentCache,
    device: torch.device,
    batch_size: int = 4,
) -> tuple[dict[tuple[str, tuple[int, int]], tuple[torch.Tensor, torch.Tensor]], LatentStats]:
    """Return {(content_hash, bucket): (mean, std)} of the VAE posterior for each image.

    Mean and std are kept (not a single sample) so each step can draw a fresh latent sample, as
    training on the uncached VAE would. Only images missing from ``cache`` go through the VAE;
    they are encoded in batches of one bucket size and written to the cache.
    """
    result: dict[tuple[str, tuple[int, int]], tuple[torch.Tensor, torch.Tensor]] = {}
    todo: dict[tuple[int, int], list[TrainImage]] = {}
    cached = 0
    for image, bucket in zip(images, buckets, strict=True):
        key = (image.content_hash, bucket)
        if key in result:
            continue
        hit = cache.get(image.content_hash, bucket)
        if hit is not None and {"mean", "std"} <= hit.keys():
            result[key] = (hit["mean"], hit["std"])
            cached += 1
        elif image not in todo.setdefault(bucket, []):
            todo[bucket].append(image)
    encoded = 0
    dtype = next(vae.parameters()).dtype
    for bucket, pending in todo.items():
        for start in range(0, len(pending), batch_size):
            chunk = pending[start : start + batch_size]
            pixels = torch.stack([load_image_for_bucket(i.path, bucket) for i in chunk])
            with torch.no_grad():
                dist = vae.encode(pixels.to(device, dtype)).latent_dist
            for i, image in enumerate(chunk):
                mean, std = dist.mean[i].float().cpu(), dist.std[i].float().cpu()
                cache.put(image.content_hash, bucket, {"mean": mean, "std": std})
                result[(image.content_hash, bucket)] = (mean, std)
            encoded += len(chunk)
    return result, LatentStats(cached=cached, encoded=encoded)
