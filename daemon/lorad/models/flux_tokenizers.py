"""Finding and opening FLUX.1's two tokenizers (CLIP-L's BPE and T5's SentencePiece), offline.

Order for each: the config key (``clip_l_tokenizer`` / ``t5xxl_tokenizer``); the model folder's
``tokenizer/`` / ``tokenizer_2/``; ``model_config_dir``'s; then the local Hugging Face cache of the
repos that usually hold them. Finding is cheap and runs before any weight is read, so a missing
tokenizer fails in milliseconds, naming the key that fixes it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from huggingface_hub import try_to_load_from_cache
from transformers import CLIPTokenizer, PreTrainedTokenizerBase, T5TokenizerFast

from lorad.errors import ModelLoadError
from lorad.models.sd_tokenizer import has_tokenizer_files

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TokenizerKind:
    """What distinguishes the two tokenizers when searching and opening them."""

    key: str  # the config key that names a folder
    subfolder: str  # in a diffusers FLUX.1 folder
    name: str  # for messages
    files: tuple[tuple[str, ...], ...]  # any one of these sets of files makes a usable folder
    hub: tuple[tuple[str, str], ...]  # (repo id, subfolder) in the HF cache, preferred first


CLIP_L = TokenizerKind(
    key="clip_l_tokenizer",
    subfolder="tokenizer",
    name="CLIP-L tokenizer",
    files=(("vocab.json", "merges.txt"), ("tokenizer.json",)),
    hub=(
        ("openai/clip-vit-large-patch14", ""),
        ("black-forest-labs/FLUX.1-dev", "tokenizer"),
        ("black-forest-labs/FLUX.1-schnell", "tokenizer"),
    ),
)
T5XXL = TokenizerKind(
    key="t5xxl_tokenizer",
    subfolder="tokenizer_2",
    name="T5 tokenizer",
    files=(("tokenizer.json",), ("spiece.model",)),
    hub=(
        ("black-forest-labs/FLUX.1-dev", "tokenizer_2"),
        ("black-forest-labs/FLUX.1-schnell", "tokenizer_2"),
        ("google/t5-v1_1-xxl", ""),
    ),
)


def _has_files(folder: Path, kind: TokenizerKind) -> bool:
    if kind is CLIP_L:
        return has_tokenizer_files(folder)
    return any(all((folder / name).is_file() for name in names) for names in kind.files)


def _cached_dir(repo_id: str, subfolder: str, kind: TokenizerKind) -> Path | None:
    """The cached folder of ``repo_id`` holding one complete set of ``kind``'s files, if any."""
    for names in kind.files:
        hits = [try_to_load_from_cache(repo_id, f"{subfolder}/{n}" if subfolder else n) for n in names]
        if all(isinstance(hit, str) for hit in hits):
            folders = {Path(hit).parent for hit in hits}  # type: ignore[arg-type]
            if len(folders) == 1:
                return folders.pop()
    return None


def find_tokenizer(kind: TokenizerKind, *, explicit: Path | None, local_dirs: list[Path]) -> Path:
    """The folder of ``kind``'s tokenizer: ``explicit`` (the config key), else the first of ``local_dirs``
    that has the files, else the HF cache.

    Raises ModelLoadError naming ``kind.key`` when ``explicit`` lacks the files or nothing is found.
    """
    wanted = " or ".join(" and ".join(names) for names in kind.files)
    if explicit is not None:
        if not _has_files(explicit, kind):
            raise ModelLoadError(
                f"`{kind.key}` {str(explicit)!r} is not a folder with a {kind.name} ({wanted})",
                f"Point `{kind.key}` at the {kind.subfolder}/ folder of a FLUX.1 diffusers model.",
            )
        return explicit
    looked = []
    for folder in local_dirs:
        looked.append(str(folder))
        if _has_files(folder, kind):
            return folder
    for repo_id, subfolder in kind.hub:
        looked.append(f"the Hugging Face cache of {repo_id}")
        found = _cached_dir(repo_id, subfolder, kind)
        if found is not None:
            log.info("using the cached %s of %s", kind.name, repo_id)
            return found
    repo_id, subfolder = kind.hub[0]
    raise ModelLoadError(
        f"no {kind.name} found (single-file FLUX checkpoints carry none); looked in: {'; '.join(looked)}",
        f"Set `{kind.key}` to a folder with its files ({wanted}), e.g. the {kind.subfolder}/ folder of "
        f"FLUX.1-dev in diffusers layout, or fetch it once into the cache: "
        f"`hf download {repo_id} --include '{subfolder + '/' if subfolder else ''}*'`.",
    )


def open_clip_tokenizer(folder: Path, vocab_size: int) -> PreTrainedTokenizerBase:
    """CLIP-L's tokenizer from ``folder``, capped at 77 tokens and checked against the encoder's vocabulary."""
    return _open(CLIPTokenizer, folder, CLIP_L, vocab_size, max_length=77)


def open_t5_tokenizer(folder: Path, vocab_size: int, max_length: int) -> PreTrainedTokenizerBase:
    """T5's tokenizer from ``folder``; ``max_length`` is ``t5xxl_max_token_length`` (512 dev, 256 schnell)."""
    return _open(T5TokenizerFast, folder, T5XXL, vocab_size, max_length=max_length)


def _open(cls: type, folder: Path, kind: TokenizerKind, vocab_size: int, *, max_length: int) -> PreTrainedTokenizerBase:
    try:
        tokenizer = cls.from_pretrained(str(folder), local_files_only=True)
    except (OSError, ValueError, KeyError, TypeError, ImportError) as exc:
        hint = f"Check the files, or set `{kind.key}` to another copy."
        if kind is T5XXL and not (folder / "tokenizer.json").is_file():
            hint = (
                "This folder has only spiece.model; use one with tokenizer.json "
                f"(or `pip install sentencepiece`). {hint}"
            )
        raise ModelLoadError(f"the {kind.name} in {folder} cannot be loaded ({exc})", hint) from exc
    tokenizer.model_max_length = max_length
    if len(tokenizer) > vocab_size:
        raise ModelLoadError(
            f"the {kind.name} in {folder} has {len(tokenizer)} tokens but its text encoder only {vocab_size}; "
            "it belongs to a different model",
            f"Set `{kind.key}` to the tokenizer that belongs to this text encoder.",
        )
    return tokenizer
