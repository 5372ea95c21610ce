"""The LoRA toolbox behind ``LoraToolsService``: inspect, convert, resize, merge, bake and extract files on
the daemon's machine, for clients that cannot run the tools themselves (the TUI, the WebUI tab).

Each method checks its request at the boundary (paths that cannot be paths, relative paths without the
client's ``base_dir``, numbers out of range, an output that would overwrite an input), reporting every
problem in one :class:`~lorad.errors.ConfigError`; then runs the tool of :mod:`lorad.lora_tools`. The tools
read their inputs only and write only the output asked for, atomically; a write the disk has no room for
becomes :class:`~lorad.errors.DiskFull`, one the daemon may not make an :class:`~lorad.errors.OutputError`.
The tools import torch, so each is imported when first used.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

from lorad.config.limits import number_problem, path_problem, shown
from lorad.disk_space import disk_full_as_error, ensure_room
from lorad.errors import ConfigError, ConfigProblem, OutputError

if TYPE_CHECKING:
    from lorad.lora_tools.bake import BakeResult
    from lorad.lora_tools.extract import ExtractResult
    from lorad.lora_tools.inspect import LoraReport
    from lorad.lora_tools.merge import MergeResult
    from lorad.lora_tools.resize import ResizeResult

# The most LoRAs one merge or bake takes (each is read into memory).
MAX_TOOL_INPUTS = 64
# The highest rank a request may ask for (SD1.5's widest layer has 5120 inputs; SDXL's 10240).
MAX_TOOL_RANK = 8192
# Weights beyond this are typos, not merges.
MAX_LORA_WEIGHT = 100.0
# A difference threshold beyond this would leave out every layer of any real checkpoint.
MAX_MIN_DIFF = 1e6


class _Request:
    """Collects the problems of one request; resolves its paths against the client's ``base_dir``."""

    def __init__(self, source: str, base_dir: str) -> None:
        self.source = source
        self.problems: list[ConfigProblem] = []
        self.base_dir: Path | None = None
        if base_dir:
            if (problem := path_problem("base_dir", base_dir)) is not None:
                self.problems.append(problem)
            elif not Path(base_dir).is_absolute():
                self._add(
                    "base_dir", f"got {shown(base_dir)}", "send the absolute folder relative paths resolve against"
                )
            else:
                self.base_dir = Path(base_dir)

    def _add(self, key: str, message: str, fix: str) -> None:
        self.problems.append(ConfigProblem(key, message, fix))

    def path(self, key: str, text: str, what: str) -> Path | None:
        """``text`` as an absolute path (None, with a problem noted, when it cannot be one); ``what`` names
        what the field should hold, for the fix."""
        if not text.strip():
            self._add(key, "is empty", f"send the path of {what}")
            return None
        if (problem := path_problem(key, text)) is not None:
            self.problems.append(problem)
            return None
        path = Path(text).expanduser()
        if path.is_absolute():
            return path
        if self.base_dir is None:
            self._add(key, f"{shown(text)} is relative and no base_dir was sent", "send an absolute path, or base_dir")
            return None
        return self.base_dir / path

    def number(self, key: str, value: float, low: float, high: float, fix: str = "") -> None:
        if (problem := number_problem(key, value, low, high, fix)) is not None:
            self.problems.append(problem)

    def output(self, text: str, inputs: Sequence[Path | None]) -> Path | None:
        """The output path; a problem when it is one of the inputs (the tools never write over what they read)."""
        output = self.path("output", text, "the file to write")
        if output is not None:
            same = next((p for p in inputs if p is not None and _same_file(p, output)), None)
            if same is not None:
                self._add("output", f"is the input {same}", "write the result to a new file; inputs are only read")
        return output

    def weighted(self, loras: Sequence[tuple[str, float]], at_least: int) -> list[tuple[Path, float]]:
        """The (path, weight) inputs resolved, at least ``at_least`` and at most MAX_TOOL_INPUTS; problems name
        ``loras[i].path`` / ``loras[i].weight``."""
        if not at_least <= len(loras) <= MAX_TOOL_INPUTS:
            self._add("loras", f"has {len(loras)} files", f"send {at_least} to {MAX_TOOL_INPUTS} LoRA files")
        resolved = []
        for index, (text, weight) in enumerate(loras[:MAX_TOOL_INPUTS]):
            path = self.path(f"loras[{index}].path", text, "a LoRA file")
            self.number(f"loras[{index}].weight", weight, -MAX_LORA_WEIGHT, MAX_LORA_WEIGHT)
            if path is not None:
                resolved.append((path, weight))
        return resolved

    def layout(self, key: str, name: str, *, required: bool = False) -> None:
        """A problem unless ``name`` is a layout the tools write (or empty, where that means the default)."""
        from lorad.lora_tools.layouts import LAYOUTS

        if (name or required) and name not in LAYOUTS:
            self._add(key, f"got {shown(name)}", "use one of: " + ", ".join(LAYOUTS))

    def done(self) -> None:
        """Raise every problem noted, as one ConfigError."""
        if self.problems:
            raise ConfigError(self.problems, self.source)


def _same_file(a: Path, b: Path) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:  # one of them does not exist (yet): compare the spelled-out paths
        return os.path.abspath(a) == os.path.abspath(b)


