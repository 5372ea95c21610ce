"""The captioner kinds, their default models, and the options that shape their captions.

Options are applied per call, not at load time, so one resident model serves requests with
different settings. Importing this module is cheap (no torch).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from lorad.config.limits import shown
from lorad.config.schema import MAX_CAPTION_BATCH, MAX_CAPTION_BEAMS, MAX_CAPTION_TOKENS, MAX_CAPTION_TOP_K
from lorad.errors import ConfigProblem

# blip: sentences from an image-to-text model (BLIP, and the other families transformers loads
# natively: BLIP-2, GIT, Florence-2); wd14: booru tags from a WD14 ONNX tagger; clip: phrases of a
# vocabulary ranked by a CLIP model.
KINDS = ("blip", "wd14", "clip")

# What each kind uses when no model is named: a Hugging Face id, used only if it is already in the
# local cache (lorad never downloads). These are the models kohya's scripts and most guides use.
DEFAULT_MODELS = {
    "blip": "Salesforce/blip-image-captioning-large",
    "wd14": "SmilingWolf/wd-v1-4-convnext-tagger-v2",
    "clip": "openai/clip-vit-large-patch14",
}

# Where captions go: "auto" follows what the folder already uses (see lorad.captioning.folder).
FORMATS = ("auto", "csv", "txt")

DEFAULT_BATCH_SIZE = 8
# A caption prompt is a few words ("a photo of"); a long one only costs memory in every batch.
MAX_PROMPT_CHARS = 1000


@dataclass(frozen=True)
class CaptionOptions:
    """How captions are made. Each option is read only by the kinds named in its comment.

    ``max_length``, ``num_beams``, ``prompt`` (blip): at most that many new tokens, beam search
    width (1 = greedy), and a prefix the caption continues ("a photo of"; Florence-2 reads it as
    its task token, e.g. "<DETAILED_CAPTION>").
    ``general_threshold``, ``character_threshold``, ``exclude_tags`` (wd14): the lowest score a
    general or character tag needs to be kept, and tags never written (either spelling, with
    underscores or spaces).
    ``vocabulary``, ``top_k`` (clip): a phrase file (None: the built-in one) and how many phrases
    each of its sections contributes when the section does not say.
    """

    max_length: int = 75
    num_beams: int = 1
    prompt: str = ""
    general_threshold: float = 0.35
    character_threshold: float = 0.85
    exclude_tags: tuple[str, ...] = ()
    vocabulary: Path | None = None
    top_k: int = 3


def option_problems(
    options: CaptionOptions, *, batch_size: int, names: Mapping[str, str] | None = None
) -> list[ConfigProblem]:
    """Every out-of-range option, each naming its key (``names`` maps a field to the caller's
    spelling of it, e.g. ``max_length`` → ``--max-length``)."""
    names = names or {}
    problems = []

    def bad(field: str, value: object, fix: str) -> None:
        problems.append(ConfigProblem(names.get(field, field), f"got {shown(value)}", fix))

    if not 1 <= batch_size <= MAX_CAPTION_BATCH:
        bad("batch_size", batch_size, f"use 1 to {MAX_CAPTION_BATCH} images per batch")
    if not 1 <= options.max_length <= MAX_CAPTION_TOKENS:
        bad("max_length", options.max_length, f"use 1 to {MAX_CAPTION_TOKENS} tokens")
    if not 1 <= options.num_beams <= MAX_CAPTION_BEAMS:
        bad("num_beams", options.num_beams, f"use 1 (greedy) to {MAX_CAPTION_BEAMS} beams")
    for field in ("general_threshold", "character_threshold"):
        value = getattr(options, field)
        if not (math.isfinite(value) and 0.0 <= value <= 1.0):
            bad(field, value, "use a score between 0 and 1, e.g. 0.35")
    if not 1 <= options.top_k <= MAX_CAPTION_TOP_K:
        bad("top_k", options.top_k, f"keep 1 to {MAX_CAPTION_TOP_K} phrases per section")
    if len(options.prompt) > MAX_PROMPT_CHARS:
        bad("prompt", options.prompt, f"use at most {MAX_PROMPT_CHARS} characters")
    if options.vocabulary is not None and not options.vocabulary.is_file():
        problems.append(
            ConfigProblem(
                names.get("vocabulary", "vocabulary"),
                f"{options.vocabulary} is not a file",
                "name a text file with one phrase per line, or leave it out for the built-in vocabulary",
            )
        )
    return problems
