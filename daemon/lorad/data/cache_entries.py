"""Cache entries on disk: one safetensors file of named tensors each, written atomically, read back
only when its metadata says it is the entry asked for. Used by the latent and text-encoder caches.

A cache folder carries a ``CACHEDIR.TAG`` (https://bford.info/cachedir/): backup tools skip it, and
the dataset scan skips it should ``cache_dir`` sit inside ``train_data_dir``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from lorad.atomic import write_text_atomic, write_with_atomic
from lorad.data.dataset import CACHEDIR_TAG

SUFFIX = ".safetensors"


def open_cache_dir(folder: Path, what: str) -> None:
    """Create ``folder`` if needed and tag it as a cache of ``what`` ("latent cache", ...).

    Writing the tag doubles as the check that the folder is writable, up front rather than after
    the first entry has been computed. Raises OSError when it is not.
    """
    folder.mkdir(parents=True, exist_ok=True)
    tag = folder / CACHEDIR_TAG
    if not tag.is_file():
        write_text_atomic(
            tag,
            "Signature: 8a477f597d28d172789f06886806bc55\n"
            f"# This file is a cache directory tag created by lorad ({what}).\n"
            "# For information about cache directory tags, see https://bford.info/cachedir/\n",
        )


def write_entry(path: Path, tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str]) -> None:
    """Write ``tensors`` (contiguous, not sharing storage) with ``metadata`` to ``path`` atomically.

    Raises OSError when the file cannot be written.
    """
    write_with_atomic(path, lambda tmp: save_file(dict(tensors), str(tmp), metadata=dict(metadata)))


def read_entry(path: Path, expected: Mapping[str, str]) -> dict[str, torch.Tensor] | None:
    """The tensors in ``path`` if it exists and its metadata holds every ``expected`` key and value,
    else None. A file that cannot be read or is another entry's (corrupt, truncated, another key or
    format version) is deleted, so the next write replaces it."""
    if not path.is_file():
        return None
    try:
        with safe_open(str(path), framework="pt") as fh:
            metadata = fh.metadata() or {}
        if any(metadata.get(k) != v for k, v in expected.items()):
            raise ValueError("entry metadata does not match its key")
        entry = load_file(str(path))
        if not entry:
            raise ValueError("entry holds no tensors")
    # safetensors raises its own SafetensorError, OSError or others for damaged files; any failure
    # here only means "compute it again".
    except Exception:
        with contextlib.suppress(OSError):
            path.unlink(missing_ok=True)
        return None
    return entry
