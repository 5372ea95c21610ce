"""Finding a captioner's model on disk and checking that it is complete, before anything loads it.

A model is a folder (or a Hugging Face id whose snapshot is already in the local cache: nothing is
ever downloaded). Checking the files first turns "loading failed somewhere inside transformers"
into a message naming the folder and exactly what it lacks. Importing this module is cheap.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from lorad.captioning.errors import CaptionModelError
from lorad.captioning.options import DEFAULT_MODELS, KINDS

# transformers' weight files: one file, or an index of shards.
WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)
# Older folders call the image processor's settings preprocessor_config.json; transformers 5 saves
# them inside processor_config.json.
PROCESSOR_FILES = ("preprocessor_config.json", "processor_config.json")
# Any one of these is a tokenizer transformers can load (fast JSON, WordPiece, BPE, SentencePiece).
TOKENIZER_FILES = (
    "tokenizer.json",
    "vocab.txt",
    "vocab.json",
    "tokenizer.model",
    "spiece.model",
    "sentencepiece.bpe.model",
)
TAGGER_MODEL = "model.onnx"
TAGGER_TAGS = "selected_tags.csv"

# config.json `model_type` values the sentence captioner ("blip") runs.
SENTENCE_MODEL_TYPES = ("blip", "blip-2", "git", "florence2")

_LABELS = {"blip": "image-to-text (BLIP)", "wd14": "WD14 tagger", "clip": "CLIP"}
_LAYOUT_HINTS = {
    "blip": "An image-to-text model folder as transformers saves it (e.g. a download of "
    "Salesforce/blip-image-captioning-large) holds config.json, model.safetensors, "
    "preprocessor_config.json and the tokenizer files.",
    "wd14": "A WD14 tagger folder (e.g. a download of SmilingWolf/wd-v1-4-convnext-tagger-v2) holds "
    "model.onnx and selected_tags.csv.",
    "clip": "A CLIP model folder as transformers saves it (e.g. a download of openai/clip-vit-large-patch14) "
    "holds config.json, model.safetensors, preprocessor_config.json, vocab.json and merges.txt.",
}
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


def folder_problems(kind: str, folder: Path) -> list[str]:
    """What keeps ``folder`` from being a model of ``kind``, as short phrases ([] when complete).

    Only files are checked (names, and the ``model_type`` in config.json); weights are not read.
    """
    if kind not in KINDS:
        raise ValueError(f"unknown captioner kind {kind!r}")
    if kind == "wd14":
        needed = (
            (TAGGER_MODEL, "the ONNX tagger network"),
            (TAGGER_TAGS, "the tag list, columns tag_id,name,category,count"),
        )
        return [f"it lacks {name} ({what})" for name, what in needed if not (folder / name).is_file()]
    problems = []
    if not any((folder / name).is_file() for name in WEIGHT_FILES):
        problems.append("it lacks model.safetensors (the weights; pytorch_model.bin or a shard index also do)")
    if not any((folder / name).is_file() for name in PROCESSOR_FILES):
        problems.append("it lacks preprocessor_config.json (how images are resized and normalised)")
    if not any((folder / name).is_file() for name in TOKENIZER_FILES):
        problems.append("it lacks its tokenizer (tokenizer.json, vocab.txt, or vocab.json with merges.txt)")
    model_type, config_problem = _model_type(folder)
    if config_problem:
        problems.insert(0, config_problem)
    elif kind == "blip" and model_type not in SENTENCE_MODEL_TYPES:
        problems.insert(
            0,
            f"its config.json says model_type {model_type!r}, which is not an image-to-text "
            f"model lorad runs ({', '.join(SENTENCE_MODEL_TYPES)})",
        )
    elif kind == "clip" and model_type != "clip":
        problems.insert(0, f"its config.json says model_type {model_type!r}, not 'clip'")
    return problems


def _model_type(folder: Path) -> tuple[str, str]:
    """(model_type, "") from config.json, or ("", the problem)."""
    path = folder / "config.json"
    if not path.is_file():
        return "", "it lacks config.json (the model's architecture)"
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as err:
        return "", f"its config.json cannot be read ({err})"
    except json.JSONDecodeError as err:
        return "", f"its config.json is not valid JSON (line {err.lineno}: {err.msg})"
    if not isinstance(config, dict) or not isinstance(config.get("model_type"), str):
        return "", "its config.json names no model_type"
    return config["model_type"], ""


def resolve_captioner_model(kind: str, model: str, *, base_dir: Path | None, key: str) -> Path:
    """The absolute folder of the ``kind`` model named by ``model``, checked complete.

    ``model`` is a folder (relative paths resolve against ``base_dir``, else the current folder),
    a Hugging Face id already in the local cache, or "" for the kind's default id
    (:data:`DEFAULT_MODELS`). ``key`` is how the caller calls the setting (``captioner_model``,
    ``--model``); every :class:`CaptionModelError` names it, the path, and what is missing.
    """
    name = model.strip() or DEFAULT_MODELS[kind]
    label = _LABELS[kind]
    path = Path(name).expanduser()
    if not path.is_absolute():
        path = (base_dir or Path.cwd()) / path
    if path.exists():
        folder = path.resolve()
    elif _HUB_ID.fullmatch(name) and (snapshot := _cached_snapshot(name)) is not None:
        folder = snapshot
    elif _HUB_ID.fullmatch(name):
        default = "" if model.strip() else f" (no model was named, so the {kind} default was tried)"
        raise CaptionModelError(
            f"`{key}`: {name!r} is neither a folder ({path}) nor a model in the local Hugging Face cache{default}",
            f"lorad never downloads models: download it once (`hf download {name}`), or set `{key}` to a "
            f"{label} model folder. {_LAYOUT_HINTS[kind]}",
        )
    else:
        raise CaptionModelError(
            f"`{key}`: {path} does not exist", f"Set `{key}` to a {label} model folder. {_LAYOUT_HINTS[kind]}"
        )
    if not folder.is_dir():
        raise CaptionModelError(
            f"`{key}`: {folder} is a file, not a {label} model folder",
            f"Name the folder that holds it. {_LAYOUT_HINTS[kind]}",
        )
    problems = folder_problems(kind, folder)
    if problems:
        raise CaptionModelError(
            f"`{key}`: {folder} is not a complete {label} model folder: {'; '.join(problems)}", _LAYOUT_HINTS[kind]
        )
    return folder


def _cached_snapshot(repo_id: str) -> Path | None:
    """The local snapshot folder of ``repo_id`` if the Hugging Face cache has it, else None."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError

    try:
        return Path(snapshot_download(repo_id, local_files_only=True))
    except (LocalEntryNotFoundError, HFValidationError, OSError, ValueError):
        return None
