"""Domain exceptions of lorad.

Every error a user can cause is a :class:`LoradError` carrying a message that names the key or
file at fault and a ``hint`` saying how to fix it. Callers (the CLI now, the gRPC status mapping
later) show ``str(err)`` and ``err.hint``; nothing else needs to know the subclasses' internals.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

# An error travels in a gRPC trailer (at most 16 KB, percent-encoded): list this many problems, then
# say how many more, and cut any one line to MAX_LINE_CHARS, so the real status always arrives.
MAX_LISTED_PROBLEMS = 20
MAX_LINE_CHARS = 400


def clip(text: str, limit: int = MAX_LINE_CHARS) -> str:
    """``text`` cut to ``limit`` characters, the cut marked with "…"."""
    return text if len(text) <= limit else text[: limit - 1] + "…"


class LoradError(Exception):
    """Base of all errors a user can act on.

    ``hint`` is one or more sentences telling the fix; it may be empty when the message says it.
    """

    def __init__(self, message: str, hint: str = "") -> None:
        super().__init__(message)
        self.hint = hint

    def __str__(self) -> str:
        return self.args[0]

    def __reduce__(self) -> tuple:
        # Subclasses take other arguments than ``args`` (ConfigError takes its problems): rebuild from the
        # arguments and attributes as they are, so an error crosses to another process (a worker's) whole.
        return (_rebuild_error, (type(self), self.args, dict(self.__dict__)))


def _rebuild_error(cls: type[LoradError], args: tuple, attributes: dict) -> LoradError:
    """A :class:`LoradError` unpickled: its arguments and attributes put back without calling ``__init__``."""
    error = cls.__new__(cls)
    error.args = args
    error.__dict__.update(attributes)
    return error


@dataclass(frozen=True)
class ConfigProblem:
    """One problem in a training config: the key, the value found, and what to do instead."""

    key: str
    message: str
    fix: str = ""

    def render(self) -> str:
        """One line for humans: "`key`: message — fix" (at most MAX_LINE_CHARS; the message is cut
        before the fix, so what to do always arrives)."""
        fix = clip(self.fix, MAX_LINE_CHARS // 2) if self.fix else ""
        room = MAX_LINE_CHARS - len(fix) - (3 if fix else 0)
        text = clip(f"`{clip(self.key, 80)}`: {self.message}" if self.key else self.message, room)
        return f"{text} — {fix}" if fix else text


class ConfigError(LoradError):
    """A config with one or more problems; all of them are reported together."""

    def __init__(self, problems: list[ConfigProblem], source: str = "config") -> None:
        self.problems = list(problems)
        self.source = source
        count = len(self.problems)
        lines = [f"{clip(source, 200)}: {count:,} problem{'s' if count != 1 else ''}"]
        lines += [f"  - {p.render()}" for p in self.problems[:MAX_LISTED_PROBLEMS]]
        if count > MAX_LISTED_PROBLEMS:
            lines.append(f"  … and {count - MAX_LISTED_PROBLEMS:,} more")
        super().__init__("\n".join(lines), hint="Fix the keys above and run the command again.")


class DataError(LoradError):
    """The training data cannot be used (no usable images, unreadable captions file, ...)."""


class ModelLoadError(LoradError):
    """The base model (or a LoRA to start from) cannot be found, recognised or loaded."""


class OutputError(LoradError):
    """An output or cache location cannot be written."""


class DiskFull(OutputError):
    """A write failed (or would fail) because the disk holding ``path`` has no room for it.

    ``needed`` is about how many bytes the write takes (0 when unknown), ``free`` how many the disk had.
    Whatever was partly written has been removed; earlier files (checkpoints) are untouched.
    """

    def __init__(self, message: str, hint: str = "", *, path: str = "", needed: int = 0, free: int = 0) -> None:
        super().__init__(message, hint)
        self.path = path
        self.needed = needed
        self.free = free


class LoraFileError(LoradError):
    """A LoRA or checkpoint file cannot be read, or a LoRA tool cannot apply to it (lora_tools)."""


class ExportError(LoradError):
    """A finished job's output cannot be exported (e.g. to GGUF): unsupported architecture, missing tools."""


class TrainingDiverged(LoradError):
    """The loss became NaN or infinite; the last good checkpoint is kept."""


class TrainingOutOfMemory(LoradError):
    """A step ran out of memory with nothing left to lower (or ``oom_recovery`` off); the hint names
    the settings to lower next."""


def is_out_of_memory(err: BaseException) -> bool:
    """torch's CUDA/MPS OOM errors (OutOfMemoryError, or a RuntimeError saying so) and MemoryError."""
    torch = sys.modules.get("torch")  # an OOM can only come from torch once torch is imported
    torch_oom = getattr(torch, "OutOfMemoryError", ()) if torch is not None else ()
    return isinstance(err, (MemoryError, *((torch_oom,) if torch_oom else ()))) or (
        isinstance(err, RuntimeError) and "out of memory" in str(err)
    )


class TrainingInterrupted(LoradError):
    """Training was stopped on request (Ctrl-C, cancel) after saving a checkpoint.

    ``checkpoint`` is the directory that ``resume_from`` accepts to continue, or None if the run
    stopped before its first optimizer step. ``partial`` is the LoRA (or adapter) of the last
    completed step, written beside it and named as partial, or None.
    """

    def __init__(self, message: str, hint: str = "", checkpoint: str | None = None, partial: str | None = None) -> None:
        super().__init__(message, hint)
        self.checkpoint = checkpoint
        self.partial = partial
