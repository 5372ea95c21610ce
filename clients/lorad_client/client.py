"""``LoradClient``: a thin, typed wrapper over the daemon's gRPC services.

Each method is one RPC. Requests and responses are the generated messages from ``lorad_api.v1``
(no copies into other classes), so the .proto comments document every field. Unary calls have a
default deadline (``timeout=`` overrides it; None waits forever); the streams (``watch_job``,
``caption_images``) have none.
Every failed call raises ``LoradRpcError`` (``DaemonUnavailable`` when nothing answers).
The bearer token, when known, is sent as ``authorization`` metadata on every call, but only once
the server has proved it knows that token (``lorad_client.identity``); a server that cannot raises
``DaemonNotVerified`` and never sees the token.

Usage::

    with LoradClient.connect() as client:
        job = client.submit_training(Path("my_lora.yaml").read_text(), base_dir=Path.cwd())
        for message in client.watch_job(job.job_id):
            ...
"""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Generic, TypeVar

import grpc
from google.protobuf import struct_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc

from lorad import __version__
from lorad_api.v1 import (
    caption_pb2,
    caption_pb2_grpc,
    lora_tools_pb2,
    lora_tools_pb2_grpc,
    models_pb2,
    models_pb2_grpc,
    system_pb2,
    system_pb2_grpc,
    training_pb2,
    training_pb2_grpc,
    watch_pb2,
    watch_pb2_grpc,
)
from lorad_api.v1.caption_pb2 import CaptionImagesResponse
from lorad_api.v1.jobs_pb2 import Job, JobEvent
from lorad_api.v1.models_pb2 import LoadModelResponse, ResidentModel
from lorad_api.v1.system_pb2 import GetStatusResponse
from lorad_api.v1.training_pb2 import WatchJobResponse
from lorad_api.v1.watch_pb2 import FollowWatchesResponse
from lorad_client.discovery import DaemonTarget, find_daemon
from lorad_client.errors import (
    START_HINT,
    DaemonNotVerified,
    DaemonUnavailable,
    LoradRpcError,
    translate_rpc_error,
)
from lorad_client.identity import IdentityNotProven, verify_daemon

# Default deadlines (seconds). Quick reads; submitting (the daemon validates the whole config and
# may scan the data folder); loading a base model (a large checkpoint from a slow disk).
DEFAULT_TIMEOUT = 10.0
SUBMIT_TIMEOUT = 60.0
LOAD_MODEL_TIMEOUT = 900.0
UNLOAD_MODEL_TIMEOUT = 60.0
# SampleNow / SaveNow: the current step has to end first (minutes on a big model), then the round runs.
RUN_REQUEST_TIMEOUT = 1800.0
# Listing or writing a folder's captions reads every caption file: a few thousand images on a slow disk.
CAPTIONS_TIMEOUT = 60.0

_T = TypeVar("_T")
_M = TypeVar("_M")  # a streamed response message type

_CHANNEL_OPTIONS = (
    ("grpc.primary_user_agent", f"lorad-client/{__version__}"),
    # The daemon is local: never route loopback/Unix traffic through $http_proxy / $https_proxy.
    ("grpc.enable_http_proxy", 0),
)


class ServerStream(Generic[_M]):
    """A server-streaming call: iterate it for the response messages; ``cancel()`` (idempotent, safe
    from another thread) ends it quietly; as a context manager it cancels on exit. Errors raise
    ``LoradRpcError``."""

    def __init__(self, call: Any, translate: Callable[[grpc.RpcError], LoradRpcError]) -> None:
        self._call = call
        self._translate = translate
        self._cancelled = False

    def __iter__(self) -> Iterator[_M]:
        return self

    def __next__(self) -> _M:
        try:
            return next(self._call)
        except grpc.RpcError as err:
            if self._cancelled and err.code() == grpc.StatusCode.CANCELLED:
                raise StopIteration from None
            raise self._translate(err) from err

    def cancel(self) -> None:
        """Stop the stream (idempotent); the daemon sees the client leave."""
        self._cancelled = True
        self._call.cancel()

    def __enter__(self) -> ServerStream[_M]:
        return self

    def __exit__(self, *exc: object) -> None:
        self.cancel()


