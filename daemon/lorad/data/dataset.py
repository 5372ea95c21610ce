"""Scanning the training folder, and loading one image's pixels for its bucket.

``scan_dataset`` runs once before training: it finds every image, decodes it fully (so a broken
file is reported now, with its reason, instead of crashing the run hours later), attaches a
caption and a repeat count, and returns the usable images with a :class:`DataReport`.
"""

from __future__ import annotations

import hashlib
import io
import math
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from PIL import Image

from lorad.data.captions import (
    SidecarError,
    read_metadata_csv,
    read_sidecar,
    remove_stale_caption_temps,
    split_tags,
)
from lorad.data.report import DataReport, SkippedImage
from lorad.errors import DataError

if TYPE_CHECKING:  # torch is imported only when pixels are loaded: scanning stays light.
    import torch

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp"})
# Image types people put in training folders that lorad does not read; reported as skipped
# (instead of silently ignored) so the user knows to convert them.
UNSUPPORTED_IMAGE_EXTENSIONS = frozenset({".gif", ".tif", ".tiff", ".heic", ".heif", ".avif", ".jxl"})

# The folder lorad keeps its own cache in when it lives inside train_data_dir. Any folder holding
# a CACHEDIR.TAG file (https://bford.info/cachedir/, written by LatentCache) is skipped too.
CACHE_DIR_NAME = ".lorad_cache"
CACHEDIR_TAG = "CACHEDIR.TAG"

# A caption sidecar's extension: a dot and a short plain name (no folder part, no "..").
_CAPTION_EXTENSION = re.compile(r"^\.[A-Za-z0-9][A-Za-z0-9_-]{0,15}$")

# A folder named "10_mystyle" gives its images 10 repeats (kohya's DreamBooth layout).
_REPEATS_PREFIX = re.compile(r"^(\d+)_.")

_EXIF_ORIENTATION = 0x0112
# EXIF orientation value -> the transpose that makes the image upright (as ImageOps.exif_transpose).
_UPRIGHT = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}
_SWAPS_SIDES = frozenset({5, 6, 7, 8})


@dataclass(frozen=True)
class TrainImage:
    """One usable training image.

    ``width`` and ``height`` are as displayed, i.e. after EXIF orientation. ``caption`` is the
    raw caption (before ``prepare_caption``). ``content_hash`` (sha256 of the file's bytes) keys
    the latent cache, so renaming a file keeps its cached latents and editing it does not.
    """

    path: Path
    rel: str
    caption: str
    width: int
    height: int
    repeats: int
    content_hash: str

    @property
    def folder(self) -> str:
        """The image's folder relative to ``train_data_dir`` (posix; "" for the top folder)."""
        return self.rel.rpartition("/")[0]


@dataclass(frozen=True)
class _Verified:
    path: Path
    rel: str
    width: int
    height: int
    content_hash: str


class _Skip(Exception):
    """Internal: the file cannot be used; the message is the reason shown to the user."""


