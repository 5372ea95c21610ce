"""What a folder captioning run reports, in order: planned, captioner ready, one per image, finished.

Plain frozen dataclasses: the CLI draws them, the daemon converts them to CaptionImagesResponse.
"""

from __future__ import annotations

from dataclasses import dataclass

CAPTIONED, KEPT, FAILED = "captioned", "kept", "failed"


@dataclass(frozen=True)
class CaptionPlanned:
    """The folder was read: how many images it has and what will happen to them.

    ``written_to`` is the CSV's path or the sidecar pattern; ``record_path`` the caption record.
    """

    folder: str
    images_found: int
    to_caption: int
    to_keep: int
    unusable: int
    format: str
    written_to: str
    record_path: str


@dataclass(frozen=True)
class CaptionerReady:
    """The captioner is loaded (``resident``: it already was) and captioning starts."""

    captioner: str
    source: str
    model_version: str
    model_id: str
    resident: bool
    seconds: float


@dataclass(frozen=True)
class ImageCaptioned:
    """One image's result: ``status`` is CAPTIONED (``caption`` is the new one), KEPT (``caption`` is
    the existing one) or FAILED (``error`` says why). ``done`` of ``total`` images have a result."""

    path: str
    status: str
    caption: str
    error: str
    done: int
    total: int


@dataclass(frozen=True)
class CaptionFinished:
    """The run ended (``stopped``: on request, before every image had a result).

    ``images_per_second`` counts captioned images over the captioning time (model loading excluded).
    """

    folder: str
    images_found: int
    captioned: int
    kept: int
    failed: int
    seconds: float
    images_per_second: float
    format: str
    written_to: str
    record_path: str
    stopped: bool = False


CaptionUpdate = CaptionPlanned | CaptionerReady | ImageCaptioned | CaptionFinished
