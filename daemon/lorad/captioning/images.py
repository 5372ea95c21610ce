"""Reading images for a captioner, and grouping them into batches of similar size.

Captioners see upright RGB pictures; a file that cannot be read is reported with a reason and
never stops the others. Batches hold images of similar shape so that processors that keep the
aspect ratio pad little, and so a batch of huge photos is not mixed with thumbnails.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

from PIL import Image, ImageOps

# Aspect ratios within one bucket step (log2 scale, ~9%) count as "the same shape" for batching.
_ASPECT_STEP = 0.125


class UnreadableImage(Exception):
    """The file cannot be used as an image; ``str(err)`` is the reason shown for that image."""


def image_size(path: Path) -> tuple[int, int]:
    """(width, height) as stored, read from the header only (cheap); raises UnreadableImage."""
    try:
        with Image.open(path) as img:
            width, height = img.size
    except FileNotFoundError as err:
        raise UnreadableImage("file not found") from err
    except Image.UnidentifiedImageError as err:
        raise UnreadableImage("unreadable image: cannot identify image file") from err
    except Exception as err:  # Pillow reports broken headers through many exception types
        raise UnreadableImage(f"unreadable image: {err}") from err
    if width <= 0 or height <= 0:
        raise UnreadableImage("image has no pixels")
    return width, height


def open_rgb(path: Path, *, min_side: int = 0) -> Image.Image:
    """The decoded image, turned upright (EXIF), transparency composited on white, in RGB.

    ``min_side``: a JPEG may be decoded at a reduced scale as long as both sides stay at least
    this large (the captioner's input size), which makes big photos load several times faster.
    Raises UnreadableImage with the reason when the file cannot be decoded completely.
    """
    try:
        with Image.open(path) as img:
            if img.format == "JPEG" and min_side:
                scale = max(min_side / img.width, min_side / img.height)
                if scale < 1:
                    img.draft("RGB", (math.ceil(img.width * scale), math.ceil(img.height * scale)))
            img.load()
            upright = ImageOps.exif_transpose(img)
            return _on_white(upright)
    except Image.DecompressionBombError as err:
        raise UnreadableImage("image too large (over Pillow's decompression-bomb limit)") from err
    except Exception as err:
        if "truncat" in str(err).lower():
            raise UnreadableImage("truncated image") from err
        raise UnreadableImage(f"corrupt image: {err}") from err


def _on_white(img: Image.Image) -> Image.Image:
    # Transparent pixels carry arbitrary colours; taggers are trained on white backgrounds.
    if img.mode in ("RGBA", "LA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        canvas = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        canvas.alpha_composite(rgba)
        return canvas.convert("RGB")
    return img.convert("RGB")


def plan_batches(sizes: Sequence[tuple[int, int]], batch_size: int) -> list[list[int]]:
    """Indices into ``sizes`` grouped into batches of at most ``batch_size`` similar images.

    Images of one shape (aspect ratio within about 9%), ordered by area, fill whole batches; the
    remainders of the shapes, which cannot fill one, are then batched together, so no batch is
    smaller than it has to be. Deterministic; every index appears exactly once.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    shapes: dict[int, list[int]] = {}
    for index in sorted(range(len(sizes)), key=lambda i: (sizes[i][0] * sizes[i][1], i)):
        width, height = sizes[index]
        shapes.setdefault(round(math.log2(width / height) / _ASPECT_STEP), []).append(index)
    batches: list[list[int]] = []
    remainders: list[int] = []
    for shape in sorted(shapes):
        members = shapes[shape]
        whole = len(members) - len(members) % batch_size
        batches += [members[i : i + batch_size] for i in range(0, whole, batch_size)]
        remainders += members[whole:]
    return batches + [remainders[i : i + batch_size] for i in range(0, len(remainders), batch_size)]
