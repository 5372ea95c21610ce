"""The daemon's domain API: what the gRPC servicer calls, with no gRPC in it.

It owns the job store, the event hub, the resident-model registry and the worker, and wires the
training engine to them. The registry holds captioners too: caption requests and training jobs
that caption their images share them. Methods raise lorad's own errors (ConfigError, JobNotFound,
...); the servicer maps those to status codes in one place (``lorad.server.status_codes``).
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import yaml

from lorad import __version__
from lorad.captioning.captioner import CaptionerKey, CaptionerProvider, ProvidedCaptioner
from lorad.captioning.editing import FolderCaptions
from lorad.captioning.errors import FolderBusy
from lorad.captioning.options import DEFAULT_BATCH_SIZE, CaptionOptions
from lorad.captioning.updates import CaptionUpdate
from lorad.config.dispatch import choose_family, parse_any_config, parse_any_config_text
from lorad.config.limits import MAX_CONFIG_BYTES, number_problem, path_problem, shown
from lorad.config.pickle_policy import needs_pickle, pickle_problem
from lorad.config.schema import TrainingKeys
from lorad.data.dataset import caption_extension_problem
from lorad.errors import ConfigError, ConfigProblem, LoradError, ModelLoadError
from lorad.events import Event, EventSink
from lorad.families.registry import family_names, load_plugin, spec_for
from lorad.jobs.hub import EventHub
from lorad.jobs.records import EventRecord, JobRecord, JobState
from lorad.jobs.store import JobStore
from lorad.jobs.worker import Worker
from lorad.models.registry import ModelKey, ModelRegistry, ResidentInfo, measure_tensor_bytes
from lorad.paths import jobs_db_path
from lorad.server.lora_files import LoraFileService
from lorad.server.settings import MAX_KEEP_ALIVE_SECONDS, DaemonSettings
from lorad.training.run_requests import SAMPLE_NOW, SAVE_NOW, RequestNotDone
from lorad.watching.manager import JobGateway, WatchChange, WatchManager
from lorad.watching.records import WatchNotFound, WatchView, watch_policy

log = logging.getLogger("lorad.server.service")

# The most jobs one ListJobs answer holds.
MAX_LISTED_JOBS = 10_000
# How long SampleNow / SaveNow wait for the running step to end and the request to be done.
RUN_REQUEST_SECONDS = 1800.0


class JobNotCancellable(LoradError):
    """The job already reached a final state."""


@dataclass(frozen=True)
class DeviceInfo:
    """One compute device and its memory."""

    name: str
    description: str
    memory_total_bytes: int
    memory_used_bytes: int


@dataclass(frozen=True)
class DaemonStatus:
    """What ``GetStatus`` reports."""

    version: str
    started_at: float
    uptime_seconds: float
    devices: list[DeviceInfo]
    queue_length: int
    running_job_id: str
    addresses: list[str]
    token_required: bool
    home: str
    resident_models: int
    pid: int
    jobs_revision: int = 0


class LoradService:
    """Jobs, models and status for one daemon process."""

    def __init__(self, settings: DaemonSettings, *, registry: ModelRegistry | None = None) -> None:
        self.settings = settings
        self.started_at = time.time()
        self.store = JobStore(jobs_db_path(settings.home))
        self.hub = EventHub(self.store)
        self.registry: ModelRegistry = registry or ModelRegistry(
            self._load_model,
            default_keep_alive=settings.default_keep_alive,
            memory_budget_bytes=settings.memory_budget_bytes,
            measure=_measure_model,
        )
        from lorad.training.loop import train

        self.worker = Worker(
            self.store,
            self.hub,
            train=train,
            models=self._provide_model,
            captions=self._caption_filler,
            device_name=self._device_name(),
        )
        # One writer per caption folder: two requests merging into one metadata.csv would lose rows.
        self._folder_locks: dict[str, threading.Lock] = {}
        self._folder_locks_guard = threading.Lock()
        self._reaper_stop = threading.Event()
        self._reaper = threading.Thread(target=self._reap_models, name="lorad-model-reaper", daemon=True)
        self.addresses: list[str] = settings.grpc_targets  # the server replaces these with the bound ones
        self.watches = self._make_watch_manager()
        # The LoRA toolbox (LoraToolsService): file tools that share nothing with jobs.
        self.lora_files = LoraFileService()

    # --- lifecycle -----------------------------------------------------------------------------
    def start(self) -> None:
        """Recover jobs a dead daemon left running, then start the worker and the model reaper."""
        self._recover_interrupted()
        self.worker.start()
        self._reaper.start()
        self.watches.start()

    def stop(self) -> None:
        """Checkpoint and interrupt the running job (it resumes on the next start), stop threads."""
        self._reaper_stop.set()
        self.watches.stop()
        self.worker.shutdown(timeout=120)
        self.hub.wake()
        self.registry.close()
        self.store.close()

    def close_stores(self) -> None:
        """Close the databases of a service that never started (the daemon could not bind)."""
        self.watches.store.close()
        self.store.close()

    def _recover_interrupted(self) -> None:
        for job in self.store.list([JobState.RUNNING, JobState.INTERRUPTED], limit=10_000):
            if self.settings.resume_interrupted:
                self.store.update(job.job_id, state=JobState.QUEUED)
                self.hub.publish(job.job_id, "interrupted", {"checkpoint": job.checkpoint, "will_resume": True})
                log.info("job %s was interrupted; queued to resume from %s", job.job_id, job.checkpoint or "the start")
            else:
                hint = (
                    f"resubmit with `resume_from: {job.checkpoint}` to continue"
                    if job.checkpoint
                    else "resubmit the job"
                )
                self.store.update(
                    job.job_id,
                    state=JobState.FAILED,
                    finished_at=time.time(),
                    error="the daemon stopped while this job ran",
                    hint=hint,
                )
                self.hub.publish(
                    job.job_id,
                    "failed",
                    {"error": "the daemon stopped while this job ran", "hint": hint, "checkpoint": job.checkpoint},
                )

    # --- jobs ----------------------------------------------------------------------------------
    def submit(
        self,
        *,
        config_yaml: str | None = None,
        config_fields: Mapping[str, Any] | None = None,
        base_dir: str,
        source_name: str = "",
        keep_alive_seconds: float = 0.0,
    ) -> JobRecord:
        """Validate a config (every problem at once, as ConfigError) and queue a job for it."""
        check_request("training request", paths={"source_name": source_name}, keep_alive=keep_alive_seconds)
        source = source_name or "submitted config"
        base = _absolute_base_dir(base_dir, source)
        config: TrainingKeys
        if config_fields is not None:
            _check_fields_size(config_fields, source)
            config = parse_any_config(dict(config_fields), base_dir=base, source=source)
            config_yaml = yaml.safe_dump(dict(config_fields), sort_keys=False)
        else:
            config = parse_any_config_text(config_yaml or "", base_dir=base, source=source)
        # Pickle weights without `allow_pickle` were refused by the config's own checks.
        job = self.store.create_job(
            name=config.output_name,
            config_yaml=config_yaml or "",
            base_dir=base_dir,
            source_name=source_name,
            base_model=config.base_model,
            output_dir=str(config.output_dir),
            keep_alive_seconds=keep_alive_seconds,
        )
        self.hub.publish(job.job_id, "queued", {"queue_position": self.store.queue_position(job.job_id)})
        self.worker.wake()
        return job

    def get_job(self, job_id: str) -> JobRecord:
        """A job by id (or unique id prefix), with live progress while it runs."""
        job = self.store.get(job_id)
        if job.state == JobState.RUNNING and (ended := self.worker.pending_outcome(job.job_id)):
            return replace(job, **ended)  # it ended, but the store could not take the write yet
        return self._with_live_progress(job)

    def queue_position(self, job_id: str) -> int:
        return self.store.queue_position(job_id)

    def list_jobs(self, states: Sequence[JobState] = (), limit: int = 100) -> list[JobRecord]:
        """Jobs newest first (``limit`` 0 = 100, at most MAX_LISTED_JOBS), without their configs
        (``config_yaml`` is ""; GetJob has it), so the answer stays small whatever was submitted."""
        if not 0 <= limit <= MAX_LISTED_JOBS:
            raise ConfigError(
                [ConfigProblem("limit", f"got {limit}", f"use 1 to {MAX_LISTED_JOBS:,}, or 0 for the default 100")],
                "job list",
            )
        jobs = self.store.list(states, limit or 100, configs=False)
        return [self._with_live_progress(job) for job in jobs]

    def _with_live_progress(self, job: JobRecord) -> JobRecord:
        live = self.worker.live_progress(job.job_id) if job.state == JobState.RUNNING else None
        return replace(job, progress=live) if live else job

    def cancel(self, job_id: str) -> JobRecord:
        """Cancel a queued job now, or ask a running one to stop after its current step."""
        job = self.store.get(job_id)
        if job.state.final:
            raise JobNotCancellable(
                f"job {job.job_id} already {job.state.value}", "only queued or running jobs can be cancelled"
            )
        cancelled = self.store.transition(
            job.job_id, expect={JobState.QUEUED, JobState.INTERRUPTED}, to=JobState.CANCELLED, finished_at=time.time()
        )
        if cancelled is not None:
            self.hub.publish(job.job_id, "cancelled", {"checkpoint": ""})
            return cancelled
        self.worker.cancel_running(job.job_id)
        return self.store.get(job.job_id)

    def sample_now(self, job_id: str) -> list[Event]:
        """Have the running job draw its sample prompts after its current step; the events that produced.
        RequestNotDone (FAILED_PRECONDITION) when it is not training here or has no sample prompts."""
        return self.worker.ask_running(self._running(job_id), SAMPLE_NOW, timeout=RUN_REQUEST_SECONDS)

    def save_now(self, job_id: str) -> list[Event]:
        """Have the running job save a checkpoint and its step's LoRA after its current step; the events."""
        return self.worker.ask_running(self._running(job_id), SAVE_NOW, timeout=RUN_REQUEST_SECONDS)

    def _running(self, job_id: str) -> str:
        """The full id of a RUNNING job; RequestNotDone naming its state otherwise."""
        job = self.get_job(job_id)
        if job.state != JobState.RUNNING:
            raise RequestNotDone(f"job {job.job_id} is not training (it is {job.state.value})", "ask while it runs")
        return job.job_id

    def watch(
        self, job_id: str, *, after_seq: int = 0, active: Any = lambda: True, history_only: bool = False
    ) -> tuple[JobRecord, Iterator[EventRecord]]:
        """The job's state now and an iterator over its events after ``after_seq``: history, then live,
        ending after its final event (or when ``active()`` turns False; or after the history)."""
        job = self.get_job(job_id)
        # A job that has ended sends nothing new: its history is all there is, whatever after_seq says
        # (following it would wait forever for an event past its end).
        history_only = history_only or job.state.final
        return job, self.hub.follow(job.job_id, after_seq=after_seq, active=active, history_only=history_only)

    # --- watch folders -------------------------------------------------------------------------
    def _make_watch_manager(self) -> WatchManager:
        gateway = JobGateway(
            submit=self._submit_for_watch,
            requeue=self._requeue_for_watch,
            get_job=self.store.get,
            caption=self._caption_for_watch,
        )
        return WatchManager(jobs_db_path(self.settings.home), gateway)

    def add_watch(
        self,
        *,
        folder: str,
        config_path: str,
        base_dir: str,
        quiet_seconds: float = 0,
        min_new_images: int = 0,
        mode: str = "",
        continue_steps: int = 0,
        publish_dir: str = "",
        polling: bool = False,
    ) -> WatchView:
        """Watch a folder (see :meth:`WatchManager.add`); relative paths resolve against ``base_dir``.
        ConfigError names every bad field; WatchExists when the folder is watched already."""
        check_request("watch", paths={"folder": folder, "config_path": config_path, "publish_dir": publish_dir})
        base = _absolute_base_dir(base_dir, "watch")
        problems = []
        if not folder.strip():
            problems.append(ConfigProblem("folder", "is empty", "name the folder of images to watch"))
        config_file = base / Path(config_path).expanduser() if config_path.strip() else None
        if config_file is None or not config_file.is_file():
            problems.append(
                ConfigProblem(
                    "config_path",
                    f"{config_file or 'nothing'} is not a file",
                    "name the training config to use as the template (`lorad config --example` writes one)",
                )
            )
        if problems:
            raise ConfigError(problems, "watch")
        assert config_file is not None
        policy = watch_policy(
            quiet_seconds=quiet_seconds,
            min_new_images=min_new_images,
            mode=mode,
            continue_steps=continue_steps,
            publish_dir=str((base / Path(publish_dir).expanduser()).resolve()) if publish_dir else "",
            polling=polling,
        )
        return self.watches.add(
            folder=str((base / Path(folder).expanduser()).resolve()),
            config_path=str(config_file.resolve()),
            base_dir=str(base),
            policy=policy,
        )

    def remove_watch(self, watch: str, *, base_dir: str = "") -> WatchView:
        """Stop watching a folder, named by watch id or folder; WatchNotFound if not watched."""
        check_request("watch removal", paths={"watch": watch, "base_dir": base_dir})
        try:
            return self.watches.remove(watch)
        except WatchNotFound:
            if not base_dir or not watch.strip():
                raise
            return self.watches.remove(str((Path(base_dir) / Path(watch).expanduser()).resolve()))

    def list_watches(self) -> list[WatchView]:
        return self.watches.list()

    def retry_watch(self, watch: str, *, base_dir: str = "") -> WatchView:
        """Try a watch again now (see :meth:`WatchManager.retry`), named by watch id or folder."""
        try:
            return self.watches.retry(watch)
        except WatchNotFound:
            if not base_dir or not watch.strip():
                raise
            return self.watches.retry(str((Path(base_dir) / Path(watch).expanduser()).resolve()))

    def follow_watches(self, active: Callable[[], bool]) -> Iterator[list[WatchView] | WatchChange]:
        """Every watch, then each change, until ``active()`` turns False."""
        return self.watches.follow(active)

    def _submit_for_watch(self, fields: Mapping[str, Any], base_dir: str, source_name: str) -> JobRecord:
        return self.submit(config_fields=fields, base_dir=base_dir, source_name=source_name)

    def _requeue_for_watch(
        self, job_id: str, fields: Mapping[str, Any], base_dir: str, source_name: str
    ) -> JobRecord | None:
        """Replace a QUEUED job's config, validated as ``submit`` validates; None if it left the queue."""
        config = parse_any_config(dict(fields), base_dir=Path(base_dir), source=source_name)  # pickle refused here
        job = self.store.transition(
            job_id,
            expect={JobState.QUEUED},
            to=JobState.QUEUED,
            name=config.output_name,
            config_yaml=yaml.safe_dump(dict(fields), sort_keys=False),
            base_model=config.base_model,
            output_dir=str(config.output_dir),
        )
        if job is not None:
            self.hub.publish(
                job_id, "log", {"message": "more images arrived: config updated while queued", "level": "info"}
            )
        return job

    def _caption_for_watch(self, fields: Mapping[str, Any], base_dir: str) -> int:
        """Caption the watched folder's uncaptioned images when the config names a captioner."""
        config = parse_any_config(dict(fields), base_dir=Path(base_dir), source="watch")
        if not spec_for(config).uses_captioner or config.captioner is None:
            return 0
        from lorad.captioning.training import caption_filler
        from lorad.data.dataset import scan_dataset

        fill = caption_filler(
            config,
            on_event=lambda event: log.info("watch %s: %s", config.train_data_dir, getattr(event, "message", event)),
            provide=self._captioner_provider(None),
            exclusive=lambda folder: self._hold_folder(folder, wait=True),
        )
        _, report = scan_dataset(
            config.train_data_dir,
            metadata_path=config.metadata_path,
            caption_extension=config.caption_extension,
            caption_missing=fill,
        )
        return report.captions_generated

    # --- models --------------------------------------------------------------------------------
    def _device_name(self) -> str:
        from lorad.training.placement import pick_device

        return str(pick_device("auto"))

    def _load_model(self, key: ModelKey) -> Any:
        """The registry's loader: a family's base model (kind = the family's name), or a captioner."""
        if key.kind in family_names():
            return load_plugin(key.kind).load(key)
        from lorad.captioning.captioner import load_captioner

        return load_captioner(
            CaptionerKey(
                kind=key.kind, model=key.base_model, device=key.device, dtype=key.dtype, allow_pickle=key.allow_pickle
            )
        )

    @contextmanager
    def _provide_model(self, config: TrainingKeys, placement: Any) -> Iterator[Any]:
        """The training loop's ModelProvider: reserve the config's base model in the registry."""
        from lorad.training.family import ProvidedModel

        if (problem := pickle_problem("base_model", config.base_model, config.allow_pickle)) is not None:
            raise ModelLoadError(f"`base_model`: {problem.message}", problem.fix)
        key = load_plugin(config.model_family).model_key(config, placement)
        with self.registry.use(key, keep_alive=self._running_keep_alive()) as acquired:
            yield ProvidedModel(model=acquired.model, resident=acquired.resident, seconds=acquired.load_seconds)

    def _running_keep_alive(self) -> float | None:
        job_id = self.worker.running_job_id
        if job_id is None:
            return None
        seconds = self.store.get(job_id).keep_alive_seconds
        return seconds if seconds > 0 else None

    def _captioner_provider(self, keep_alive: float | None) -> CaptionerProvider:
        """A CaptionerProvider that reserves captioners in the registry (loading them once)."""

        @contextmanager
        def provide(key: CaptionerKey) -> Iterator[ProvidedCaptioner]:
            registry_key = ModelKey(
                base_model=key.model,
                device=key.device,
                dtype=key.dtype,
                kind=key.kind,
                allow_pickle=needs_pickle(key.model, key.allow_pickle),
            )
            with self.registry.use(registry_key, keep_alive=keep_alive) as acquired:
                yield ProvidedCaptioner(
                    captioner=acquired.model,
                    resident=acquired.resident,
                    seconds=acquired.load_seconds,
                    model_id=acquired.model_id,
                )

        return provide

    @contextmanager
    def _hold_folder(self, folder: Path, *, wait: bool) -> Iterator[None]:
        """Be the only one writing captions into ``folder``; FolderBusy unless ``wait``."""
        with self._folder_locks_guard:
            lock = self._folder_locks.setdefault(str(folder), threading.Lock())
        if not lock.acquire(blocking=wait):
            raise FolderBusy(
                f"{folder} is being captioned by another request right now",
                "wait for that request to finish, then run again",
            )
        try:
            yield
        finally:
            lock.release()

    def _caption_filler(self, config: TrainingKeys, on_event: EventSink, stop: threading.Event) -> Callable:
        """The worker's hook factory: a job's ``caption_missing`` hook, using resident captioners."""
        from lorad.captioning.training import caption_filler

        return caption_filler(
            config,
            on_event=on_event,
            provide=self._captioner_provider(self._running_keep_alive()),
            stop=stop,
            exclusive=lambda folder: self._hold_folder(folder, wait=True),
        )

    def caption_images(
        self,
        *,
        folder: str,
        base_dir: str,
        captioner: str = "blip",
        model: str = "",
        options: CaptionOptions | None = None,
        batch_size: int = DEFAULT_BATCH_SIZE,
        trigger_word: str = "",
        format: str = "auto",
        caption_extension: str = ".txt",
        overwrite: bool = False,
        regenerate: bool = False,
        device: str = "auto",
        keep_alive_seconds: float = 0.0,
        allow_pickle: bool = False,
        active: Callable[[], bool] = lambda: True,
    ) -> Iterator[CaptionUpdate]:
        """Caption a folder with a resident captioner; yields its updates (see
        :func:`lorad.captioning.folder.caption_folder`). Validates first (ConfigError listing every
        problem; CaptionModelError for the model folder); FolderBusy when the folder is being captioned.
        Stops after the current batch once ``active()`` turns False (the client left)."""
        from lorad.captioning.folder import caption_folder
        from lorad.captioning.request import caption_request

        check_request("captioning", keep_alive=keep_alive_seconds)
        request = caption_request(
            folder,
            base_dir=_absolute_base_dir(base_dir, "captioning"),
            captioner=captioner,
            model=model,
            options=options,
            batch_size=batch_size,
            trigger_word=trigger_word,
            format=format,
            caption_extension=caption_extension,
            overwrite=overwrite,
            regenerate=regenerate,
            device=device,
            allow_pickle=allow_pickle,
            source="captioning",
        )
        with self._hold_folder(request.folder, wait=False):
            yield from caption_folder(
                request, provide=self._captioner_provider(keep_alive_seconds or None), should_stop=lambda: not active()
            )

    # --- caption review and edits --------------------------------------------------------------
    def list_captions(self, *, folder: str, base_dir: str, caption_extension: str = "") -> FolderCaptions:
        """Every image of a folder with its caption (see :func:`lorad.captioning.editing.list_captions`).
        ConfigError names a missing folder; DataError a metadata.csv training could not read."""
        from lorad.captioning.editing import list_captions, resolve_folder

        check_request("caption list", paths={"folder": folder})
        extension = _caption_extension(caption_extension, "caption list")
        root = resolve_folder(folder, _absolute_base_dir(base_dir, "caption list"), "caption list")
        return list_captions(root, caption_extension=extension)

    def set_captions(
        self, *, folder: str, base_dir: str, edits: Sequence[tuple[str, str]], caption_extension: str = ""
    ) -> FolderCaptions:
        """Write a person's caption edits into a folder (see :func:`lorad.captioning.editing.set_captions`):
        ConfigError lists every bad edit before anything is written; FolderBusy while it is being captioned."""
        from lorad.captioning.editing import resolve_folder, set_captions

        paths = {"folder": folder} | {f"edits[{i}].path": path for i, (path, _) in enumerate(edits)}
        check_request("caption edits", paths=paths)
        extension = _caption_extension(caption_extension, "caption edits")
        root = resolve_folder(folder, _absolute_base_dir(base_dir, "caption edits"), "caption edits")
        with self._hold_folder(root, wait=False):
            return set_captions(root, edits, caption_extension=extension)

    def list_models(self) -> list[ResidentInfo]:
        return self.registry.list()

    def load_model(
        self,
        *,
        base_model: str,
        base_dir: str,
        device: str = "",
        mixed_precision: str = "",
        model_config_dir: str = "",
        tokenizer_path: str = "",
        prediction_type: str = "",
        allow_pickle: bool = False,
        keep_alive_seconds: float = 0.0,
    ) -> tuple[ResidentInfo, bool]:
        """Preload a base model the way a job with these settings would use it (its family detected
        from the model's files; settings its family has no key for are ignored)."""
        from dataclasses import fields as config_fields

        from lorad.training.placement import pick_placement

        check_request(
            "model load",
            paths={"base_model": base_model, "model_config_dir": model_config_dir, "tokenizer_path": tokenizer_path},
            keep_alive=keep_alive_seconds,
        )
        base = _absolute_base_dir(base_dir or "/", "model load")
        spec = choose_family({"base_model": base_model}, base_dir=base, source="model load")
        raw: dict[str, Any] = {
            spec.data_key: str(base),
            "base_model": base_model,
            "output_dir": str(base),
            "device": device or "auto",
            "mixed_precision": mixed_precision or "auto",
        }
        optional = {
            "model_config_dir": model_config_dir,
            "tokenizer_path": tokenizer_path,
            "prediction_type": prediction_type,
            "allow_pickle": allow_pickle,
        }
        known = {f.name for f in config_fields(spec.config_class)}
        raw |= {key: value for key, value in optional.items() if value and key in known}
        config = spec.parse(raw, base, "model load")  # pickle refused here
        placement = pick_placement(config.device, config.mixed_precision)
        key = load_plugin(spec.name).model_key(config, placement)
        return self.registry.load(key, keep_alive=keep_alive_seconds or None)

    def unload_model(self, model: str) -> int:
        return self.registry.unload(model)

    def _reap_models(self) -> None:
        while not self._reaper_stop.wait(timeout=5.0):
            try:
                for model_id in self.registry.evict_expired():
                    log.info("unloaded model %s after its keep-alive", model_id)
            except Exception:
                log.exception("model reaper")

    # --- status --------------------------------------------------------------------------------
    def status(self) -> DaemonStatus:
        return DaemonStatus(
            version=__version__,
            started_at=self.started_at,
            uptime_seconds=time.time() - self.started_at,
            devices=self._devices(),
            queue_length=len(self.store.list([JobState.QUEUED], limit=100_000, configs=False)),
            running_job_id=self.worker.running_job_id or "",
            addresses=self.addresses,
            token_required=True,
            home=str(self.settings.home),
            resident_models=len(self.registry.list()),
            pid=os.getpid(),
            jobs_revision=self.store.revision,
        )

    def _devices(self) -> list[DeviceInfo]:
        import platform

        import torch

        devices = []
        for index in range(torch.cuda.device_count()):
            free, total = torch.cuda.mem_get_info(index)
            devices.append(DeviceInfo(f"cuda:{index}", torch.cuda.get_device_name(index), total, total - free))
        if torch.backends.mps.is_available():
            devices.append(DeviceInfo("mps", "Apple GPU", 0, int(torch.mps.current_allocated_memory())))
        devices.append(
            DeviceInfo("cpu", platform.processor() or platform.machine(), _total_memory_bytes(), _resident_set_bytes())
        )
        return devices


