"""Loss masks (``masked_loss``): where each training image's mask comes from, and the mask at latent size."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from lorad.data.dataset import IMAGE_EXTENSIONS, TrainImage, has_alpha, load_mask_for_bucket

if TYPE_CHECKING:
    import torch


def mask_source(image: TrainImage, mask_dir: Path | None) -> tuple[Path, bool] | None:
    """(file, is_alpha) of ``image``'s mask: ``mask_dir``'s greyscale image with the same relative path and
    stem (any image extension) when ``mask_dir`` is set, else the image's own alpha channel when it has
    one; None when the image has no mask (it is trained everywhere)."""
    if mask_dir is not None:
        stem = (mask_dir / image.rel).with_suffix("")
        for extension in sorted(IMAGE_EXTENSIONS):
            for candidate in (stem.with_name(stem.name + extension), stem.with_name(stem.name + extension.upper())):
                if candidate.is_file():
                    return candidate, False
        return None
    return (image.path, True) if has_alpha(image.path) else None


def latent_mask(source: tuple[Path, bool], bucket: tuple[int, int], view: str, *, factor: int) -> torch.Tensor:
    """The mask of one latent ``view`` (see :mod:`lorad.diffusion.latents`): the mask file fitted to the bucket
    exactly as the image is, mirrored for "hflip" views, and area-averaged down by the VAE's ``factor``
    (so a latent pixel's weight is the share of its 8x8 pixels that are trained). Shape (1, h, w)."""
    import torch.nn.functional as F

    path, alpha = source
    mask = load_mask_for_bucket(path, bucket, alpha=alpha, crop=not view.startswith("cover"))
    if view.endswith("hflip"):
        mask = mask.flip(-1)
    height, width = mask.shape[-2] // factor, mask.shape[-1] // factor
    return F.interpolate(mask[None], size=(height, width), mode="area")[0]
