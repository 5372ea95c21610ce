"""Finding and opening the CLIP tokenizer of an SD 1.x/2.x or SDXL model, offline.

Order: ``tokenizer_path``; the model's own ``tokenizer/`` (folder models) or ``model_config_dir``'s;
then the local Hugging Face cache of the repos that usually hold it. Finding is cheap and runs
before the weights are loaded, so a missing tokenizer fails fast.
"""

from __future__ import annotations

import logging
from pathlib import Path

from huggingface_hub import try_to_load_from_cache
from transformers import CLIPTextModel, CLIPTokenizer, PreTrainedTokenizerBase

from lorad.errors import ModelLoadError

log = logging.getLogger(__name__)

# Where the usual tokenizers live in the Hugging Face cache: (repo id, subfolder), first = preferred.
HUB_TOKENIZERS = {
    "sd1": (
        ("openai/clip-vit-large-patch14", ""),
        ("stable-diffusion-v1-5/stable-diffusion-v1-5", "tokenizer"),
        ("runwayml/stable-diffusion-v1-5", "tokenizer"),
    ),
    "sd2": (
        ("stabilityai/stable-diffusion-2-1", "tokenizer"),
        ("stabilityai/stable-diffusion-2-1-base", "tokenizer"),
        ("stabilityai/stable-diffusion-2", "tokenizer"),
    ),
    # SDXL's two tokenizers share CLIP's vocabulary and merges; only their pad tokens differ.
    "sdxl": (
        ("stabilityai/stable-diffusion-xl-base-1.0", "tokenizer"),
        ("openai/clip-vit-large-patch14", ""),
        ("laion/CLIP-ViT-bigG-14-laion2B-39B-b160k", ""),
    ),
}
_FAMILY = {"sd1": "SD 1.x", "sd2": "SD 2.x", "sdxl": "SDXL"}


def has_tokenizer_files(folder: Path) -> bool:
    """True if ``folder`` holds a CLIP tokenizer: vocab.json and merges.txt, or tokenizer.json."""
    pair = (folder / "vocab.json").is_file() and (folder / "merges.txt").is_file()
    return pair or (folder / "tokenizer.json").is_file()


def _cached_tokenizer_dir(repo_id: str, subfolder: str) -> Path | None:
    """The cached folder with ``repo_id``'s tokenizer, if both vocab.json and merges.txt are there."""
    found = []
    for name in ("vocab.json", "merges.txt"):
        hit = try_to_load_from_cache(repo_id, f"{subfolder}/{name}" if subfolder else name)
        if not isinstance(hit, str):  # None, or the marker for "known to be missing"
            return None
        found.append(Path(hit).parent)
    return found[0] if found[0] == found[1] else None


def find_tokenizer_dir(
    version: str, where: str, *, tokenizer_path: Path | None, local_dirs: list[Path]
) -> tuple[Path, str]:
    """The tokenizer folder to use and a phrase naming where it came from (for later errors).

    Raises ModelLoadError naming ``tokenizer_path`` when it is given but holds no tokenizer, and
    naming ``tokenizer_path``/``model_config_dir`` as the fix when no source has one.
    """
    if tokenizer_path is not None:
        source = f"`tokenizer_path` {str(tokenizer_path)!r}"
        if not has_tokenizer_files(tokenizer_path):
            raise ModelLoadError(
                f"{source} is not a folder with a CLIP tokenizer (vocab.json and merges.txt, or tokenizer.json)",
                "Point `tokenizer_path` at the tokenizer/ folder of an SD model of the same family.",
            )
        return tokenizer_path, source
    looked = []
    for folder in local_dirs:
        looked.append(str(folder))
        if has_tokenizer_files(folder):
            return folder, f"{where}: the tokenizer in {folder}"
    for repo_id, subfolder in HUB_TOKENIZERS[version]:
        looked.append(f"the Hugging Face cache of {repo_id}")
        folder = _cached_tokenizer_dir(repo_id, subfolder)
        if folder is not None:
            log.info("%s: using the cached tokenizer of %s", where, repo_id)
            return folder, f"the cached tokenizer of {repo_id}"
    repo_id, subfolder = HUB_TOKENIZERS[version][0]
    names = ("vocab.json", "merges.txt", "tokenizer_config.json", "special_tokens_map.json")
    files = " ".join(f"{subfolder}/{n}" if subfolder else n for n in names)
    family = _FAMILY[version]
    raise ModelLoadError(
        f"{where}: no CLIP tokenizer found for this {family} model (a single-file checkpoint carries "
        f"none); looked in: {'; '.join(looked)}",
        f"Set `tokenizer_path` to a folder with the tokenizer files (vocab.json and merges.txt), e.g. "
        f"the tokenizer/ folder of any {family} diffusers model, or set `model_config_dir` to a "
        f"diffusers-layout folder that has tokenizer/. Or fetch it once into the Hugging Face cache: "
        f"`hf download {repo_id} {files}`.",
    )


def open_tokenizer(folder: Path, text_encoder: CLIPTextModel, source: str) -> PreTrainedTokenizerBase:
    """Load the CLIP tokenizer in ``folder`` and check that it fits ``text_encoder``.

    ``model_max_length`` is capped at the text encoder's positions (77 for SD): a folder without
    tokenizer_config.json otherwise reports an effectively infinite length, and padding to it
    would break.
    """
    try:
        tokenizer = CLIPTokenizer.from_pretrained(str(folder), local_files_only=True)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ModelLoadError(f"{source} cannot be loaded ({exc})", "Check the tokenizer files.") from exc
    positions = text_encoder.config.max_position_embeddings
    if tokenizer.model_max_length > positions:
        tokenizer.model_max_length = positions
    vocab_size = text_encoder.config.vocab_size
    if len(tokenizer) > vocab_size:
        raise ModelLoadError(
            f"{source} has {len(tokenizer)} tokens but the text encoder only {vocab_size}; "
            "it belongs to a different model",
            "Use the tokenizer of this model's family (`tokenizer_path` / `model_config_dir`).",
        )
    return tokenizer