class JobWatch(ServerStream[WatchJobResponse]):
    """The live stream of ``WatchJob``: iterate it for ``WatchJobResponse`` messages.

    The first message carries ``job`` (its state when the watch began), each later one an ``event``;
    iteration ends after the job's final event. ``cancel()`` (safe from another thread, e.g. a
    Ctrl-C handler or a TUI) ends the stream: a blocked or later ``next()`` then stops quietly.
    Using it as a context manager cancels it on exit. Errors raise ``LoradRpcError``.
    """


class CaptionStream(ServerStream[CaptionImagesResponse]):
    """The live stream of ``CaptionImages``: iterate it for ``CaptionImagesResponse`` messages
    (``planned``, ``captioner_ready``, one ``image`` per image, ``finished``).

    ``cancel()`` (safe from another thread, e.g. a Ctrl-C handler) ends it: the daemon stops after
    the batch it is captioning, and the captions written so far stay. Using it as a context manager
    cancels it on exit. Errors raise ``LoradRpcError``.
    """


class WatchFollow(ServerStream[FollowWatchesResponse]):
    """The live stream of ``FollowWatches``: iterate it for ``FollowWatchesResponse`` messages (first a
    ``snapshot`` of every watch, then one ``changed`` or ``removed_watch_id`` per change); it never ends
    by itself. ``cancel()`` (safe from another thread) ends it quietly; as a context manager it cancels
    on exit. Errors raise ``LoradRpcError``.
    """


def wait_until_ready(channel: grpc.Channel, timeout: float) -> bool:
    """Whether ``channel`` connects within ``timeout`` seconds. A refused connection (nothing listens,
    no socket file) answers False at once instead of after the timeout: gRPC would keep retrying."""
    import threading

    settled = threading.Event()
    ready = [False]

    def on_change(state: grpc.ChannelConnectivity) -> None:
        if state in (grpc.ChannelConnectivity.READY, grpc.ChannelConnectivity.TRANSIENT_FAILURE):
            ready[0] = state == grpc.ChannelConnectivity.READY
            settled.set()

    channel.subscribe(on_change, try_to_connect=True)
    try:
        settled.wait(timeout)
    finally:
        channel.unsubscribe(on_change)
    return ready[0]


