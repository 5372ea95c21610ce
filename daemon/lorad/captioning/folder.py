"""Captioning a whole folder: decide per image (caption, keep, or report), caption in batches, write.

What counts as an image and as its existing caption is exactly what training reads: the same
folder walk, the ``metadata.csv`` row first, then the ``<stem><caption_extension>`` sidecar.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from lorad.captioning.captioner import CaptionerKey, CaptionerProvider, captioner_placement, load_fresh_captioner
from lorad.captioning.record import CaptionRecord
from lorad.captioning.request import CaptionRequest
from lorad.captioning.runner import caption_images
from lorad.captioning.updates import (
    CAPTIONED,
    FAILED,
    KEPT,
    CaptionerReady,
    CaptionFinished,
    CaptionPlanned,
    CaptionUpdate,
    ImageCaptioned,
)
from lorad.captioning.writer import CaptionWriter, lands_inside
from lorad.data.captions import (
    SidecarError,
    read_metadata_csv,
    read_sidecar,
    remove_stale_caption_temps,
    sidecar_path,
)

# The walk training uses; imported rather than re-implemented so `lorad caption` and `lorad train`
# can never disagree about which files are the training images.
from lorad.data.dataset import UNSUPPORTED_IMAGE_EXTENSIONS, find_image_files

METADATA_NAME = "metadata.csv"
CAPTION, KEEP, REPORT = "caption", "keep", "report"


@dataclass(frozen=True)
class PlannedImage:
    """One image and what will happen to it: CAPTION, KEEP (``caption`` is its existing caption)
    or REPORT (it cannot be captioned; ``reason`` says why)."""

    path: Path
    rel: str
    action: str
    caption: str = ""
    reason: str = ""


@dataclass(frozen=True)
class FolderPlan:
    """Every image of a folder with its action, and where new captions go (``format`` csv/txt)."""

    root: Path
    format: str
    images: tuple[PlannedImage, ...]

    def count(self, action: str) -> int:
        """How many images have ``action``."""
        return sum(1 for image in self.images if image.action == action)


def detect_format(root: Path, images: list[Path], caption_extension: str) -> str:
    """What the folder already uses: "csv" when it has a metadata.csv, else "txt" when any of its
    ``images`` has a sidecar caption, else "csv" (the original tool's metadata.csv)."""
    if (root / METADATA_NAME).is_file():
        return "csv"
    if any(sidecar_path(path, caption_extension).is_file() for path in images):
        return "txt"
    return "csv"


def plan_folder(
    root: Path,
    *,
    format: str = "auto",
    caption_extension: str = ".txt",
    overwrite: bool = False,
    regenerate: bool = False,
) -> FolderPlan:
    """Decide what happens to each image under ``root``.

    An image is captioned when it has no caption (none in metadata.csv, no sidecar or an empty
    one); with ``overwrite`` always; with ``regenerate`` also when its caption is one lorad
    generated that nobody edited (see :class:`~lorad.captioning.record.CaptionRecord`). Otherwise it
    is kept. Files training cannot read as images (unsupported types) and captions that exist but
    cannot be read (not UTF-8) are reported, not touched — unless ``overwrite``. A malformed
    metadata.csv raises DataError: lorad never rewrites a file it cannot read.
    """
    images = find_image_files(root)
    remove_stale_caption_temps([root, *(p.parent for p in images)], caption_extension)  # a killed writer's
    fmt = detect_format(root, images, caption_extension) if format == "auto" else format
    csv_path = root / METADATA_NAME
    csv_captions = read_metadata_csv(csv_path).captions if csv_path.is_file() else {}
    record = CaptionRecord.load(root)
    real_root = os.path.realpath(root)
    planned = []
    for path in images:
        rel = path.relative_to(root).as_posix()
        if path.suffix.lower() in UNSUPPORTED_IMAGE_EXTENSIONS:
            planned.append(
                PlannedImage(
                    path, rel, REPORT, reason=f"unsupported image type {path.suffix} (convert it to .png or .jpg)"
                )
            )
            continue
        caption, problem = csv_captions.get(rel), ""
        if caption is None:
            caption, problem = sidecar_caption(path, caption_extension)
        if (
            overwrite
            or (caption is None and not problem)
            or (regenerate and caption is not None and record.is_generated(rel, caption))
        ):
            if fmt == "txt" and not lands_inside(real_root, sidecar_path(path, caption_extension)):
                reason = "its caption file would be outside the folder (a linked folder or file): caption it there"
                planned.append(PlannedImage(path, rel, REPORT, reason=reason))
                continue
            planned.append(PlannedImage(path, rel, CAPTION))
        elif problem:
            planned.append(PlannedImage(path, rel, REPORT, reason=f"{problem} (fix or delete it, or use --overwrite)"))
        else:
            planned.append(PlannedImage(path, rel, KEEP, caption=caption or ""))
    return FolderPlan(root=root, format=fmt, images=tuple(planned))


def sidecar_caption(path: Path, extension: str) -> tuple[str | None, str]:
    """(caption, "") from the image's sidecar, (None, "") without one (or an empty one), or
    (None, the problem) when it exists but cannot be read."""
    try:
        return read_sidecar(path, extension), ""
    except SidecarError as err:
        try:
            if not sidecar_path(path, extension).read_bytes().decode("utf-8-sig").strip():
                return None, ""  # an empty caption file is a caption still to write
        except (OSError, UnicodeDecodeError):
            pass
        return None, str(err)


def caption_folder(
    request: CaptionRequest,
    *,
    provide: CaptionerProvider = load_fresh_captioner,
    should_stop: Callable[[], bool] | None = None,
) -> Iterator[CaptionUpdate]:
    """Caption ``request.folder`` and write the captions, reporting as it goes.

    Yields one :class:`CaptionPlanned`, then (only when some image needs a caption: otherwise no
    model is loaded) one :class:`CaptionerReady`, one :class:`ImageCaptioned` per image (kept and
    reported ones first), and one :class:`CaptionFinished`. Captions are written after each batch,
    so stopping (``should_stop()`` turning True, or closing the generator) keeps the work done.
    """
    start = time.monotonic()
    plan = plan_folder(
        request.folder,
        format=request.format,
        caption_extension=request.caption_extension,
        overwrite=request.overwrite,
        regenerate=request.regenerate,
    )
    writer = CaptionWriter(
        request.folder,
        format=plan.format,
        captioner=request.captioner,
        model=str(request.model),
        caption_extension=request.caption_extension,
        trigger_word=request.trigger_word,
    )
    total = len(plan.images)
    yield CaptionPlanned(
        folder=str(request.folder),
        images_found=total,
        to_caption=plan.count(CAPTION),
        to_keep=plan.count(KEEP),
        unusable=plan.count(REPORT),
        format=plan.format,
        written_to=writer.target,
        record_path=str(writer.record_path),
    )
    done = captioned = failed = 0
    for image in plan.images:
        if image.action == KEEP:
            done += 1
            yield ImageCaptioned(image.rel, KEPT, image.caption, "", done, total)
        elif image.action == REPORT:
            done, failed = done + 1, failed + 1
            yield ImageCaptioned(image.rel, FAILED, "", image.reason, done, total)
    stopped = False
    caption_seconds = 0.0
    to_caption = [image for image in plan.images if image.action == CAPTION]
    if to_caption:
        device, dtype = captioner_placement(request.captioner, request.device)
        key = CaptionerKey(
            kind=request.captioner,
            model=str(request.model),
            device=device,
            dtype=dtype,
            allow_pickle=request.allow_pickle,
        )
        rel_of = {image.path: image.rel for image in to_caption}
        with provide(key) as provided:
            captioner = provided.captioner
            yield CaptionerReady(
                captioner=request.captioner,
                source=captioner.source,
                model_version=captioner.model_version,
                model_id=provided.model_id,
                resident=provided.resident,
                seconds=provided.seconds,
            )
            t0 = time.monotonic()
            for outcomes in caption_images(
                captioner,
                [image.path for image in to_caption],
                request.options,
                batch_size=request.batch_size,
                should_stop=should_stop,
            ):
                written = writer.write({o.path: o.caption for o in outcomes if not o.error})
                for outcome in outcomes:
                    done += 1
                    if outcome.error:
                        failed += 1
                        yield ImageCaptioned(rel_of[outcome.path], FAILED, "", outcome.error, done, total)
                    else:
                        captioned += 1
                        yield ImageCaptioned(rel_of[outcome.path], CAPTIONED, written[outcome.path], "", done, total)
            caption_seconds = time.monotonic() - t0
        stopped = done < total
    kept = plan.count(KEEP)
    yield CaptionFinished(
        folder=str(request.folder),
        images_found=total,
        captioned=captioned,
        kept=kept,
        failed=failed,
        seconds=time.monotonic() - start,
        images_per_second=captioned / caption_seconds if caption_seconds > 0 else 0.0,
        format=plan.format,
        written_to=writer.target,
        record_path=str(writer.record_path),
        stopped=stopped,
    )
