"""The extension's few calls to the daemon, on its own protobuf-3.20-compatible stubs.

``Daemon.connect(address)`` finds the daemon the way ``lorad_client`` does (the vendored
``discovery``: setting, ``$LORAD_ADDRESS``, the running daemon's discovery file) and reads its token
on the same machine. The token is sent only after the daemon proved it knows it (the vendored
``identity`` check, on the first call), never to whatever else answers on that address.
Every failed call raises :class:`DaemonError`, whose text is meant for the user; when nothing
answers it says how to start the daemon.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import grpc
from google.protobuf import struct_pb2

from lorad_webui.api.v1 import (
    caption_pb2,
    caption_pb2_grpc,
    jobs_pb2,
    lora_tools_pb2,
    lora_tools_pb2_grpc,
    system_pb2,
    system_pb2_grpc,
    training_pb2,
    training_pb2_grpc,
)
from lorad_webui.vendored.discovery import DaemonTarget, find_daemon
from lorad_webui.vendored.identity import IdentityNotProven, verify_daemon

START_COMMAND = "lorad serve"
CALL_TIMEOUT = 10.0
# The tab checks the connection while the WebUI builds its UI: an unreachable address must not stall that.
STATUS_TIMEOUT = 3.0
SUBMIT_TIMEOUT = 60.0
# SampleNow / SaveNow wait for the job's current step to end, then for the round or the save.
RUN_REQUEST_TIMEOUT = 1800.0
# InspectLora reads the whole LoRA file (a large one takes a few seconds).
INSPECT_TIMEOUT = 120.0
_CHANNEL_OPTIONS = (("grpc.primary_user_agent", "lorad-webui"), ("grpc.enable_http_proxy", 0))


class DaemonError(Exception):
    """A call that failed; ``str(err)`` is the message to show. ``unavailable`` when nothing answered."""

    def __init__(self, message: str, *, unavailable: bool = False) -> None:
        super().__init__(message)
        self.unavailable = unavailable


def _translate(err: grpc.RpcError, target: DaemonTarget) -> DaemonError:
    code = err.code() if callable(getattr(err, "code", None)) else grpc.StatusCode.UNKNOWN
    details = (err.details() if callable(getattr(err, "details", None)) else None) or ""
    if code == grpc.StatusCode.UNAVAILABLE:
        return DaemonError(
            f"The lorad daemon is not running at {target.target} (found via {target.source}). "
            f"Start it on this machine with `{START_COMMAND}`, or set its address in Settings → lorad.",
            unavailable=True,
        )
    if code == grpc.StatusCode.UNAUTHENTICATED and not target.token:
        details += (
            "\nNo token was found on this machine: for a daemon elsewhere, set $LORAD_TOKEN before starting the WebUI."
        )
    return DaemonError(details or f"lorad daemon call failed ({code.name})")


class Stream:
    """A server stream: iterate for messages; ``cancel()`` (from any thread) ends it quietly."""

    def __init__(self, call: Any, target: DaemonTarget) -> None:
        self._call = call
        self._target = target
        self._cancelled = threading.Event()

    def __iter__(self) -> Iterator[Any]:
        try:
            yield from self._call
        except grpc.RpcError as err:
            if self._cancelled.is_set() and err.code() == grpc.StatusCode.CANCELLED:
                return
            raise _translate(err, self._target) from err

    def cancel(self) -> None:
        """Stop the stream; iteration then ends without an error."""
        self._cancelled.set()
        self._call.cancel()


class Daemon:
    """A channel to the daemon plus the calls the tab makes. Thread-safe; ``close()`` when done."""

    def __init__(self, target: DaemonTarget) -> None:
        self.target = target
        # No daemon runs for this home: a channel to nowhere, whose calls say so (see _auth).
        self._channel = grpc.insecure_channel(target.target or "unix:///nonexistent", options=_CHANNEL_OPTIONS)
        self._verified: tuple[tuple[str, str], ...] | None = None if target.token else ()
        self._verify_lock = threading.Lock()
        self._training = training_pb2_grpc.TrainingServiceStub(self._channel)
        self._caption = caption_pb2_grpc.CaptionServiceStub(self._channel)
        self._system = system_pb2_grpc.SystemServiceStub(self._channel)
        self._lora_tools = lora_tools_pb2_grpc.LoraToolsServiceStub(self._channel)

    @classmethod
    def connect(cls, address: str = "", home: Path | None = None) -> Daemon:
        """A client for the daemon at ``address`` (empty: find the local one). Does not call it yet."""
        return cls(find_daemon(home=home, address=address.strip() or None))

    def close(self) -> None:
        """Close the channel (streams in flight end)."""
        self._channel.close()

    def __enter__(self) -> Daemon:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def _metadata(self) -> tuple[tuple[str, str], ...]:
        """The token as call metadata, once the daemon proved it knows it (checked on first use)."""
        if not self.target.target:
            raise DaemonError(
                f"{self.target.source}. Or set the daemon's address in Settings → lorad.", unavailable=True
            )
        if self._verified is not None:
            return self._verified
        with self._verify_lock:
            if self._verified is None:
                try:
                    verify_daemon(
                        self._channel, self.target.token or "", target=self.target.target, timeout=STATUS_TIMEOUT
                    )
                except IdentityNotProven as err:
                    raise DaemonError(str(err)) from None
                except grpc.RpcError as err:
                    raise _translate(err, self.target) from err
                self._verified = (("authorization", f"Bearer {self.target.token}"),)
            return self._verified

    def _unary(self, method: Any, request: Any, timeout: float = CALL_TIMEOUT) -> Any:
        metadata = self._metadata
        try:
            return method(request, timeout=timeout, metadata=metadata)
        except grpc.RpcError as err:
            raise _translate(err, self.target) from err

    def version(self) -> str:
        """The daemon's version (a cheap "is it there" call)."""
        return self._unary(self._system.GetStatus, system_pb2.GetStatusRequest(), STATUS_TIMEOUT).version

    def caption_images(
        self, folder: Path, *, captioner: int, model: str = "", trigger_word: str = "", overwrite: bool = False
    ) -> Stream:
        """CaptionImages on ``folder`` (absolute); stream of ``CaptionImagesResponse``."""
        request = caption_pb2.CaptionImagesRequest(
            folder=str(folder),
            base_dir=str(folder),
            captioner=captioner,
            model=model,
            trigger_word=trigger_word,
            overwrite=overwrite,
        )
        return Stream(self._caption.CaptionImages(request, metadata=self._metadata), self.target)

    def submit_training(self, fields: Mapping[str, Any], *, base_dir: Path, source_name: str) -> jobs_pb2.Job:
        """SubmitTraining with ``config_fields``; the queued job. Config errors raise DaemonError."""
        struct = struct_pb2.Struct()
        struct.update(dict(fields))
        request = training_pb2.SubmitTrainingRequest(
            config_fields=struct, base_dir=str(base_dir), source_name=source_name
        )
        return self._unary(self._training.SubmitTraining, request, SUBMIT_TIMEOUT).job

    def watch_job(self, job_id: str) -> Stream:
        """WatchJob from the start: the job, then its events, until it ends."""
        return Stream(
            self._training.WatchJob(training_pb2.WatchJobRequest(job_id=job_id), metadata=self._metadata), self.target
        )

    def cancel_job(self, job_id: str) -> jobs_pb2.Job:
        """CancelJob; the job as it is after the request."""
        return self._unary(self._training.CancelJob, training_pb2.CancelJobRequest(job_id=job_id)).job

    def sample_now(self, job_id: str) -> list[jobs_pb2.JobEvent]:
        """SampleNow: the running job draws its sample prompts after its current step; the events."""
        request = training_pb2.SampleNowRequest(job_id=job_id)
        return list(self._unary(self._training.SampleNow, request, RUN_REQUEST_TIMEOUT).events)

    def save_now(self, job_id: str) -> list[jobs_pb2.JobEvent]:
        """SaveNow: the running job saves a checkpoint and its step's LoRA after its current step; the events."""
        request = training_pb2.SaveNowRequest(job_id=job_id)
        return list(self._unary(self._training.SaveNow, request, RUN_REQUEST_TIMEOUT).events)

    def get_job(self, job_id: str) -> jobs_pb2.Job:
        """GetJob: the job as it is now (its ``outputs`` once it succeeded)."""
        return self._unary(self._training.GetJob, training_pb2.GetJobRequest(job_id=job_id)).job

    def inspect_lora(self, path: Path) -> lora_tools_pb2.InspectLoraResponse:
        """InspectLora on ``path`` (absolute, on the daemon's machine): the report on the LoRA file."""
        request = lora_tools_pb2.InspectLoraRequest(path=str(path), base_dir=str(path.parent))
        return self._unary(self._lora_tools.InspectLora, request, INSPECT_TIMEOUT)