def check_request(source: str, *, paths: Mapping[str, str] | None = None, keep_alive: float | None = None) -> None:
    """Refuse, as one ConfigError naming each field, request ``paths`` that cannot be paths here (NUL,
    too long) and a ``keep_alive`` that is NaN, infinite, negative or over 30 days."""
    problems = [p for key, text in (paths or {}).items() if (p := path_problem(key, text)) is not None]
    if keep_alive is not None:
        fix = f"use seconds from 0 (the default) to {MAX_KEEP_ALIVE_SECONDS:g} (30 days)"
        if (problem := number_problem("keep_alive_seconds", keep_alive, 0.0, MAX_KEEP_ALIVE_SECONDS, fix)) is not None:
            problems.append(problem)
    if problems:
        raise ConfigError(problems, source)


def _absolute_base_dir(base_dir: str, source: str) -> Path:
    """``base_dir`` as a Path; ConfigError unless it is absolute (relative paths need an anchor)."""
    check_request(source, paths={"base_dir": base_dir})
    if not base_dir or not Path(base_dir).is_absolute():
        raise ConfigError(
            [
                ConfigProblem(
                    "base_dir", f"got {shown(base_dir)}", "send the absolute directory relative paths resolve against"
                )
            ],
            source,
        )
    return Path(base_dir)


