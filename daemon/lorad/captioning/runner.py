"""Running a captioner over image files: batches of similar size, one outcome per image.

A file that cannot be read becomes that image's error; the rest of its batch is captioned. A batch
the captioner itself fails on becomes an error for each of its images; the next batch goes on.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from lorad.captioning.captioner import Captioner
from lorad.captioning.images import UnreadableImage, image_size, open_rgb, plan_batches
from lorad.captioning.options import CaptionOptions

log = logging.getLogger("lorad.captioning")

EMPTY_CAPTION = "the captioner gave no caption (a tagger: no tag reached its threshold)"


@dataclass(frozen=True)
class CaptionOutcome:
    """What became of one image: its caption (one line), or why it has none (``error`` not empty)."""

    path: Path
    caption: str = ""
    error: str = ""


def caption_images(
    captioner: Captioner,
    paths: Sequence[Path],
    options: CaptionOptions,
    *,
    batch_size: int,
    should_stop: Callable[[], bool] | None = None,
) -> Iterator[list[CaptionOutcome]]:
    """Caption ``paths``, yielding the outcomes of each batch as soon as it is done.

    Images whose header cannot be read are yielded first, as one list of errors; the others are
    grouped by :func:`~lorad.captioning.images.plan_batches` into batches of at most ``batch_size``,
    decoded (a decode failure is that image's error) and captioned in one call each. Every path
    gets exactly one outcome, unless ``should_stop()`` turns True: it is asked before each batch,
    and the iteration then ends early. A caption is made one line (runs of whitespace → one space);
    an empty one is an error. When the captioner raises on a batch, each of its images gets that
    error (logged with its traceback) and the next batch is captioned.
    """
    readable: list[Path] = []
    sizes: list[tuple[int, int]] = []
    unreadable: list[CaptionOutcome] = []
    for path in paths:
        try:
            sizes.append(image_size(path))
        except UnreadableImage as err:
            unreadable.append(CaptionOutcome(path, error=str(err)))
            continue
        readable.append(path)
    if unreadable:
        yield unreadable
    for batch in plan_batches(sizes, batch_size):
        if should_stop is not None and should_stop():
            return
        outcomes: list[CaptionOutcome] = []
        decoded, images = [], []
        for index in batch:
            try:
                images.append(open_rgb(readable[index], min_side=captioner.input_size))
            except UnreadableImage as err:
                outcomes.append(CaptionOutcome(readable[index], error=str(err)))
                continue
            decoded.append(readable[index])
        if images:
            try:
                texts = captioner.caption(images, options)
                if len(texts) != len(images):  # a captioner bug, never the user's doing
                    raise RuntimeError(f"gave {len(texts)} captions for {len(images)} images")
            except Exception as err:  # one bad batch must not lose the captions of every other
                log.exception("%s captioner failed on %s", captioner.kind, ", ".join(p.name for p in decoded))
                texts = []
                reason = f"the {captioner.kind} captioner failed on this image's batch ({type(err).__name__}: {err})"
                outcomes += [CaptionOutcome(path, error=reason.splitlines()[0]) for path in decoded]
            for path, text in zip(decoded, texts, strict=False):
                line = " ".join(text.split())
                outcomes.append(
                    CaptionOutcome(path, caption=line) if line else CaptionOutcome(path, error=EMPTY_CAPTION)
                )
            for image in images:
                image.close()
        yield outcomes