def scan_dataset(
    train_data_dir: Path,
    *,
    metadata_path: Path | None,
    caption_extension: str = ".txt",
    repeats: Callable[[str], int | None] | None = None,
    caption_missing: Callable[[list[Path]], Mapping[Path, str]] | None = None,
) -> tuple[list[TrainImage], DataReport]:
    """Find, verify and caption the training images under ``train_data_dir``.

    Images: files ending .jpg .jpeg .png .webp .bmp (any case), in the folder and all its
    subfolders; hidden files and folders, and cache folders (see ``CACHE_DIR_NAME``), are
    ignored. Each is decoded completely; one that cannot be is skipped with its reason.

    Captions, first source that has one wins: the ``metadata_path`` CSV row; the sidecar file
    ``<stem><caption_extension>`` beside the image; ``caption_missing`` — called once with the
    absolute paths of all still-uncaptioned images (the hook for auto-captioning), its non-empty
    answers count as ``captions_generated``. An image left without a caption is skipped.

    Repeats, most specific folder first: for the image's folder, then each parent up to the
    top (""), the ``repeats`` callable's answer (None = no explicit setting) wins over that
    folder's ``N_name`` prefix; the first folder with either decides. Otherwise 1.

    Returns the usable images sorted by ``rel``, and the report. Raises :class:`DataError` if
    ``train_data_dir`` is not a folder, ``metadata_path`` is given but missing or not valid CSV,
    or no image is usable (the message then holds the whole rendered report). CSV rows naming
    files that do not exist are only reported in ``csv_problems``.
    """
    # Absolute (not resolved: symlinked folders keep the names the user gave them).
    root = Path(train_data_dir).expanduser().absolute()
    if not root.exists():
        raise DataError(
            f"`train_data_dir`: folder {root} does not exist",
            hint="Set `train_data_dir` to the folder that holds your training images.",
        )
    if not root.is_dir():
        raise DataError(
            f"`train_data_dir`: {root} is a file, not a folder",
            hint="Set `train_data_dir` to the folder that holds your training images.",
        )
    csv_captions = None
    if metadata_path is not None:
        if not Path(metadata_path).is_file():
            state = "is not a file" if Path(metadata_path).exists() else "does not exist"
            raise DataError(
                f"`metadata_path`: {metadata_path} {state}",
                hint="Fix the path, or remove `metadata_path` to use <stem>.txt caption files.",
            )
        csv_captions = read_metadata_csv(Path(metadata_path))
    csv_name = csv_captions.source if csv_captions else "metadata.csv"
    no_caption = f"no caption (add a {csv_name} row or <stem>{_dotted(caption_extension)})"

    found = find_image_files(root)
    # A caption writer killed mid-write left its temporary file; nothing else would ever remove it.
    csv_folder = [Path(metadata_path).parent] if metadata_path is not None else []
    remove_stale_caption_temps([root, *csv_folder, *(p.parent for p in found)], caption_extension)
    skipped: list[SkippedImage] = []
    verified: list[_Verified] = []
    for path in found:
        rel = path.relative_to(root).as_posix()
        try:
            if path.suffix.lower() in UNSUPPORTED_IMAGE_EXTENSIONS:
                raise _Skip(f"unsupported image type {path.suffix} (convert it to .png or .jpg)")
            width, height, digest = _inspect_image(path)
        except _Skip as skip:
            skipped.append(SkippedImage(rel, str(skip)))
            continue
        verified.append(_Verified(path, rel, width, height, digest))

    csv_problems: list[str] = []
    if csv_captions is not None:
        csv_problems += csv_captions.problems
        csv_problems += _rows_without_image(csv_captions.lines, csv_captions.source, root, found)

    # Captions: CSV, then sidecar, then the generator for whatever is still missing.
    captions: dict[str, str] = {}
    missing_reason: dict[str, str] = {}
    from_csv = from_sidecars = generated = 0
    for item in verified:
        if csv_captions is not None and item.rel in csv_captions.captions:
            captions[item.rel] = csv_captions.captions[item.rel]
            from_csv += 1
            continue
        try:
            sidecar = read_sidecar(item.path, caption_extension)
        except SidecarError as err:
            missing_reason[item.rel] = str(err)
            continue
        if sidecar is None:
            missing_reason[item.rel] = no_caption
        else:
            captions[item.rel] = sidecar
            from_sidecars += 1
    if missing_reason and caption_missing is not None:
        uncaptioned = [item.path for item in verified if item.rel in missing_reason]
        answers = caption_missing(uncaptioned)
        for item in verified:
            if item.rel not in missing_reason:
                continue
            text = (answers.get(item.path) or "").strip()
            if text:
                captions[item.rel] = text
                del missing_reason[item.rel]
                generated += 1

    repeats_of_folder = _RepeatsResolver(repeats)
    images: list[TrainImage] = []
    for item in verified:
        if item.rel in missing_reason:
            skipped.append(SkippedImage(item.rel, missing_reason[item.rel]))
            continue
        images.append(
            TrainImage(
                path=item.path,
                rel=item.rel,
                caption=captions[item.rel],
                width=item.width,
                height=item.height,
                repeats=repeats_of_folder(item.rel.rpartition("/")[0]),
                content_hash=item.content_hash,
            )
        )

    report = DataReport(
        train_data_dir=str(root),
        images_found=len(found),
        images_used=len(images),
        skipped=tuple(sorted(skipped, key=lambda s: s.path)),
        csv_problems=tuple(csv_problems),
        captions_from_csv=from_csv,
        captions_from_sidecars=from_sidecars,
        captions_generated=generated,
        repeats_total=sum(image.repeats for image in images),
        tag_frequency=_tag_frequency(images, top_name=root.name or str(root)),
    )
    if not images:
        raise DataError(
            f"`train_data_dir`: no usable training image in {root}\n{report.render()}",
            hint=_nothing_usable_hint(report, root, no_caption),
        )
    return images, report


