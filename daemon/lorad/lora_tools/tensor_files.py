"""Read and write ``.safetensors`` checkpoints one tensor at a time.

``safetensors.safe_open`` memory-maps the file, so every tensor read stays resident until the file
is closed; ``save_file`` needs every tensor in memory at once. Baking a LoRA into (or extracting one
from) a multi-GB checkpoint should hold about one tensor at a time, so the reader here reads each
tensor's bytes with ``pread`` into a fresh buffer and the writer streams tensors into place after a
header computed up front. The format is safetensors' own (8-byte little-endian header length, JSON
header, tensor bytes); files written here are read back by the safetensors library in the tests.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from lorad.errors import LoraFileError

DTYPES: Mapping[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}
NAMES: Mapping[torch.dtype, str] = {v: k for k, v in DTYPES.items()}


@dataclass(frozen=True)
class TensorEntry:
    """One tensor's place in a safetensors file."""

    dtype: str
    shape: tuple[int, ...]
    start: int  # absolute byte offset in the file
    end: int


class TensorReader:
    """A safetensors file opened for reading single tensors without memory-mapping the whole file."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        if self.path.is_dir():
            raise LoraFileError(f"{self.path} is a folder, not a .safetensors file", "Name the .safetensors file.")
        try:
            self._fd = os.open(self.path, os.O_RDONLY)
        except OSError as err:
            raise LoraFileError(f"{self.path} cannot be opened ({err.strerror})", "Check the path.") from None
        try:
            self.entries, self.metadata = self._read_header()
        except OSError as err:
            os.close(self._fd)
            raise LoraFileError(f"{self.path} cannot be read ({err.strerror})", "Check the file.") from None
        except BaseException:
            os.close(self._fd)
            raise

    def _read_header(self) -> tuple[dict[str, TensorEntry], dict[str, str]]:
        size = os.fstat(self._fd).st_size
        head = os.pread(self._fd, 8, 0)
        bad = LoraFileError(
            f"{self.path} is not a .safetensors file (no valid header)",
            "Check that the download is complete; lorad reads .safetensors only.",
        )
        if len(head) < 8:
            raise bad
        (length,) = struct.unpack("<Q", head)
        if length > min(size - 8, 100 * 2**20):
            raise bad
        try:
            header = json.loads(os.pread(self._fd, length, 8))
        except ValueError:
            raise bad from None
        if not isinstance(header, dict):
            raise bad
        metadata = header.pop("__metadata__", None) or {}
        entries: dict[str, TensorEntry] = {}
        base = 8 + length
        for key, info in header.items():
            try:
                start, end = info["data_offsets"]
                entries[key] = TensorEntry(
                    str(info["dtype"]), tuple(int(d) for d in info["shape"]), base + start, base + end
                )
            except (KeyError, TypeError, ValueError):
                raise bad from None
            if entries[key].end > size:
                raise LoraFileError(
                    f"{self.path} is truncated (tensor `{key}` runs past the end)", "Download it again."
                )
        return entries, {str(k): str(v) for k, v in metadata.items()}

    def names(self) -> list[str]:
        return list(self.entries)

    def shape(self, key: str) -> tuple[int, ...]:
        return self.entries[key].shape

    def read(self, key: str) -> torch.Tensor:
        """The tensor ``key`` as a fresh CPU tensor (its own memory, not a view of the file)."""
        entry = self.entries[key]
        dtype = DTYPES.get(entry.dtype)
        if dtype is None:
            raise LoraFileError(f"{self.path}: tensor `{key}` has dtype {entry.dtype}, which lorad cannot read")
        data = bytearray(entry.end - entry.start)
        view = memoryview(data)
        done = 0
        while done < len(data):  # pread may return less than asked for large reads
            try:
                chunk = os.preadv(self._fd, [view[done:]], entry.start + done)
            except OSError as err:
                raise LoraFileError(
                    f"{self.path} cannot be read at `{key}` ({err.strerror})", "Check the file."
                ) from None
            if chunk <= 0:
                raise LoraFileError(f"{self.path} is truncated at tensor `{key}`", "Download it again.")
            done += chunk
        if not data:
            return torch.empty(entry.shape, dtype=dtype)
        return torch.frombuffer(data, dtype=dtype).reshape(entry.shape)

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __enter__(self) -> TensorReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class TensorWriter:
    """Writes a safetensors file whose tensor names, dtypes and shapes are known before the data.

    Tensors must then be written in exactly the declared order. Used with :func:`lorad.atomic.atomic_path`
    so a reader never sees a half-written checkpoint.
    """

    def __init__(
        self, path: Path, layout: Sequence[tuple[str, torch.dtype, tuple[int, ...]]], metadata: Mapping[str, str]
    ) -> None:
        header: dict[str, object] = {"__metadata__": dict(metadata)} if metadata else {}
        offset = 0
        self._order: list[tuple[str, torch.dtype, tuple[int, ...], int]] = []
        for name, dtype, shape in layout:
            nbytes = torch.Size(shape).numel() * torch.empty((), dtype=dtype).element_size()
            header[name] = {"dtype": NAMES[dtype], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
            self._order.append((name, dtype, tuple(shape), nbytes))
            offset += nbytes
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # safetensors aligns the data to 8 bytes
        self._fh = open(path, "wb")  # noqa: SIM115 - closed in close()
        self._fh.write(struct.pack("<Q", len(raw)) + raw)
        self._next = 0

    def write(self, name: str, tensor: torch.Tensor) -> None:
        expected, dtype, shape, nbytes = self._order[self._next]
        if name != expected or tensor.dtype != dtype or tuple(tensor.shape) != shape:
            raise ValueError(f"expected {expected} {dtype} {shape}, got {name} {tensor.dtype} {tuple(tensor.shape)}")
        data = tensor.detach().contiguous().cpu()
        if nbytes:  # a memoryview of the tensor's own bytes: no second copy in memory
            self._fh.write(memoryview(data.reshape(-1).view(torch.uint8).numpy()))
        self._next += 1

    def close(self) -> None:
        if self._next != len(self._order) and not self._fh.closed:
            self._fh.close()
            raise ValueError(f"only {self._next} of {len(self._order)} tensors were written")
        self._fh.close()


def iter_tensors(reader: TensorReader, keys: Sequence[str] | None = None) -> Iterator[tuple[str, torch.Tensor]]:
    """(key, tensor) for each key in file order (or the given order), one tensor in memory at a time."""
    for key in keys if keys is not None else reader.names():
        yield key, reader.read(key)
