"""Domain exceptions of lorad.

Every error a user can cause is a :class:`LoradError` carrying a message that names the key or
file at fault and a ``hint`` saying how to fix it. Callers (the CLI now, the gRPC status mapping
later) show ``str(err)`` and ``err.hint``; nothing else needs to know the subclasses' internals.
"""

from __future__ import annotations

from dataclasses import dataclass


class LoradError(Exception):
    """Base of all errors a user can act on.

    ``hint`` is one or more sentences telling the fix; it may be empty when the message says it.
    """

    def __init__(self, message: str, hint: str = "") -> None:
        super().__init__(message)
        self.hint = hint

    def __str__(self) -> str:
        return self.args[0]


@dataclass(frozen=True)
class ConfigProblem:
    """One problem in a training config: the key, the value found, and what to do instead."""

    key: str
    message: str
    fix: str = ""

    def render(self) -> str:
        """One line for humans: "`key`: message — fix"."""
        text = f"`{self.key}`: {self.message}" if self.key else self.message
        return f"{text} — {self.fix}" if self.fix else text


class ConfigError(LoradError):
    """A config with one or more problems; all of them are reported together."""

    def __init__(self, problems: list[ConfigProblem], source: str = "config") -> None:
        self.problems = list(problems)
        self.source = source
        count = len(self.problems)
        lines = [f"{source}: {count} problem{'s' if count != 1 else ''}"]
        lines += [f"  - {p.render()}" for p in self.problems]
        super().__init__("\n".join(lines), hint="Fix the keys above and run the command again.")


class DataError(LoradError):
    """The training data cannot be used (no usable images, unreadable captions file, ...)."""


class ModelLoadError(LoradError):
    """The base model (or a LoRA to start from) cannot be found, recognised or loaded."""


class OutputError(LoradError):
    """An output or cache location cannot be written."""


class LoraFileError(LoradError):
    """A LoRA or checkpoint file cannot be read, or a LoRA tool cannot apply to it (lora_tools)."""


class ExportError(LoradError):
    """A finished job's output cannot be exported (e.g. to GGUF): unsupported architecture, missing tools."""


class TrainingDiverged(LoradError):
    """The loss became NaN or infinite; the last good checkpoint is kept."""


class TrainingInterrupted(LoradError):
    """Training was stopped on request (Ctrl-C, cancel) after saving a checkpoint.

    ``checkpoint`` is the directory that ``resume_from`` accepts to continue, or None if the run
    stopped before its first optimizer step.
    """

    def __init__(self, message: str, hint: str = "", checkpoint: str | None = None) -> None:
        super().__init__(message, hint)
        self.checkpoint = checkpoint
