"""The one place lorad's exceptions become gRPC status codes.

The message sent is the error's full text followed by its hint, so any gRPC client shows the user
what to fix without knowing lorad's error types.
"""

from __future__ import annotations

import grpc

from lorad.captioning.errors import FolderBusy
from lorad.errors import (
    ConfigError,
    DataError,
    ExportError,
    LoradError,
    LoraFileError,
    ModelLoadError,
    OutputError,
    TrainingDiverged,
    TrainingInterrupted,
)
from lorad.jobs.records import JobNotFound
from lorad.models.registry import ModelInUse, ModelNotResident
from lorad.server.service import JobNotCancellable
from lorad.watching.observer import WatchUnavailable
from lorad.watching.records import WatchExists, WatchNotFound
from lorad.workers.handle import WorkerUnavailable

# Most specific first: the first matching class decides.
STATUS_BY_ERROR: tuple[tuple[type[LoradError], grpc.StatusCode], ...] = (
    (ConfigError, grpc.StatusCode.INVALID_ARGUMENT),
    (JobNotFound, grpc.StatusCode.NOT_FOUND),
    (ModelNotResident, grpc.StatusCode.NOT_FOUND),
    (JobNotCancellable, grpc.StatusCode.FAILED_PRECONDITION),
    (ModelInUse, grpc.StatusCode.FAILED_PRECONDITION),
    (DataError, grpc.StatusCode.FAILED_PRECONDITION),
    (ModelLoadError, grpc.StatusCode.FAILED_PRECONDITION),
    (OutputError, grpc.StatusCode.FAILED_PRECONDITION),
    # LoRA toolbox and exports: the file or model cannot be used as asked.
    (LoraFileError, grpc.StatusCode.FAILED_PRECONDITION),
    (ExportError, grpc.StatusCode.FAILED_PRECONDITION),
    (TrainingDiverged, grpc.StatusCode.ABORTED),
    (TrainingInterrupted, grpc.StatusCode.ABORTED),
    # Another request is captioning the same folder: a concurrency conflict, worth retrying later.
    (FolderBusy, grpc.StatusCode.ABORTED),
    # Watch folders.
    (WatchExists, grpc.StatusCode.ALREADY_EXISTS),
    (WatchNotFound, grpc.StatusCode.NOT_FOUND),
    (WatchUnavailable, grpc.StatusCode.FAILED_PRECONDITION),
    # A device's worker is starting again after its process died: worth retrying in a moment (UNAVAILABLE
    # would read as "no daemon" to clients).
    (WorkerUnavailable, grpc.StatusCode.ABORTED),
    (LoradError, grpc.StatusCode.FAILED_PRECONDITION),
)


def status_for(err: LoradError) -> grpc.StatusCode:
    """The status code for a lorad error."""
    return next(code for cls, code in STATUS_BY_ERROR if isinstance(err, cls))


# gRPC sends the message percent-encoded in a trailer; past 8 KB receivers may drop the call (and past
# 16 KB always do, with RESOURCE_EXHAUSTED instead of the real code). Stay well below.
MAX_MESSAGE_WIRE_BYTES = 6000


def message_for(err: LoradError) -> str:
    """The text clients show: the error, then the hint on its own line; cut to fit a gRPC trailer."""
    return fit_trailer(f"{err}\nhint: {err.hint}" if err.hint else str(err))


def fit_trailer(text: str, limit: int = MAX_MESSAGE_WIRE_BYTES) -> str:
    """``text`` cut (marked "…") so that its percent-encoded UTF-8 takes at most ``limit`` bytes."""
    size = 0
    for index, char in enumerate(text):
        encoded = char.encode("utf-8", "replace")
        size += 1 if len(encoded) == 1 and 0x20 <= encoded[0] <= 0x7E and char != "%" else 3 * len(encoded)
        if size > limit - 3:
            return text[:index] + "…"
    return text
