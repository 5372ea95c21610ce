"""VAE latents cached in memory and, optionally, on disk, so each image is encoded once.

An entry is a small dict of named tensors. Callers store the VAE posterior's ``"mean"`` and
``"std"`` (see ``MEAN`` / ``STD``) rather than one sample, so every epoch can still draw a fresh
sample (``mean + std * noise``) as uncached training does; any other names work the same way.

The key is sha256 of (image content hash, bucket, VAE identity): editing an image, training it
at another bucket, or switching VAE (or its dtype, if the caller includes that in
``vae_identity``) all miss, while renaming or moving an image keeps its entry.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from pathlib import Path

import torch

from lorad.data.cache_entries import SUFFIX, open_cache_dir, read_entry, write_entry
from lorad.errors import OutputError

MEAN = "mean"
STD = "std"

# Bumped when the file layout changes; files of another version are treated as misses.
FORMAT_VERSION = "1"


class LatentCache:
    """Latents keyed by (content_hash, bucket) for one VAE.

    ``cache_dir`` None keeps entries in memory only. Otherwise the folder is created if needed
    and each entry is also written there as one safetensors file, atomically, so another
    ``LatentCache`` on the same folder (a later run) finds it. Raises :class:`OutputError`
    naming the folder and the ``cache_dir`` key if it cannot be created or written.

    Counters: ``hits`` and ``misses`` count ``get`` results; ``writes`` counts files written.
    Not thread-safe; use one instance per process.
    """

    def __init__(self, cache_dir: Path | None, vae_identity: str) -> None:
        self.cache_dir = Path(cache_dir) if cache_dir is not None else None
        self.vae_identity = vae_identity
        self.hits = 0
        self.misses = 0
        self.writes = 0
        self._memory: dict[str, dict[str, torch.Tensor]] = {}
        if self.cache_dir is not None:
            try:
                open_cache_dir(self.cache_dir, "latent cache")
            except OSError as err:
                raise self._unwritable(err) from err

    def key(self, content_hash: str, bucket: tuple[int, int]) -> str:
        """The entry's key (also its file name without suffix): hex sha256 of hash, bucket, VAE."""
        text = f"{content_hash}\n{bucket[0]}x{bucket[1]}\n{self.vae_identity}"
        return hashlib.sha256(text.encode("utf-8")).hexdigest()

    def path_for(self, content_hash: str, bucket: tuple[int, int]) -> Path | None:
        """Where the entry lives on disk, or None without a ``cache_dir``."""
        if self.cache_dir is None:
            return None
        return self.cache_dir / (self.key(content_hash, bucket) + SUFFIX)

    def get(self, content_hash: str, bucket: tuple[int, int]) -> dict[str, torch.Tensor] | None:
        """The tensors stored for (content_hash, bucket), or None.

        Memory first, then disk. A file that cannot be read or is not an entry of this key
        (corrupt, truncated, another format version) is a miss and is deleted, so the next
        ``put`` rewrites it. Returns CPU tensors the caller may modify freely (copies).
        """
        key = self.key(content_hash, bucket)
        entry = self._memory.get(key)
        if entry is None:
            entry = self._load(key, content_hash, bucket)
            if entry is not None:
                self._memory[key] = entry
        if entry is None:
            self.misses += 1
            return None
        self.hits += 1
        # Copies: a caller scaling latents in place must not change what later epochs read.
        return {name: tensor.clone() for name, tensor in entry.items()}

    def put(self, content_hash: str, bucket: tuple[int, int], latents: Mapping[str, torch.Tensor]) -> None:
        """Store ``latents`` (name → tensor, e.g. {"mean": ..., "std": ...}) for the key.

        Tensors are kept as given (dtype and shape), detached and copied to the CPU; on disk
        the file is replaced atomically. Raises :class:`OutputError` if the file cannot be
        written, ValueError for an empty mapping.
        """
        if not latents:
            raise ValueError("latents must hold at least one tensor")
        # clone(): safetensors refuses tensors sharing storage (mean and std are often two
        # halves of one tensor), and the cache must not alias the caller's tensors.
        entry = {name: tensor.detach().to("cpu").clone().contiguous() for name, tensor in latents.items()}
        key = self.key(content_hash, bucket)
        self._memory[key] = entry
        if self.cache_dir is None:
            return
        metadata = {
            "format": "lorad-latents",
            "version": FORMAT_VERSION,
            "content_hash": content_hash,
            "bucket": f"{bucket[0]}x{bucket[1]}",
            "vae_identity": self.vae_identity,
        }
        try:
            write_entry(self.cache_dir / (key + SUFFIX), entry, metadata)
        except OSError as err:
            raise self._unwritable(err) from err
        self.writes += 1

    def __len__(self) -> int:
        """Entries held in memory."""
        return len(self._memory)

    def _load(self, key: str, content_hash: str, bucket: tuple[int, int]) -> dict[str, torch.Tensor] | None:
        if self.cache_dir is None:
            return None
        expected = {
            "version": FORMAT_VERSION,
            "content_hash": content_hash,
            "bucket": f"{bucket[0]}x{bucket[1]}",
            "vae_identity": self.vae_identity,
        }
        return read_entry(self.cache_dir / (key + SUFFIX), expected)

    def _unwritable(self, err: OSError) -> OutputError:
        return OutputError(
            f"`cache_dir`: cannot create or write the latent cache in {self.cache_dir}: {err.strerror or err}",
            hint="Set `cache_dir` to a folder you can write to, or remove it to keep latents in memory only.",
        )