class LoradClient:
    """A connection to one lorad daemon. Use ``LoradClient.connect()``; close it (or use ``with``)."""

    def __init__(self, channel: grpc.Channel, target: DaemonTarget, token: str | None = None) -> None:
        """Wrap an open ``channel`` to ``target``; ``token`` (if any) is sent with every call once the
        server has proved it knows it (checked on the first call; ``connect()`` checks at once)."""
        self._channel = channel
        self.target = target
        self._token = token or None
        self._verified: tuple[tuple[str, str], ...] | None = None if self._token else ()
        self._verify_lock = threading.Lock()
        self._training = training_pb2_grpc.TrainingServiceStub(channel)
        self._models = models_pb2_grpc.ModelServiceStub(channel)
        self._lora_tools = lora_tools_pb2_grpc.LoraToolsServiceStub(channel)
        self._system = system_pb2_grpc.SystemServiceStub(channel)
        self._caption = caption_pb2_grpc.CaptionServiceStub(channel)
        self._health = health_pb2_grpc.HealthStub(channel)
        self._watch = watch_pb2_grpc.WatchServiceStub(channel)

    @classmethod
    def connect(
        cls,
        address: str | None = None,
        *,
        home: Path | None = None,
        token: str | None = None,
        timeout: float = 3.0,
    ) -> LoradClient:
        """Find the daemon (``find_daemon(home, address)``), open a channel and wait up to ``timeout``
        seconds for it to be ready. ``token`` overrides the discovered one.

        Raises DaemonUnavailable (naming the address, how it was found, and `lorad serve`) when
        nothing answers in time.
        """
        found = find_daemon(home=home, address=address)
        if not found.target:
            raise DaemonUnavailable(found.source)
        channel = grpc.insecure_channel(found.target, options=_CHANNEL_OPTIONS)
        if not wait_until_ready(channel, timeout):
            channel.close()
            raise DaemonUnavailable(
                f"no lorad daemon at {found.target} (found via {found.source}); {START_HINT}", found.target
            )
        client = cls(channel, found, token if token is not None else found.token)
        try:
            client._auth(timeout=max(timeout, 5.0))
        except LoradRpcError:
            channel.close()
            raise
        return client

    # -- plumbing -------------------------------------------------------------------------------

    def _auth(self, timeout: float | None = DEFAULT_TIMEOUT) -> tuple[tuple[str, str], ...]:
        """The metadata to send: the token once the server proved it knows it (checked once).
        Raises DaemonNotVerified, or DaemonUnavailable when the check cannot reach the server."""
        if self._verified is not None:
            return self._verified
        with self._verify_lock:
            if self._verified is None:
                assert self._token is not None
                try:
                    verify_daemon(self._channel, self._token, target=self.target.target, timeout=timeout)
                except IdentityNotProven as err:
                    raise DaemonNotVerified(str(err), self.target.target) from None
                except grpc.RpcError as err:
                    raise translate_rpc_error(err, target=self.target.target, token_sent=False) from err
                self._verified = (("authorization", f"Bearer {self._token}"),)
            return self._verified

    @property
    def _metadata(self) -> tuple[tuple[str, str], ...]:
        return self._auth()

    def _translate(self, err: grpc.RpcError) -> LoradRpcError:
        return translate_rpc_error(err, target=self.target.target, token_sent=bool(self._verified))

    def _unary(self, rpc: Callable[..., _T], request: Any, timeout: float | None) -> _T:
        try:
            return rpc(request, timeout=timeout, metadata=self._metadata)
        except grpc.RpcError as err:
            raise self._translate(err) from err

    # -- TrainingService ------------------------------------------------------------------------

    def submit_training(
        self,
        config_yaml: str,
        *,
        base_dir: str | Path,
        source_name: str = "",
        keep_alive_seconds: float = 0,
        timeout: float | None = SUBMIT_TIMEOUT,
    ) -> Job:
        """Queue a job from YAML config text; relative paths in it resolve against ``base_dir``
        (made absolute here). A bad config raises LoradRpcError(INVALID_ARGUMENT) listing every problem.
        """
        request = training_pb2.SubmitTrainingRequest(
            config_yaml=config_yaml,
            base_dir=_abs_dir(base_dir),
            source_name=source_name,
            keep_alive_seconds=keep_alive_seconds,
        )
        return self._unary(self._training.SubmitTraining, request, timeout).job

    def submit_training_fields(
        self,
        fields: Mapping[str, Any],
        *,
        base_dir: str | Path,
        source_name: str = "",
        keep_alive_seconds: float = 0,
        timeout: float | None = SUBMIT_TIMEOUT,
    ) -> Job:
        """Like ``submit_training`` but with the config as a mapping (the same keys as the YAML).

        Values must be JSON-like (str, number, bool, None, lists, mappings); paths are sent as text.
        Note protobuf's Struct carries every number as a double (8 arrives as 8.0).
        """
        config = struct_pb2.Struct()
        config.update(_json_like(fields))
        request = training_pb2.SubmitTrainingRequest(
            config_fields=config,
            base_dir=_abs_dir(base_dir),
            source_name=source_name,
            keep_alive_seconds=keep_alive_seconds,
        )
        return self._unary(self._training.SubmitTraining, request, timeout).job

    def get_job(self, job_id: str, *, timeout: float | None = DEFAULT_TIMEOUT) -> Job:
        """One job's current state; LoradRpcError(NOT_FOUND) for an unknown id."""
        return self._unary(self._training.GetJob, training_pb2.GetJobRequest(job_id=job_id), timeout).job

    def list_jobs(
        self, states: Sequence[int] = (), limit: int = 0, *, timeout: float | None = DEFAULT_TIMEOUT
    ) -> list[Job]:
        """Jobs newest first; only those in ``states`` (JobState values) if given; ``limit`` 0 = daemon default."""
        request = training_pb2.ListJobsRequest(states=list(states), limit=limit)
        return list(self._unary(self._training.ListJobs, request, timeout).jobs)

    def cancel_job(self, job_id: str, *, timeout: float | None = DEFAULT_TIMEOUT) -> Job:
        """Cancel a job; returns it after the request (a running job stays RUNNING until it stops)."""
        return self._unary(self._training.CancelJob, training_pb2.CancelJobRequest(job_id=job_id), timeout).job

    def sample_now(self, job_id: str, *, timeout: float | None = RUN_REQUEST_TIMEOUT) -> list[JobEvent]:
        """Have a running job draw its sample prompts after its current step; the events it produced
        (``sample_image``, ``sample`` for LLMs, or a warning ``log`` for a prompt that failed).
        LoradRpcError(FAILED_PRECONDITION) when the job is not training or has no sample prompts."""
        request = training_pb2.SampleNowRequest(job_id=job_id)
        return list(self._unary(self._training.SampleNow, request, timeout).events)

    def save_now(self, job_id: str, *, timeout: float | None = RUN_REQUEST_TIMEOUT) -> list[JobEvent]:
        """Have a running job save a resumable checkpoint and its step's LoRA after its current step; the
        events (``checkpoint_saved``, and a ``log`` naming the LoRA file). FAILED_PRECONDITION when not training."""
        request = training_pb2.SaveNowRequest(job_id=job_id)
        return list(self._unary(self._training.SaveNow, request, timeout).events)

    def watch_job(self, job_id: str, after_seq: int = 0, *, history_only: bool = False) -> JobWatch:
        """Follow a job: its state, then its history after ``after_seq``, then live events
        (with ``history_only``, the stream ends after the events that exist now).

        Returns a ``JobWatch``: iterate it; call ``.cancel()`` on it to stop early. No deadline.
        """
        request = training_pb2.WatchJobRequest(job_id=job_id, after_seq=after_seq, history_only=history_only)
        try:
            call = self._training.WatchJob(request, metadata=self._metadata)
        except grpc.RpcError as err:
            raise self._translate(err) from err
        return JobWatch(call, self._translate)

    # -- LoraToolsService: files on the daemon's machine; relative paths resolve against ``base_dir``
    #    (default: this process's working directory) ----------------------------------------------

    def inspect_lora(
        self, path: str | Path, *, base_dir: str | Path | None = None, timeout: float | None = 120.0
    ) -> lora_tools_pb2.InspectLoraResponse:
        """The daemon's report on a LoRA file: ``.family``, ``.blocks``, ``.problems``, ... and ``.text``
        (``lorad_client.format.format_lora_report`` renders the same)."""
        request = lora_tools_pb2.InspectLoraRequest(path=str(path), base_dir=_base_dir(base_dir))
        return self._unary(self._lora_tools.InspectLora, request, timeout)

    def convert_lora(
        self,
        path: str | Path,
        *,
        to: str,
        output: str | Path,
        base: str | Path = "",
        base_dir: str | Path | None = None,
        timeout: float | None = 300.0,
    ) -> str:
        """Convert a LoRA file to layout ``to`` (kohya, diffusers, comfyui, peft); returns the written path."""
        request = lora_tools_pb2.ConvertLoraRequest(
            path=str(path), to=to, output=str(output), base=str(base), base_dir=_base_dir(base_dir)
        )
        return self._unary(self._lora_tools.ConvertLora, request, timeout).output

    def resize_lora(
        self,
        path: str | Path,
        *,
        output: str | Path,
        rank: int = 0,
        dynamic: str = "",
        layout: str = "",
        base_dir: str | Path | None = None,
        timeout: float | None = 600.0,
    ) -> lora_tools_pb2.ResizeLoraResponse:
        """Resize a LoRA file to ``rank`` (or kohya's ``dynamic`` method, e.g. "sv_fro:0.9"); a
        ResizeLoraResponse (``.output``, ``.summary``)."""
        request = lora_tools_pb2.ResizeLoraRequest(
            path=str(path), output=str(output), rank=rank, dynamic=dynamic, layout=layout, base_dir=_base_dir(base_dir)
        )
        return self._unary(self._lora_tools.ResizeLora, request, timeout)

    def merge_lora(
        self,
        loras: Sequence[str | Path | tuple[str | Path, float]],
        *,
        output: str | Path,
        rank: int = 0,
        layout: str = "",
        base_dir: str | Path | None = None,
        timeout: float | None = 600.0,
    ) -> lora_tools_pb2.MergeLoraResponse:
        """Merge LoRA files (paths, or (path, weight) pairs) into ``output``: exactly, or to ``rank`` by SVD."""
        request = lora_tools_pb2.MergeLoraRequest(
            loras=_weighted(loras), output=str(output), rank=rank, layout=layout, base_dir=_base_dir(base_dir)
        )
        return self._unary(self._lora_tools.MergeLora, request, timeout)

    def bake_lora(
        self,
        loras: Sequence[str | Path | tuple[str | Path, float]],
        *,
        base: str | Path,
        output: str | Path,
        base_dir: str | Path | None = None,
        timeout: float | None = 1800.0,
    ) -> lora_tools_pb2.BakeLoraResponse:
        """Bake LoRA files (paths, or (path, weight) pairs) into the single-file checkpoint ``base``,
        written to ``output``."""
        request = lora_tools_pb2.BakeLoraRequest(
            loras=_weighted(loras), base=str(base), output=str(output), base_dir=_base_dir(base_dir)
        )
        return self._unary(self._lora_tools.BakeLora, request, timeout)

    def extract_lora(
        self,
        base: str | Path,
        tuned: str | Path,
        *,
        output: str | Path,
        rank: int,
        conv_rank: int = 0,
        min_diff: float = 0.0,
        layout: str = "",
        base_dir: str | Path | None = None,
        timeout: float | None = 3600.0,
    ) -> lora_tools_pb2.ExtractLoraResponse:
        """A rank-``rank`` LoRA of ``tuned - base`` (two single-file checkpoints), written to ``output``."""
        request = lora_tools_pb2.ExtractLoraRequest(
            base=str(base),
            tuned=str(tuned),
            output=str(output),
            rank=rank,
            conv_rank=conv_rank,
            min_diff=min_diff,
            layout=layout,
            base_dir=_base_dir(base_dir),
        )
        return self._unary(self._lora_tools.ExtractLora, request, timeout)

    # -- ModelService ---------------------------------------------------------------------------

    def list_models(self, *, timeout: float | None = DEFAULT_TIMEOUT) -> list[ResidentModel]:
        """Base models and captioners resident in the daemon's memory, most recently used first."""
        return list(self._unary(self._models.ListModels, models_pb2.ListModelsRequest(), timeout).models)

    def load_model(
        self,
        base_model: str,
        *,
        base_dir: str | Path,
        device: str = "",
        mixed_precision: str = "",
        keep_alive_seconds: float = 0,
        model_config_dir: str = "",
        tokenizer_path: str = "",
        prediction_type: str = "",
        allow_pickle: bool = False,
        timeout: float | None = LOAD_MODEL_TIMEOUT,
    ) -> LoadModelResponse:
        """Load a base model ahead of jobs (as the config's keys of the same names; "" = auto/default)."""
        request = models_pb2.LoadModelRequest(
            base_model=base_model,
            base_dir=_abs_dir(base_dir),
            model_config_dir=model_config_dir,
            tokenizer_path=tokenizer_path,
            device=device,
            mixed_precision=mixed_precision,
            keep_alive_seconds=keep_alive_seconds,
            prediction_type=prediction_type,
            allow_pickle=allow_pickle,
        )
        return self._unary(self._models.LoadModel, request, timeout)

    def unload_model(self, model: str, *, timeout: float | None = UNLOAD_MODEL_TIMEOUT) -> int:
        """Drop a resident model (registry id or base_model path); returns the bytes freed."""
        request = models_pb2.UnloadModelRequest(model=model)
        return self._unary(self._models.UnloadModel, request, timeout).freed_bytes

    # -- CaptionService -------------------------------------------------------------------------

    def caption_images(
        self,
        folder: str | Path,
        *,
        base_dir: str | Path,
        captioner: int = caption_pb2.CAPTIONER_KIND_BLIP,
        model: str = "",
        trigger_word: str = "",
        format: int = caption_pb2.CAPTION_FORMAT_UNSPECIFIED,
        overwrite: bool = False,
        regenerate: bool = False,
        caption_extension: str = "",
        device: str = "",
        batch_size: int = 0,
        options: caption_pb2.CaptionOptions | None = None,
        keep_alive_seconds: float = 0,
        allow_pickle: bool = False,
    ) -> CaptionStream:
        """Caption the images in ``folder`` (relative paths, here and in ``model``, resolve against
        ``base_dir``, made absolute here); ``captioner`` and ``format`` are CaptionerKind and
        CaptionFormat values. Returns a ``CaptionStream``; iterate it, or ``.cancel()`` it. No deadline.
        """
        request = caption_pb2.CaptionImagesRequest(
            folder=str(folder),
            base_dir=_abs_dir(base_dir),
            captioner=captioner,
            model=model,
            trigger_word=trigger_word,
            format=format,
            overwrite=overwrite,
            regenerate=regenerate,
            caption_extension=caption_extension,
            device=device,
            batch_size=batch_size,
            options=options,
            keep_alive_seconds=keep_alive_seconds,
            allow_pickle=allow_pickle,
        )
        try:
            call = self._caption.CaptionImages(request, metadata=self._metadata)
        except grpc.RpcError as err:
            raise self._translate(err) from err
        return CaptionStream(call, self._translate)

    def list_captions(
        self,
        folder: str | Path,
        *,
        base_dir: str | Path,
        caption_extension: str = "",
        timeout: float | None = CAPTIONS_TIMEOUT,
    ) -> caption_pb2.ListCaptionsResponse:
        """Every image of ``folder`` (relative: to ``base_dir``) with its caption, where it comes from and
        whether lorad generated it. LoradRpcError(INVALID_ARGUMENT) names a missing folder."""
        request = caption_pb2.ListCaptionsRequest(
            folder=str(folder), base_dir=_abs_dir(base_dir), caption_extension=caption_extension
        )
        return self._unary(self._caption.ListCaptions, request, timeout)

    def set_captions(
        self,
        folder: str | Path,
        edits: Mapping[str, str] | Sequence[tuple[str, str]],
        *,
        base_dir: str | Path,
        caption_extension: str = "",
        timeout: float | None = CAPTIONS_TIMEOUT,
    ) -> caption_pb2.SetCaptionsResponse:
        """Write caption ``edits`` (image path relative to the folder → caption) where the folder keeps
        its captions; they count as the user's from then on. Nothing is written when any edit is bad:
        LoradRpcError(INVALID_ARGUMENT) names each path outside the folder or not one of its images."""
        pairs = edits.items() if isinstance(edits, Mapping) else edits
        request = caption_pb2.SetCaptionsRequest(
            folder=str(folder),
            base_dir=_abs_dir(base_dir),
            caption_extension=caption_extension,
            edits=[caption_pb2.CaptionEdit(path=path, caption=caption) for path, caption in pairs],
        )
        return self._unary(self._caption.SetCaptions, request, timeout)

    # -- SystemService and health ---------------------------------------------------------------

    def status(self, *, timeout: float | None = DEFAULT_TIMEOUT) -> GetStatusResponse:
        """Version, uptime, devices, queue and listen addresses of the daemon."""
        return self._unary(self._system.GetStatus, system_pb2.GetStatusRequest(), timeout)

    def health(self, service: str = "", *, timeout: float | None = DEFAULT_TIMEOUT) -> str:
        """The standard gRPC health status of ``service`` ("" = the whole daemon): "SERVING", "NOT_SERVING", ..."""
        # Health needs no token (monitoring tools probe it), so it works before the server is verified.
        try:
            response = self._health.Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout)
        except grpc.RpcError as err:
            raise self._translate(err) from err
        return health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)

    # -- WatchService ---------------------------------------------------------------------------

    def add_watch(
        self,
        folder: str,
        config_path: str,
        *,
        base_dir: str | None = None,
        quiet_seconds: float = 0,
        min_new_images: int = 0,
        mode: str = "continue",
        continue_steps: int = 0,
        publish_dir: str = "",
        polling: bool = False,
        timeout: float | None = SUBMIT_TIMEOUT,
    ) -> watch_pb2.Watch:
        """Watch ``folder``: new images are captioned and trained with the template ``config_path``.

        Relative paths resolve against ``base_dir`` (default: this process's working directory).
        0 for ``quiet_seconds`` / ``min_new_images`` takes the daemon's default (10 s / 1); ``mode``
        is "continue" or "retrain". LoradRpcError INVALID_ARGUMENT names a bad field; ALREADY_EXISTS
        when the folder is watched already.
        """
        modes = {"continue": watch_pb2.WATCH_MODE_CONTINUE, "retrain": watch_pb2.WATCH_MODE_RETRAIN, "": 0}
        policy = watch_pb2.WatchPolicy(
            quiet_seconds=quiet_seconds,
            min_new_images=min_new_images,
            mode=modes.get(mode.strip().lower(), -1),
            continue_steps=continue_steps,
            publish_dir=str(publish_dir),
            polling=polling,
        )
        request = watch_pb2.AddWatchRequest(
            folder=str(folder), config_path=str(config_path), base_dir=_abs_dir(base_dir or Path.cwd()), policy=policy
        )
        return self._unary(self._watch.AddWatch, request, timeout).watch

    def remove_watch(
        self, watch: str, *, base_dir: str | None = None, timeout: float | None = DEFAULT_TIMEOUT
    ) -> watch_pb2.Watch:
        """Stop watching a folder, named by watch id or folder (relative to ``base_dir``, default the
        working directory); returns its last state. LoradRpcError NOT_FOUND when it is not watched."""
        request = watch_pb2.RemoveWatchRequest(watch=str(watch), base_dir=_abs_dir(base_dir or Path.cwd()))
        return self._unary(self._watch.RemoveWatch, request, timeout).watch

    def retry_watch(
        self, watch: str, *, base_dir: str | None = None, timeout: float | None = DEFAULT_TIMEOUT
    ) -> watch_pb2.Watch:
        """Try a watch in ERROR again now (by watch id or folder, relative to ``base_dir``, default the
        working directory): its template is read again and new images queue their job. Returns its
        state after. LoradRpcError INVALID_ARGUMENT while the template is still invalid, NOT_FOUND
        when not watched."""
        request = watch_pb2.RetryWatchRequest(watch=str(watch), base_dir=_abs_dir(base_dir or Path.cwd()))
        return self._unary(self._watch.RetryWatch, request, timeout).watch

    def list_watches(self, *, timeout: float | None = DEFAULT_TIMEOUT) -> list[watch_pb2.Watch]:
        """Every watch and its state, oldest first."""
        return list(self._unary(self._watch.ListWatches, watch_pb2.ListWatchesRequest(), timeout).watches)

    def follow_watches(self) -> WatchFollow:
        """Follow the watches: a snapshot, then each change. Returns a ``WatchFollow``; ``.cancel()`` it
        to stop. No deadline."""
        try:
            call = self._watch.FollowWatches(watch_pb2.FollowWatchesRequest(), metadata=self._metadata)
        except grpc.RpcError as err:
            raise self._translate(err) from err
        return WatchFollow(call, self._translate)

    # -- lifetime -------------------------------------------------------------------------------

    def close(self) -> None:
        """Close the channel (idempotent); open watches end with an error."""
        self._channel.close()

    def __enter__(self) -> LoradClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"LoradClient({self.target.target!r}, via {self.target.source})"


