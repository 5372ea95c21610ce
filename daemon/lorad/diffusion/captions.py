"""Captions in an image family's run, turned into the text-encoder outputs a step needs.

Every caption a run uses follows from its seed (the epoch plan, and each sample's caption transforms,
are seeded from (seed, epoch, position)). So before the first step a run can list every string it
will ever encode, encode each once into the text-encoder cache, and then run no text encoder at all.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import replace
from pathlib import Path

import torch
from torch import nn

from lorad.config import TrainConfig
from lorad.diffusion.text_cache import BatchEncoder, TextEncoderCache
from lorad.events import EventSink, LogLine
from lorad.paths import default_cache_dir
from lorad.training.family import Scalars

#: Captions of a step -> the text-encoder outputs its loss needs (name -> tensor, batch first, on the device).
Conditioning = Callable[[Sequence[str]], dict[str, torch.Tensor]]

# Entries kept in memory at once; the rest are read back from disk (an SDXL entry is ~0.3 MB).
MAX_ENTRIES_IN_MEMORY = 2048
# More distinct captions than this (long runs with shuffle_caption/dropout on large datasets) are not
# cached: the cache would fill gigabytes of disk for entries each read a few times.
MAX_CACHED_CAPTIONS = 10_000


def run_epochs(config: TrainConfig, micro_batches_per_epoch: int) -> int:
    """How many epochs (the last maybe partial) the loop runs for ``config``, as it counts them."""
    steps_per_epoch = math.ceil(micro_batches_per_epoch / config.gradient_accumulation_steps)
    total_steps = config.max_train_steps or config.epochs * steps_per_epoch
    return math.ceil(total_steps / steps_per_epoch)


def text_cache_dir(config: TrainConfig) -> Path:
    """Where a run keeps text-encoder outputs: ``cache_dir``/text, else lorad's cache folder's."""
    return (config.cache_dir or default_cache_dir()) / "text"


def caption_conditioning(
    config: TrainConfig,
    *,
    planned: Iterable[str],
    encode: BatchEncoder,
    identity: Callable[[], str],
    trainable: bool,
    device: torch.device,
    on_event: EventSink,
    scalars: Scalars,
) -> Conditioning:
    """How a run turns a step's captions into text-encoder outputs.

    ``planned`` yields every caption of every step the run will take (duplicates are fine; it is only
    consumed when caching); ``encode`` runs the text encoder(s) on a list of captions; ``identity()``
    names them for the cache (called only when caching). Trained encoders (``trainable``) run at every
    step, with autograd. Frozen ones with ``cache_text_encoder_outputs`` off also run at every step,
    without it. Otherwise every planned caption is encoded now into the on-disk cache (or found
    there), and a step only reads the cache: the caller may then move the encoders off the device.
    """
    if trainable:
        return lambda captions: dict(encode(list(captions)))
    if not config.cache_text_encoder_outputs:

        def frozen(captions: Sequence[str]) -> dict[str, torch.Tensor]:
            with torch.no_grad():
                return dict(encode(list(captions)))

        return frozen

    t0 = time.monotonic()
    captions = list(dict.fromkeys(planned))
    if len(captions) > MAX_CACHED_CAPTIONS:
        on_event(
            LogLine(
                f"text encoder outputs: not cached: the run uses {len(captions)} distinct captions (more than "
                f"{MAX_CACHED_CAPTIONS}; shuffle_caption/caption_dropout over many epochs); the text encoder runs "
                "at every step",
                level="warning",
            )
        )
        scalars.summary["text_encoder_outputs"] = {"distinct_captions": len(captions), "cached": False}
        return caption_conditioning(
            replace(config, cache_text_encoder_outputs=False),
            planned=(),
            encode=encode,
            identity=identity,
            trainable=False,
            device=device,
            on_event=on_event,
            scalars=scalars,
        )
    cache = TextEncoderCache(text_cache_dir(config), identity(), max_in_memory=MAX_ENTRIES_IN_MEMORY)
    stats = cache.pre_encode(captions, encode)
    seconds = time.monotonic() - t0
    distinct = stats.encoded + stats.cached
    scalars.summary["text_encoder_outputs"] = {
        "distinct_captions": distinct,
        "encoded": stats.encoded,
        "cached": stats.cached,
        "seconds": seconds,
    }
    on_event(
        LogLine(
            f"text encoder outputs: {distinct} distinct captions, {stats.encoded} encoded now, "
            f"{stats.cached} from the cache ({seconds:.1f} s)"
        )
    )
    return lambda captions: cache.batch(captions, device=device)


def move_off_device(modules: Sequence[nn.Module], device: torch.device) -> None:
    """Free ``modules``' accelerator memory for the rest of a run by moving them to the CPU (a no-op on
    the CPU); the family's ``restore`` moves them back for the next job, unchanged (moves are exact)."""
    if device.type != "cpu":
        for module in modules:
            module.to("cpu")
