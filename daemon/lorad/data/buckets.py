"""Aspect-ratio bucketing (as in kohya's sd-scripts) and the per-epoch batch plan.

A bucket is a training size (width, height) in pixels, both multiples of ``step`` (64 for SD:
the VAE divides by 8 and the UNet by 8 again). Every image trains at the bucket whose aspect
ratio is nearest its own, so wide and tall images are not cropped to squares; a batch only
holds images of one bucket, so its tensors stack.
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterable, Sequence

Bucket = tuple[int, int]


def make_buckets(resolution: int, min_reso: int, max_reso: int, step: int) -> list[Bucket]:
    """The buckets for a training ``resolution``: sorted (width, height) pairs.

    Every side is a multiple of ``step`` within ``[min_reso, max_reso]`` and every area is at
    most ``resolution ** 2``. As in kohya, there is one bucket per width — the tallest height
    that fits the area — plus the largest square: a smaller bucket of the same shape would
    only throw pixels away. Raises ValueError for settings that allow no bucket.
    """
    if resolution <= 0 or step <= 0:
        raise ValueError(f"resolution and step must be positive, got {resolution} and {step}")
    if min_reso % step or max_reso % step:
        raise ValueError(f"min_reso ({min_reso}) and max_reso ({max_reso}) must be multiples of {step}")
    if not 0 < min_reso <= max_reso:
        raise ValueError(f"need 0 < min_reso <= max_reso, got {min_reso} and {max_reso}")
    max_area = resolution * resolution
    buckets: set[Bucket] = set()
    square = min(max_reso, (resolution // step) * step)
    if square >= min_reso:
        buckets.add((square, square))
    for width in range(min_reso, max_reso + 1, step):
        height = min(max_reso, (max_area // width) // step * step)
        if height >= min_reso:
            buckets.add((width, height))
            buckets.add((height, width))
    if not buckets:
        raise ValueError(f"no bucket of sides {min_reso}..{max_reso} fits the area of {resolution}x{resolution}")
    return sorted(buckets)


def _log_aspect(width: int, height: int) -> float:
    # Log ratio so that 2:1 and 1:2 are equally far from square.
    return math.log(width / height)


def assign_bucket(
    width: int,
    height: int,
    *,
    buckets: Sequence[Bucket],
    resolution: int,
    step: int,
    no_upscale: bool,
) -> Bucket:
    """The bucket an image of ``width`` x ``height`` pixels (after EXIF rotation) trains at.

    Normally the bucket in ``buckets`` whose aspect ratio is nearest (ties: the larger area,
    then the first in order). With ``no_upscale``, an image whose area is at most
    ``resolution ** 2`` gets its own bucket instead: its size rounded *down* to multiples of
    ``step``, so it is cropped by less than one step and never enlarged. The one exception is a
    side shorter than ``step``, which becomes ``step`` (a zero-size bucket cannot train).
    Larger images use ``buckets`` as usual. Callers with bucketing disabled do not call this;
    they use (resolution, resolution).
    """
    if width <= 0 or height <= 0:
        raise ValueError(f"image size must be positive, got {width}x{height}")
    if no_upscale and width * height <= resolution * resolution:
        return (max(step, width // step * step), max(step, height // step * step))
    if not buckets:
        raise ValueError("no buckets to choose from")
    target = _log_aspect(width, height)
    return min(buckets, key=lambda b: (abs(_log_aspect(*b) - target), -b[0] * b[1]))


def bucket_name(bucket: Bucket) -> str:
    """ "WxH", the form buckets take in reports and metadata."""
    return f"{bucket[0]}x{bucket[1]}"


def bucket_counts(bucket_of: Iterable[Bucket]) -> dict[str, int]:
    """How many entries fall in each bucket, keyed "WxH" (for ``DataReport.with_buckets``)."""
    counts: dict[str, int] = {}
    for bucket in bucket_of:
        counts[bucket_name(bucket)] = counts.get(bucket_name(bucket), 0) + 1
    return counts


def plan_epoch(bucket_of: Sequence[Bucket], batch_size: int, *, seed: int, epoch: int) -> list[list[int]]:
    """The batches of one epoch: lists of indices into ``bucket_of``, all of one bucket each.

    ``bucket_of[i]`` is the bucket of sample ``i``; pass one entry per sample, so an image
    with 3 repeats appears 3 times. Every index appears in exactly one batch; batches hold at
    most ``batch_size`` indices (the last batch of a bucket may be smaller — none is dropped).
    Indices are shuffled within each bucket and the batch order is shuffled too.

    The plan depends only on the arguments: the random generator is seeded from
    ``(seed, epoch)`` (string seeds are hashed with SHA-512, independent of PYTHONHASHSEED),
    so a resumed run replays the same epoch exactly, in any process.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    rng = random.Random(f"lorad-epoch:{seed}:{epoch}")
    by_bucket: dict[Bucket, list[int]] = {}
    for index, bucket in enumerate(bucket_of):
        by_bucket.setdefault(tuple(bucket), []).append(index)
    batches: list[list[int]] = []
    # Buckets in sorted order, so the random draws never depend on dict insertion order.
    for bucket in sorted(by_bucket):
        indices = by_bucket[bucket]
        rng.shuffle(indices)
        batches += [indices[i : i + batch_size] for i in range(0, len(indices), batch_size)]
    rng.shuffle(batches)
    return batches


def plan_flips(count: int, *, seed: int, epoch: int) -> list[bool]:
    """Which of ``count`` samples an epoch trains mirrored (``flip_aug``): each with probability 1/2, from a
    generator seeded by ``(seed, epoch)`` alone, so a resumed run mirrors exactly the same samples."""
    rng = random.Random(f"lorad-flip:{seed}:{epoch}")
    return [rng.random() < 0.5 for _ in range(count)]
