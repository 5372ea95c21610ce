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
    (LoradError, grpc.StatusCode.FAILED_PRECONDITION),
)


def status_for(err: LoradError) -> grpc.StatusCode:
    """The status code for a lorad error."""
    return next(code for cls, code in STATUS_BY_ERROR if isinstance(err, cls))


def message_for(err: LoradError) -> str:
    """The text clients show: the error, then the hint on its own line."""
    return f"{err}\nhint: {err.hint}" if err.hint else str(err)