def _caption_extension(extension: str, source: str) -> str:
    """A sidecar extension as sent ("" = ".txt", "caption" = ".caption"); ConfigError for one that
    cannot name caption files (an image extension, a path)."""
    extension = extension.strip() or ".txt"
    extension = extension if extension.startswith(".") else "." + extension
    if (why := caption_extension_problem(extension)) is not None:
        raise ConfigError(
            [ConfigProblem("caption_extension", f"{shown(extension)} {why}", "use an extension such as .txt")], source
        )
    return extension


def _check_fields_size(fields: Mapping[str, Any], source: str) -> None:
    """ConfigError when structured config fields are larger than a YAML config may be."""
    size = len(json.dumps(fields, default=str, allow_nan=True))
    if size > MAX_CONFIG_BYTES:
        raise ConfigError(
            [
                ConfigProblem(
                    "config_fields",
                    f"is {size:,} bytes as JSON; the limit is {MAX_CONFIG_BYTES:,} ({MAX_CONFIG_BYTES // 1024} KB)",
                    "a training config is a few KB; keep data (captions, prompts) in files",
                )
            ],
            source,
        )


def _measure_model(model: Any) -> int:
    """Bytes a resident model holds: its own ``memory_bytes`` when it says (an ONNX tagger holds no
    torch tensors), else its tensors."""
    own = getattr(model, "memory_bytes", None)
    return own if isinstance(own, int) else measure_tensor_bytes(model)


def _total_memory_bytes() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):  # pragma: no cover - not POSIX
        return 0


def _resident_set_bytes() -> int:
    """This process's current resident memory (Linux); 0 where unknown."""
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
        return pages * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0
