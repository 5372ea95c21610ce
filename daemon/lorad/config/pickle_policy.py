"""Pickle weights load only with the user's opt-in, on every path that loads a model.

``.ckpt``/``.pt``/``.pth``/``.bin`` files are Python pickles: loading one can run code. lorad reads
them only with ``allow_pickle`` (and then with ``torch.load(weights_only=True)``): a single-file SD
checkpoint, a diffusers or transformers folder whose weights exist only as ``*.bin``, a causal LM,
a captioner. This module answers, from file names alone (nothing is read), whether a model needs
pickle, so configs are refused at the boundary; the loaders enforce the same rule again
(``use_safetensors=True`` unless allowed), so no path depends on the check having run.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from lorad.errors import ConfigProblem

PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")
# Weight files diffusers and transformers load from a folder: one file, or shards of one.
_PICKLE_WEIGHTS = re.compile(r"^(diffusion_pytorch_model|pytorch_model)([-.][\w.-]+)?\.bin$")
PICKLE_FIX = (
    "convert it to .safetensors (which cannot carry code), or set `allow_pickle: true` if you trust the "
    "file; lorad then reads it with torch.load(weights_only=True)"
)


def pickle_weights(model: str | os.PathLike[str]) -> str | None:
    """The pickle file ``model`` would be loaded from (a path, or a folder-relative name), or None
    when it loads without pickle (safetensors, ONNX, or a hub id that is not in the local cache)."""
    path = Path(model)
    if not path.is_absolute():
        path = _cached_snapshot(str(model)) or path
    try:
        if path.suffix.lower() in PICKLE_SUFFIXES and not path.is_dir():
            return str(path)
        if not path.is_dir():
            return None
        for folder in [path, *sorted(p for p in path.iterdir() if p.is_dir() and not p.name.startswith("."))]:
            names = os.listdir(folder)
            pickles = sorted(n for n in names if _PICKLE_WEIGHTS.match(n))
            if pickles and not any(n.endswith(".safetensors") for n in names):
                return (folder / pickles[0]).relative_to(path).as_posix()
    except OSError:
        return None  # unreadable: the loader reports that itself
    return None


def pickle_problem(key: str, model: str, allow_pickle: bool) -> ConfigProblem | None:
    """A problem naming ``key`` when ``model`` needs pickle and ``allow_pickle`` is off, else None."""
    if allow_pickle or not model:
        return None
    found = pickle_weights(model)
    if found is None:
        return None
    what = f"{model} is a pickle file" if found == str(Path(model)) else f"{model} has only pickle weights ({found})"
    return ConfigProblem(key, what, PICKLE_FIX)


def needs_pickle(model: str, allow_pickle: bool) -> bool:
    """Whether loading ``model`` uses its pickle permission: part of a resident model's identity
    only then, so a safetensors model loaded with and without the permission is one model."""
    return allow_pickle and pickle_weights(model) is not None


def _cached_snapshot(repo_id: str) -> Path | None:
    """The local snapshot folder of a hub id, never downloading."""
    if repo_id.count("/") != 1:
        return None
    try:
        from huggingface_hub import try_to_load_from_cache

        for name in ("config.json", "model_index.json"):
            found = try_to_load_from_cache(repo_id, name)
            if isinstance(found, str):
                return Path(found).parent
    except Exception:  # an id huggingface_hub rejects is simply not in the cache
        return None
    return None