def _abs_dir(base_dir: str | Path) -> str:
    """``base_dir`` made absolute against this process's working directory (the daemon has another)."""
    return str(Path(base_dir).expanduser().resolve())


def _json_like(fields: Mapping[str, Any]) -> dict[str, Any]:
    """A plain-JSON copy of ``fields`` (what Struct accepts): paths become text, tuples lists."""

    def fallback(value: Any) -> Any:
        if isinstance(value, os.PathLike):
            return os.fspath(value)
        if isinstance(value, (set, frozenset)):
            return sorted(value)
        raise TypeError(f"config value {value!r} ({type(value).__name__}) is not JSON-like")

    return json.loads(json.dumps(dict(fields), default=fallback))


def _base_dir(base_dir: str | Path | None) -> str:
    """What relative paths resolve against on the daemon: ``base_dir``, else this process's working directory."""
    return str(base_dir) if base_dir is not None else os.getcwd()


def _weighted(loras: Sequence[str | Path | tuple[str | Path, float]]) -> list[lora_tools_pb2.WeightedLora]:
    """Paths (weight 1) or (path, weight) pairs as WeightedLora messages."""
    return [
        lora_tools_pb2.WeightedLora(path=str(item[0]), weight=item[1])
        if isinstance(item, tuple)
        else lora_tools_pb2.WeightedLora(path=str(item))
        for item in loras
    ]
