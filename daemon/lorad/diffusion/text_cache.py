"""Text-encoder outputs cached in memory and on disk, so a frozen encoder runs once per caption string.

Family-independent: an entry is a small dict of named tensors for one caption, whatever the family
needs (SD 1.x/2.x: the hidden states; SDXL: hidden states and the pooled embedding; Flux: T5 hidden
states and the CLIP pooled embedding). The key is sha256 of (caption, encoder identity), where the
identity (:func:`text_encoder_identity`) covers the encoders' weights, the tokenizers and the
settings that change the output (max length, layer, ...): a different model, tokenizer or setting
misses, the same caption in any run or dataset hits.

Files are safetensors (read without pickle), written atomically, with the caption and identity in
their metadata so a file that is not this entry's is a miss. With shuffled captions or caption
dropout a run uses many distinct strings, but all of them follow from its seed (see
``prepare_caption``), so the run can :meth:`TextEncoderCache.pre_encode` every one before training
and free the encoders; a step then runs no text encoder at all.
"""

from __future__ import annotations

import hashlib
import json
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lorad.data.cache_entries import SUFFIX, open_cache_dir, read_entry, write_entry
from lorad.errors import OutputError
from lorad.models.sd_components import state_dict_digest

# Bumped when the file layout changes; files of another version are treated as misses.
FORMAT_VERSION = "1"

#: Encodes a batch of captions: name -> tensor with the batch on the first axis.
BatchEncoder = Callable[[list[str]], Mapping[str, torch.Tensor]]


@dataclass(frozen=True)
class EncodeStats:
    """What :meth:`TextEncoderCache.pre_encode` did: captions run through the encoders now, and
    captions already cached (in memory or on disk). Both count distinct caption strings."""

    encoded: int
    cached: int


