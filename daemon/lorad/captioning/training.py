"""Captions for a training run: the ``caption_missing`` hook that ``train_sd_lora`` calls.

``scan_dataset`` calls the hook once with every usable image that has no caption. With a
``captioner`` configured, the hook captions them (the model is provided by the caller: loaded for
the run, or the daemon's resident one), writes the captions where the config reads them from
(``metadata_path``, else the sidecars) so the next run reuses them, records them as generated, and
returns them; the data report counts them as ``captions_generated``. Without one, the hook only
says which images lack captions and how to fix it; the data report lists them as skipped.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Mapping
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path

from lorad.captioning.captioner import CaptionerKey, CaptionerProvider, captioner_placement, load_fresh_captioner
from lorad.captioning.model_folder import resolve_captioner_model
from lorad.captioning.options import CaptionOptions
from lorad.captioning.runner import caption_images
from lorad.captioning.user_files import write_user_text
from lorad.captioning.writer import CaptionWriter
from lorad.config import TrainConfig
from lorad.errors import DataError, TrainingInterrupted
from lorad.events import EventSink, LogLine

CaptionFiller = Callable[[list[Path]], Mapping[Path, str]]
# How often a long captioning pass reports how far it got.
PROGRESS_SECONDS = 10.0
_LISTED = 5  # images named in the "no caption" warning before "and N more"


def caption_options(config: TrainConfig) -> CaptionOptions:
    """The config's caption_* keys as captioner options."""
    return CaptionOptions(
        max_length=config.caption_max_length,
        num_beams=config.caption_beams,
        prompt=config.caption_prompt,
        general_threshold=config.caption_general_threshold,
        character_threshold=config.caption_character_threshold,
        exclude_tags=config.caption_exclude_tags,
        vocabulary=config.caption_vocabulary,
        top_k=config.caption_top_k,
    )


def prepare_metadata_csv(config: TrainConfig) -> bool:
    """Create ``metadata_path`` as an empty ``file,caption`` CSV when a captioner will fill it and it
    does not exist yet (the scan reads it before the hook runs). Returns True when it was created."""
    path = config.metadata_path
    if config.captioner is None or path is None or path.exists():
        return False
    try:
        write_user_text(path, "file,caption\n")
    except OSError as err:
        raise DataError(
            f"`metadata_path`: cannot create {path} for the generated captions ({err.strerror or err})",
            "Make its folder writable, or point `metadata_path` at a folder you can write to.",
        ) from err
    return True


def caption_filler(
    config: TrainConfig,
    *,
    on_event: EventSink,
    provide: CaptionerProvider = load_fresh_captioner,
    stop: threading.Event | None = None,
    exclusive: Callable[[Path], AbstractContextManager[object]] | None = None,
) -> CaptionFiller:
    """The ``caption_missing`` hook for ``train_sd_lora(config)``.

    Building it already creates a missing ``metadata_path`` (see :func:`prepare_metadata_csv`).
    The hook resolves the captioner's model only when an image needs a caption, then raises
    CaptionModelError (naming ``captioner_model`` and what is missing) if it is unusable.
    ``exclusive(folder)`` (the daemon's) holds the folder while captions are written there.
    Setting ``stop`` ends captioning after the current batch with TrainingInterrupted; the captions
    written so far stay.
    """
    if config.captioner is None:
        return lambda paths: _advise(paths, config, on_event)
    prepare_metadata_csv(config)

    def fill(paths: list[Path]) -> Mapping[Path, str]:
        kind, root = config.captioner or "", config.train_data_dir
        model = resolve_captioner_model(kind, config.captioner_model, base_dir=None, key="captioner_model")
        device, dtype = captioner_placement(kind, config.device)
        on_event(LogLine(f"{len(paths)} image{_s(len(paths))} without a caption: captioning with {kind} ({model})"))
        captions: dict[Path, str] = {}
        failures: list[str] = []
        start = last_report = time.monotonic()
        with (exclusive or _no_lock)(root):
            writer = CaptionWriter(
                root,
                format="csv" if config.metadata_path else "txt",
                captioner=kind,
                model=str(model),
                csv_path=config.metadata_path,
                caption_extension=config.caption_extension,
                trigger_word=config.trigger_word or "",
            )
            outside = [path for path in paths if not writer.writable(path)]
            if outside:
                on_event(
                    LogLine(
                        f"not captioned: {len(outside)} image{_s(len(outside))} whose caption file would be outside "
                        f"{root} (linked folders): caption {'it' if len(outside) == 1 else 'them'} where "
                        f"{'it lives' if len(outside) == 1 else 'they live'}",
                        level="warning",
                    )
                )
                paths = [path for path in paths if path not in set(outside)]
            with provide(CaptionerKey(kind, str(model), device, dtype, allow_pickle=config.allow_pickle)) as provided:
                batches = caption_images(
                    provided.captioner,
                    paths,
                    caption_options(config),
                    batch_size=config.caption_batch_size,
                    should_stop=stop.is_set if stop is not None else None,
                )
                for outcomes in batches:
                    captions.update(writer.write({o.path: o.caption for o in outcomes if not o.error}))
                    failures += [f"{o.path.relative_to(root).as_posix()}: {o.error}" for o in outcomes if o.error]
                    if time.monotonic() - last_report >= PROGRESS_SECONDS:
                        last_report = time.monotonic()
                        on_event(LogLine(f"captioned {len(captions) + len(failures)}/{len(paths)} images"))
        seconds = time.monotonic() - start
        if stop is not None and stop.is_set() and len(captions) + len(failures) < len(paths):
            raise TrainingInterrupted(
                f"stopped while captioning ({len(captions)} of {len(paths)} images captioned)",
                "the captions written so far are kept; run the same job again to caption the rest and train",
            )
        for failure in failures:
            on_event(LogLine(f"not captioned: {failure}", level="warning"))
        on_event(
            LogLine(
                f"generated {len(captions)} caption{_s(len(captions))} with {kind} in {seconds:.1f}s; "
                f"written to {writer.target}, recorded as generated in {writer.record_path.name}"
            )
        )
        return captions

    return fill


def _advise(paths: list[Path], config: TrainConfig, on_event: EventSink) -> Mapping[Path, str]:
    """The hook without a captioner: name the uncaptioned images and the ways to caption them."""
    root = config.train_data_dir
    names = [path.relative_to(root).as_posix() for path in paths[:_LISTED]]
    more = f" and {len(paths) - _LISTED} more" if len(paths) > _LISTED else ""
    have = "image has" if len(paths) == 1 else "images have"
    on_event(
        LogLine(
            f"{len(paths)} {have} no caption and will be skipped ({', '.join(names)}{more}): "
            f"caption them with `lorad caption {root}`, or set `captioner: blip` (or wd14, clip) in the config to "
            "caption them before training",
            level="warning",
        )
    )
    return {}


def _no_lock(folder: Path) -> AbstractContextManager[object]:
    return nullcontext()


def _s(count: int) -> str:
    return "" if count == 1 else "s"