def _dotted(extension: str) -> str:
    return extension if extension.startswith(".") else "." + extension


def _is_cache_dir(path: Path) -> bool:
    try:
        return path.name == CACHE_DIR_NAME or (path / CACHEDIR_TAG).is_file()
    except OSError:  # unreadable: not ours, and the walk skips what it cannot list anyway
        return False


def _is_regular_file(path: Path) -> bool:
    try:
        return path.is_file()
    except OSError:
        return False


# Files and folders a walk may visit: far beyond any image folder, and a bound on the time and memory
# a folder such as "/" can cost (it is refused instead of walked to the end).
MAX_WALKED_ENTRIES = 500_000


def find_image_files(root: Path) -> list[Path]:
    """Image files (supported or known-unsupported types) under ``root``, sorted, hidden ones
    and cache folders left out. Symlinked folders are followed once each (no loops); folders that
    cannot be read are skipped. DataError when the tree holds more than MAX_WALKED_ENTRIES entries."""
    wanted = IMAGE_EXTENSIONS | UNSUPPORTED_IMAGE_EXTENSIONS
    found: list[Path] = []
    seen_dirs: set[str] = set()
    walked = 0
    for folder, dirnames, filenames in os.walk(root, followlinks=True):
        real = os.path.realpath(folder)
        if real in seen_dirs:
            dirnames[:] = []
            continue
        seen_dirs.add(real)
        walked += len(dirnames) + len(filenames)
        if walked > MAX_WALKED_ENTRIES:
            raise DataError(
                f"{root} holds more than {MAX_WALKED_ENTRIES:,} files and folders: too many to be an image folder",
                "name the folder that holds your training images (not a disk or home folder)",
            )
        dirnames[:] = sorted(d for d in dirnames if not d.startswith(".") and not _is_cache_dir(Path(folder, d)))
        for name in sorted(filenames):
            if not name.startswith(".") and os.path.splitext(name)[1].lower() in wanted:
                path = Path(folder, name)
                if _is_regular_file(path):
                    found.append(path)
    return sorted(found, key=lambda p: p.relative_to(root).as_posix())


def image_problem(path: Path) -> str | None:
    """Why training would skip the image file at ``path`` (unsupported type, unreadable, corrupt,
    truncated, ...), or None when it decodes completely (the check :func:`scan_dataset` makes)."""
    if path.suffix.lower() in UNSUPPORTED_IMAGE_EXTENSIONS:
        return f"unsupported image type {path.suffix} (convert it to .png or .jpg)"
    try:
        _inspect_image(path)
    except _Skip as skip:
        return str(skip)
    return None