def tokenizer_digest(tokenizer: Any) -> str:
    """Hex SHA-256 of what decides a tokenizer's ids: its class, vocabulary and merges (the whole
    backend model when it has one), special tokens, pad id, maximum length and sides; the same whatever
    the tokenizer was called with before."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        # A fast tokenizer's backend holds the padding and truncation its last call set (transformers sets them
        # per call): history, not identity, so they are left out; the settings that decide ids are in ``facts``.
        state = {k: v for k, v in json.loads(backend.to_str()).items() if k not in ("padding", "truncation")}
        model = json.dumps(state, sort_keys=True)
    else:
        model = json.dumps(sorted(tokenizer.get_vocab().items()))
    facts = {
        "class": type(tokenizer).__name__,
        "specials": {k: str(v) for k, v in sorted(tokenizer.special_tokens_map.items())},
        "pad_id": tokenizer.pad_token_id,
        "model_max_length": tokenizer.model_max_length,
        "padding_side": getattr(tokenizer, "padding_side", None),
        "truncation_side": getattr(tokenizer, "truncation_side", None),
    }
    digest = hashlib.sha256(json.dumps(facts, sort_keys=True).encode())
    digest.update(model.encode())
    return digest.hexdigest()


def text_encoder_identity(
    encoders: Sequence[nn.Module], tokenizers: Sequence[Any], settings: Mapping[str, object]
) -> str:
    """Hex SHA-256 naming what a cached text encoding depends on.

    ``encoders`` enter by their full state dict (names, shapes, dtypes and bytes: a model loaded in
    bf16 differs from fp32), ``tokenizers`` by :func:`tokenizer_digest`, and ``settings`` (JSON
    values: the family, max length, which layer, ...) as sorted JSON. Reads every weight once;
    callers holding a resident model should compute it once per model and settings.
    """
    digest = hashlib.sha256(f"lorad-text-encoders:{FORMAT_VERSION}\n".encode())
    for encoder in encoders:
        digest.update(state_dict_digest(encoder.state_dict()).encode() + b"\n")
    for tokenizer in tokenizers:
        digest.update(tokenizer_digest(tokenizer).encode() + b"\n")
    digest.update(json.dumps(dict(settings), sort_keys=True, default=str).encode())
    return digest.hexdigest()


class TextEncoderCache:
    """Text-encoder outputs keyed by caption for one encoder identity.

    ``cache_dir`` None keeps entries in memory only (all of them). Otherwise each entry is also
    written there as one safetensors file, atomically, so a later run finds it; ``max_in_memory``
    then bounds how many entries stay in memory (least recently used leave; they are read back
    from disk when needed). Raises :class:`OutputError` naming the folder and the ``cache_dir`` key
    if it cannot be created or written.

    Counters: ``encoded`` counts captions run through an encoder by :meth:`pre_encode`, ``loaded``
    entries read from disk. Not thread-safe; use one instance per run.
    """

    def __init__(self, cache_dir: Path | None, identity: str, *, max_in_memory: int | None = None) -> None:
        if max_in_memory is not None and max_in_memory < 1:
            raise ValueError(f"max_in_memory must be >= 1 or None, got {max_in_memory}")
        self.cache_dir = Path(cache_dir) if cache_dir is not None else None
        self.identity = identity
        # Without a folder an evicted entry would be lost, so the bound only applies with one.
        self.max_in_memory = max_in_memory if self.cache_dir is not None else None
        self.encoded = 0
        self.loaded = 0
        self._memory: OrderedDict[str, dict[str, torch.Tensor]] = OrderedDict()
        if self.cache_dir is not None:
            try:
                open_cache_dir(self.cache_dir, "text-encoder output cache")
            except OSError as err:
                raise self._unwritable(err) from err

    def key(self, caption: str) -> str:
        """The entry's key (also its file name without suffix): hex sha256 of caption and identity."""
        return hashlib.sha256(f"{self.identity}\n{caption}".encode()).hexdigest()

    def get(self, caption: str) -> dict[str, torch.Tensor] | None:
        """The tensors stored for ``caption`` (on the CPU, not to be modified in place), or None.

        Memory first, then disk. A file that cannot be read or is not this entry (corrupt,
        truncated, another identity or format version) is a miss and is deleted.
        """
        key = self.key(caption)
        entry = self._memory.get(key)
        if entry is not None:
            self._memory.move_to_end(key)
            return entry
        entry = self._load(key, caption)
        if entry is not None:
            self.loaded += 1
            self._remember(key, entry)
        return entry

    def __contains__(self, caption: object) -> bool:
        return isinstance(caption, str) and self.get(caption) is not None

    def put(self, caption: str, tensors: Mapping[str, torch.Tensor]) -> None:
        """Store ``tensors`` (name -> tensor for this one caption, dtype kept) for ``caption``.

        Tensors are detached and copied to the CPU; on disk the file is replaced atomically.
        Raises :class:`OutputError` if the file cannot be written, ValueError for no tensors.
        """
        if not tensors:
            raise ValueError("an entry must hold at least one tensor")
        # clone(): rows of one batch share storage, which safetensors refuses, and the cache must
        # not alias the caller's tensors.
        entry = {name: tensor.detach().to("cpu").clone().contiguous() for name, tensor in tensors.items()}
        key = self.key(caption)
        self._remember(key, entry)
        if self.cache_dir is None:
            return
        metadata = {"format": "lorad-text", "version": FORMAT_VERSION, "identity": self.identity, "caption": caption}
        try:
            write_entry(self.cache_dir / (key + SUFFIX), entry, metadata)
        except OSError as err:
            raise self._unwritable(err) from err

    def pre_encode(self, captions: Iterable[str], encode: BatchEncoder, *, batch_size: int = 32) -> EncodeStats:
        """Make sure every distinct caption in ``captions`` has an entry, encoding the missing ones
        with ``encode`` in batches of at most ``batch_size`` under ``torch.no_grad()``.

        ``encode(list_of_captions)`` returns name -> tensor with one row per caption. Returns how
        many distinct captions were encoded now and how many were already cached.
        """
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        distinct = list(dict.fromkeys(captions))
        missing = [c for c in distinct if c not in self]
        for start in range(0, len(missing), batch_size):
            chunk = missing[start : start + batch_size]
            with torch.no_grad():
                batch = encode(chunk)
            for i, caption in enumerate(chunk):
                self.put(caption, {name: tensor[i] for name, tensor in batch.items()})
            self.encoded += len(chunk)
        return EncodeStats(encoded=len(missing), cached=len(distinct) - len(missing))

    def batch(self, captions: Sequence[str], *, device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
        """The entries of ``captions`` stacked per name (batch first) on ``device``.

        Raises KeyError naming the first caption without an entry: callers pre-encode first.
        """
        entries = []
        for caption in captions:
            entry = self.get(caption)
            if entry is None:
                raise KeyError(f"no cached text-encoder output for caption {caption!r}")
            entries.append(entry)
        return {name: torch.stack([e[name] for e in entries]).to(device, non_blocking=True) for name in entries[0]}

    def __len__(self) -> int:
        """Entries held in memory."""
        return len(self._memory)

    def _remember(self, key: str, entry: dict[str, torch.Tensor]) -> None:
        self._memory[key] = entry
        self._memory.move_to_end(key)
        if self.max_in_memory is not None:
            while len(self._memory) > self.max_in_memory:
                self._memory.popitem(last=False)

    def _load(self, key: str, caption: str) -> dict[str, torch.Tensor] | None:
        if self.cache_dir is None:
            return None
        expected = {"version": FORMAT_VERSION, "identity": self.identity, "caption": caption}
        return read_entry(self.cache_dir / (key + SUFFIX), expected)

    def _unwritable(self, err: OSError) -> OutputError:
        return OutputError(
            f"`cache_dir`: cannot create or write the text-encoder cache in {self.cache_dir}: {err.strerror or err}",
            hint="Set `cache_dir` to a folder you can write to, or remove it to keep encodings in memory only.",
        )