@contextmanager
def _writing(dest: Path, what: str, needed: int = 0) -> Iterator[None]:
    """Turn a failed write of ``what`` to ``dest`` into DiskFull (no room) or OutputError (anything else the
    filesystem refused: permissions, a folder in the way, a read-only disk)."""
    ensure_room(dest.parent, needed, what)
    try:
        with disk_full_as_error(dest, what, needed):
            yield
    except OSError as err:
        if not _concerns(err, dest):
            raise
        raise OutputError(
            f"cannot write {what} to {dest}: {err.strerror or err}",
            "Choose an output path in a folder the daemon's user can write to.",
        ) from None


def _concerns(err: OSError, dest: Path) -> bool:
    """Whether ``err`` is about ``dest``, a folder above it, or a temporary file beside it (the atomic writers')."""
    names = [Path(os.fsdecode(n)) for n in (err.filename, err.filename2) if n]
    return any(n == dest or n in dest.parents or dest.parent in n.parents for n in names)


class LoraFileService:
    """The LoRA toolbox for the gRPC servicer. Holds no state: every call stands alone."""

    def inspect(self, path: str, *, base_dir: str = "") -> LoraReport:
        """The :class:`~lorad.lora_tools.inspect.LoraReport` of a LoRA file or folder."""
        from lorad.lora_tools.inspect import inspect_lora

        request = _Request("InspectLora", base_dir)
        source = request.path("path", path, "the LoRA file to inspect")
        request.done()
        assert source is not None
        return inspect_lora(source)

    def convert(self, path: str, *, to: str, output: str, base: str = "", base_dir: str = "") -> str:
        """Write the LoRA in layout ``to``; returns what was written."""
        from lorad.lora_tools.convert import convert_lora

        request = _Request("ConvertLora", base_dir)
        source = request.path("path", path, "the LoRA file to convert")
        model = request.path("base", base, "the model's checkpoint") if base else None
        dest = request.output(output, [source, model])
        request.layout("to", to, required=True)
        request.done()
        assert source is not None and dest is not None
        with _writing(dest, "the converted LoRA"):
            return str(convert_lora(source, dest, to=to, base=model))

    def resize(
        self, path: str, *, output: str, rank: int | None, dynamic: str, layout: str = "", base_dir: str = ""
    ) -> ResizeResult:
        """Resize the LoRA to ``rank`` (or by kohya's ``dynamic`` method)."""
        from lorad.lora_tools.resize import resize_lora

        request = _Request("ResizeLora", base_dir)
        source = request.path("path", path, "the LoRA file to resize")
        dest = request.output(output, [source])
        if rank is not None:
            request.number("rank", rank, 1, MAX_TOOL_RANK)
        request.layout("layout", layout)
        request.done()
        assert source is not None and dest is not None
        with _writing(dest, "the resized LoRA"):
            return resize_lora(source, dest, rank=rank, dynamic=dynamic or None, layout=layout or None)

    def merge(
        self,
        loras: Sequence[tuple[str, float]],
        *,
        output: str,
        rank: int | None = None,
        layout: str = "",
        base_dir: str = "",
    ) -> MergeResult:
        """Merge the weighted LoRAs: exactly, or to ``rank`` by SVD."""
        from lorad.lora_tools.merge import merge_loras

        request = _Request("MergeLora", base_dir)
        inputs = request.weighted(loras, 2)
        dest = request.output(output, [path for path, _ in inputs])
        if rank is not None:
            request.number("rank", rank, 1, MAX_TOOL_RANK)
        request.layout("layout", layout)
        request.done()
        assert dest is not None
        with _writing(dest, "the merged LoRA"):
            return merge_loras(inputs, dest, rank=rank, layout=layout or None)

    def bake(self, loras: Sequence[tuple[str, float]], *, base: str, output: str, base_dir: str = "") -> BakeResult:
        """Bake the weighted LoRAs into the single-file checkpoint ``base``, written to ``output``."""
        from lorad.lora_tools.bake import bake_loras

        request = _Request("BakeLora", base_dir)
        inputs = request.weighted(loras, 1)
        checkpoint = request.path("base", base, "the single-file checkpoint to bake into")
        dest = request.output(output, [checkpoint, *(path for path, _ in inputs)])
        request.done()
        assert checkpoint is not None and dest is not None
        # The result is the size of the base: say so before writing gigabytes into a disk without room.
        with _writing(dest, "the baked checkpoint", _size(checkpoint)):
            return bake_loras(inputs, checkpoint, dest)

    def extract(
        self,
        base: str,
        tuned: str,
        *,
        output: str,
        rank: int,
        conv_rank: int | None = None,
        min_diff: float = 0.0,
        layout: str = "",
        base_dir: str = "",
    ) -> ExtractResult:
        """Extract a rank-``rank`` LoRA of ``tuned - base``."""
        from lorad.lora_tools.extract import extract_lora

        request = _Request("ExtractLora", base_dir)
        original = request.path("base", base, "the original single-file checkpoint")
        changed = request.path("tuned", tuned, "the fine-tuned single-file checkpoint")
        dest = request.output(output, [original, changed])
        request.number("rank", rank, 1, MAX_TOOL_RANK)
        if conv_rank is not None:
            request.number("conv_rank", conv_rank, 1, MAX_TOOL_RANK)
        request.number("min_diff", min_diff, 0.0, MAX_MIN_DIFF)
        request.layout("layout", layout)
        request.done()
        assert original is not None and changed is not None and dest is not None
        with _writing(dest, "the extracted LoRA"):
            return extract_lora(
                original,
                changed,
                dest,
                rank=rank,
                conv_rank=conv_rank,
                min_diff=min_diff,
                layout=layout or "kohya",
            )


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0  # the tool says what is wrong with it