def caption_extension_problem(extension: str) -> str | None:
    """Why ``extension`` (with its dot) cannot name caption sidecar files, or None when it can.

    A sidecar is ``<image stem><extension>`` beside the image: an image extension would make
    captioning overwrite the images themselves, and anything but a short plain extension could
    name a file elsewhere.
    """
    if extension.lower() in IMAGE_EXTENSIONS | UNSUPPORTED_IMAGE_EXTENSIONS:
        return f"{extension} is an image extension: caption files would overwrite the images"
    if not _CAPTION_EXTENSION.match(extension):
        return "is not a file extension such as .txt or .caption"
    return None


def _inspect_image(path: Path) -> tuple[int, int, str]:
    """(width, height after EXIF orientation, sha256 hex) of an image that decodes completely;
    raises _Skip with the reason otherwise."""
    try:
        data = path.read_bytes()
    except OSError as err:
        raise _Skip(f"cannot read file: {err.strerror or err}") from err
    if not data:
        raise _Skip("zero-size file")
    digest = hashlib.sha256(data).hexdigest()
    # Pillow reports corrupt files through many exception types (OSError, SyntaxError,
    # ValueError, struct.error, EOFError, ...), so anything raised while decoding is a skip.
    try:
        with Image.open(io.BytesIO(data)) as img:
            img.verify()  # structure and checksums (PNG CRCs); does not decode pixels
        with Image.open(io.BytesIO(data)) as img:
            width, height = img.size
            orientation = _orientation(img)
            if img.format == "JPEG":
                # Decode at 1/8 scale: every byte of the compressed stream is still read, so a
                # truncated or corrupt file still fails, at a fraction of the cost.
                img.draft(None, (max(1, width // 8), max(1, height // 8)))
            img.load()
    except Image.UnidentifiedImageError as err:
        raise _Skip("unreadable image: cannot identify image file") from err
    except Image.DecompressionBombError as err:
        raise _Skip("image too large (over Pillow's decompression-bomb limit)") from err
    except Exception as err:
        if "truncat" in str(err).lower():
            raise _Skip("truncated image") from err
        raise _Skip(f"corrupt image: {err}") from err
    if width <= 0 or height <= 0:
        raise _Skip("image has no pixels")
    if orientation in _SWAPS_SIDES:
        width, height = height, width
    return width, height, digest


def _orientation(img: Image.Image) -> int:
    # A broken EXIF block should not cost the image: treat it as "upright".
    try:
        value = img.getexif().get(_EXIF_ORIENTATION, 1)
    except Exception:
        return 1
    return value if isinstance(value, int) and value in _UPRIGHT else 1


def _rows_without_image(lines: Mapping[str, int], source: str, root: Path, found: list[Path]) -> list[str]:
    """Problems for CSV rows that name no image of the scan, with a suggestion when the name
    differs only in case (a frequent slip on case-insensitive filesystems)."""
    found_rels = {p.relative_to(root).as_posix() for p in found}
    by_lower = {rel.lower(): rel for rel in found_rels}
    problems = []
    for rel, line in lines.items():
        if rel in found_rels:
            continue
        if rel.lower() in by_lower:
            problems.append(
                f"{source} line {line}: file `{rel}` does not exist in train_data_dir "
                f"(did you mean `{by_lower[rel.lower()]}`?)"
            )
        elif (root / rel).is_file():
            problems.append(
                f"{source} line {line}: file `{rel}` is not a training image (hidden, in a cache "
                f"folder, or not {'/'.join(sorted(IMAGE_EXTENSIONS))})"
            )
        else:
            problems.append(f"{source} line {line}: file `{rel}` does not exist in train_data_dir")
    return problems


class _RepeatsResolver:
    """Repeats per folder (see ``scan_dataset``), computed once per folder."""

    def __init__(self, explicit: Callable[[str], int | None] | None) -> None:
        self._explicit = explicit
        self._cache: dict[str, int] = {}

    def __call__(self, folder: str) -> int:
        if folder not in self._cache:
            self._cache[folder] = self._resolve(folder)
        return self._cache[folder]

    def _resolve(self, folder: str) -> int:
        parts = folder.split("/") if folder else []
        for depth in range(len(parts), -1, -1):
            rel = "/".join(parts[:depth])
            if self._explicit is not None:
                value = self._explicit(rel)
                if value is not None:
                    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                        raise DataError(
                            f"`repeats` for folder `{rel or '.'}` must be a whole number >= 1, got {value!r}",
                            hint="Set a positive repeat count, or remove the entry.",
                        )
                    return value
            if depth:
                match = _REPEATS_PREFIX.match(parts[depth - 1])
                if match and int(match.group(1)) >= 1:
                    return int(match.group(1))
        return 1


def _tag_frequency(images: list[TrainImage], *, top_name: str) -> dict[str, dict[str, int]]:
    # kohya's ss_tag_frequency: per folder, how many captions carry each tag (once per image,
    # not per repeat). Images in the top folder are listed under the folder's own name.
    frequency: dict[str, dict[str, int]] = {}
    for image in images:
        tags = frequency.setdefault(image.folder or top_name, {})
        for tag in dict.fromkeys(split_tags(image.caption)):
            tags[tag] = tags.get(tag, 0) + 1
    return frequency


def _nothing_usable_hint(report: DataReport, root: Path, no_caption: str) -> str:
    if report.images_found == 0:
        return (
            f"Put training images ({', '.join(sorted(IMAGE_EXTENSIONS))}) in {root}; subfolders are "
            "searched too, hidden ones are not."
        )
    if all(s.reason == no_caption for s in report.skipped):
        return (
            "Give every image a caption: a row `file,caption` in the metadata CSV (`metadata_path`) "
            "or a text file named like the image beside it (cat.png -> cat.txt)."
        )
    return "Fix or replace the files listed above (re-save them from an image editor), then run again."


@dataclass(frozen=True)
class BucketCrop:
    """How an upright image is fitted to a bucket: scaled by ``scale`` to ``resized`` (width, height),
    then the bucket-sized window at (``left``, ``top``) of the scaled image is kept."""

    scale: float
    resized: tuple[int, int]
    left: int
    top: int


def bucket_crop(width: int, height: int, bucket: tuple[int, int]) -> BucketCrop:
    """The scale and center crop that :func:`load_image_for_bucket` applies to a ``width`` x ``height``
    (upright) image for ``bucket`` = (width, height): the smallest scale that covers the bucket,
    keeping the aspect ratio, then a center crop. Only one side is ever cropped."""
    bucket_w, bucket_h = bucket
    scale = max(bucket_w / width, bucket_h / height)
    # max() guards against float rounding landing one pixel short of the bucket.
    new_w, new_h = max(bucket_w, round(width * scale)), max(bucket_h, round(height * scale))
    return BucketCrop(scale, (new_w, new_h), left=(new_w - bucket_w) // 2, top=(new_h - bucket_h) // 2)


def load_image_for_bucket(path: Path, bucket: tuple[int, int], *, crop: bool = True) -> torch.Tensor:
    """The pixels of ``path`` for training at ``bucket`` = (width, height).

    The image is turned upright (EXIF), made RGB (transparency composited on white), scaled
    by the smallest factor that makes it cover the bucket (keeping its aspect ratio; Lanczos
    down, bicubic up — so it is enlarged only when the bucket is larger than the image), and
    center-cropped to exactly the bucket. With ``crop=False`` it is not cropped: its sides are
    rounded up to multiples of 8 instead (so its latents can be cropped anywhere later, as
    ``random_crop`` does). Returns a float32 tensor of shape (3, height, width) with values in
    [-1, 1]. Raises :class:`DataError` if the file can no longer be decoded.
    """
    import torch

    picture = _fit_to_bucket(_open_upright(path, bucket, rgb=True), bucket, crop=crop)
    width, height = picture.size
    pixels = torch.frombuffer(bytearray(picture.tobytes()), dtype=torch.uint8)
    return pixels.view(height, width, 3).permute(2, 0, 1).float().div(127.5).sub(1.0).contiguous()


def has_alpha(path: Path) -> bool:
    """Whether the image file carries transparency (an alpha channel or a transparent palette entry)."""
    with Image.open(path) as img:
        return img.mode in _ALPHA_MODES or "transparency" in img.info


def load_mask_for_bucket(path: Path, bucket: tuple[int, int], *, alpha: bool, crop: bool = True) -> torch.Tensor:
    """A loss mask for ``bucket`` with exactly the geometry :func:`load_image_for_bucket` gives the image
    (same upright turn, scale, crop or rounding): the alpha channel of ``path`` when ``alpha``, else
    ``path`` read as greyscale. Returns float32 (1, height, width) in [0, 1] (1 = trained)."""
    import torch

    picture = _open_upright(path, bucket, rgb=False, alpha=alpha)
    picture = _fit_to_bucket(picture, bucket, crop=crop)
    width, height = picture.size
    values = torch.frombuffer(bytearray(picture.tobytes()), dtype=torch.uint8)
    return values.view(1, height, width).float().div(255.0).contiguous()


_ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")


def _open_upright(path: Path, bucket: tuple[int, int], *, rgb: bool, alpha: bool = False) -> Image.Image:
    """The image at ``path``, decoded (at a reduced JPEG scale when that still covers ``bucket``) and turned
    upright: RGB when ``rgb``, else its alpha channel (``alpha``) or its greyscale ("L")."""
    bucket_w, bucket_h = bucket
    try:
        with Image.open(path) as img:
            orientation = _orientation(img)
            upright_w, upright_h = img.size[::-1] if orientation in _SWAPS_SIDES else img.size
            scale = max(bucket_w / upright_w, bucket_h / upright_h)
            if img.format == "JPEG" and scale < 1:
                # Let libjpeg decode at a reduced scale that still covers the bucket: big
                # photos load several times faster. draft never goes below the size asked for.
                need = (math.ceil(upright_w * scale), math.ceil(upright_h * scale))
                img.draft(None, need[::-1] if orientation in _SWAPS_SIDES else need)
            img.load()
            if rgb:
                picture = _to_rgb(img)
            elif alpha:
                picture = img.convert("RGBA").getchannel("A")
            else:
                picture = img.convert("L")
    except Exception as err:
        raise DataError(
            f"training image {path} can no longer be read: {err}",
            hint="The file changed or broke after the data was checked; fix or remove it and start again.",
        ) from err
    if orientation in _UPRIGHT:
        picture = picture.transpose(_UPRIGHT[orientation])
    return picture


def _fit_to_bucket(picture: Image.Image, bucket: tuple[int, int], *, crop: bool) -> Image.Image:
    """Scale ``picture`` to cover ``bucket``, then center-crop to it (``crop``) or round its sides up to
    multiples of 8."""
    bucket_w, bucket_h = bucket
    width, height = picture.size
    fit = bucket_crop(width, height, bucket)
    new_w, new_h = fit.resized
    if not crop:
        new_w, new_h = -(-new_w // 8) * 8, -(-new_h // 8) * 8
    if (new_w, new_h) != (width, height):
        resample = Image.Resampling.LANCZOS if fit.scale < 1 else Image.Resampling.BICUBIC
        picture = picture.resize((new_w, new_h), resample)
    if not crop:
        return picture
    return picture.crop((fit.left, fit.top, fit.left + bucket_w, fit.top + bucket_h))


def _to_rgb(img: Image.Image) -> Image.Image:
    if not (img.mode in _ALPHA_MODES or "transparency" in img.info):
        return img.convert("RGB")
    rgba = img.convert("RGBA")
    canvas = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    canvas.alpha_composite(rgba)
    return canvas.convert("RGB")
