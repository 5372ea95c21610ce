"""The daemon's domain API: what the gRPC servicer calls, with no gRPC in it.

It owns the job store, the event hub and the dispatcher, which runs jobs in one worker process per
device (each holding that device's resident base models: :mod:`lorad.workers`). The daemon process
keeps a model registry of its own for the captioners that serve caption requests. Methods raise
lorad's own errors (ConfigError, JobNotFound, ...); the servicer maps those to status codes in one
place (``lorad.server.status_codes``).
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import yaml

from lorad import __version__
from lorad.captioning.captioner import CaptionerProvider
from lorad.captioning.editing import FolderCaptions
from lorad.captioning.errors import FolderBusy
from lorad.captioning.options import DEFAULT_BATCH_SIZE, CaptionOptions
from lorad.captioning.updates import CaptionUpdate
from lorad.config.dispatch import parse_any_config, parse_any_config_text
from lorad.config.limits import MAX_CONFIG_BYTES, number_problem, path_problem, shown
from lorad.config.schema import TrainingKeys
from lorad.data.dataset import caption_extension_problem
from lorad.errors import ConfigError, ConfigProblem, LoradError
from lorad.events import Event
from lorad.families.registry import spec_for
from lorad.jobs.dispatcher import Dispatcher
from lorad.jobs.hub import EventHub
from lorad.jobs.records import EventRecord, JobRecord, JobState
from lorad.jobs.scheduling import Slot
from lorad.jobs.store import JobStore
from lorad.models.registry import ModelNotResident, ModelRegistry, ResidentInfo
from lorad.models.residents import captioner_provider, lorad_registry, resident_set_bytes
from lorad.paths import jobs_db_path
from lorad.server.lora_files import LoraFileService
from lorad.server.settings import MAX_KEEP_ALIVE_SECONDS, DaemonSettings
from lorad.training.run_requests import SAMPLE_NOW, SAVE_NOW, RequestNotDone
from lorad.watching.manager import JobGateway, WatchChange, WatchManager
from lorad.watching.records import WatchNotFound, WatchView, watch_policy

log = logging.getLogger("lorad.server.service")

# The most jobs one ListJobs answer holds.
MAX_LISTED_JOBS = 10_000
# How long a status or model request waits for a worker's answer (it answers between a job's steps).
WORKER_ANSWER_SECONDS = 30.0
# How long SampleNow / SaveNow wait for the running step to end and the request to be done.
RUN_REQUEST_SECONDS = 1800.0


class JobNotCancellable(LoradError):
    """The job already reached a final state."""


@dataclass(frozen=True)
class DeviceInfo:
    """One compute device, its worker and its memory (``worker_rss_bytes``: the worker process's host memory)."""

    name: str
    description: str
    memory_total_bytes: int
    memory_used_bytes: int
    worker: int = -1
    worker_pid: int = 0
    worker_state: str = ""
    running_job_id: str = ""
    resident_models: int = 0
    resident_bytes: int = 0
    worker_restarts: int = 0
    worker_rss_bytes: int = 0


@dataclass(frozen=True)
class HeldModel:
    """A resident model and who holds it: a device's worker (its index), or -1 for the daemon process."""

    info: ResidentInfo
    worker: int


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
    running_job_ids: list[str] = field(default_factory=list)
    in_process: bool = False


class LoradService:
    """Jobs, models and status for one daemon process."""

    def __init__(
        self,
        settings: DaemonSettings,
        *,
        registry: ModelRegistry | None = None,
        slots: Sequence[Slot] | None = None,
        train: Callable[..., object] | None = None,
    ) -> None:
        """``slots`` (the daemon's workers: one per GPU plus ``settings.cpu_workers`` on the CPU) and
        ``train`` (in-process workers only) may be given by tests."""
        self.settings = settings
        self.started_at = time.time()
        self.store = JobStore(jobs_db_path(settings.home))
        self.hub = EventHub(self.store)
        # The daemon process's own models: captioners serving caption requests and watched folders.
        self.registry: ModelRegistry = registry or lorad_registry(
            default_keep_alive=settings.default_keep_alive, memory_budget_bytes=settings.memory_budget_bytes
        )
        # One writer per caption folder: two requests merging into one metadata.csv would lose rows.
        self._folder_locks: dict[str, threading.Lock] = {}
        self._folder_locks_guard = threading.Lock()
        if slots is None:
            from lorad.workers.handle import machine_slots

            slots = machine_slots(settings.cpu_workers)
        self.dispatcher = Dispatcher(
            self.store,
            self.hub,
            slots,
            self._worker_spec(slots),
            in_process=settings.in_process,
            train=train,
            hold_folder=self._lock_folder,
            release_folder=self._unlock_folder,
        )
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
        self.dispatcher.start(start_workers=self.settings.start_workers)
        self._reaper.start()
        self.watches.start()

    def stop(self) -> None:
        """Checkpoint and interrupt the running jobs (they resume on the next start), stop the workers and threads."""
        self._reaper_stop.set()
        self.watches.stop()
        self.dispatcher.shutdown(timeout=120)
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
        # Devices this daemon cannot give the job (more than it has, a GPU it lacks) are refused now.
        self.dispatcher.check_want(config.devices, config.device)
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
        self.dispatcher.wake()
        return job

    def get_job(self, job_id: str) -> JobRecord:
        """A job by id (or unique id prefix), with live progress while it runs."""
        job = self.store.get(job_id)
        if job.state == JobState.RUNNING and (ended := self.dispatcher.pending_outcome(job.job_id)):
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
        live = self.dispatcher.live_progress(job.job_id) if job.state == JobState.RUNNING else None
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
        self.dispatcher.cancel_running(job.job_id)
        return self.store.get(job.job_id)

    def sample_now(self, job_id: str) -> list[Event]:
        """Have the running job draw its sample prompts after its current step; the events that produced.
        RequestNotDone (FAILED_PRECONDITION) when it is not training here or has no sample prompts."""
        return self.dispatcher.ask_running(self._running(job_id), SAMPLE_NOW, timeout=RUN_REQUEST_SECONDS)

    def save_now(self, job_id: str) -> list[Event]:
        """Have the running job save a checkpoint and its step's LoRA after its current step; the events."""
        return self.dispatcher.ask_running(self._running(job_id), SAVE_NOW, timeout=RUN_REQUEST_SECONDS)

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

    # --- workers and models ----------------------------------------------------------------------
    def _worker_spec(self, slots: Sequence[Slot]) -> Callable[[Slot], Any]:
        """A worker's start-up settings. CPU workers share the cores (unless OMP_NUM_THREADS says)."""
        from lorad.workers.host import WorkerSpec

        cpu_slots = sum(1 for slot in slots if slot.kind == "cpu")
        threads = 0 if "OMP_NUM_THREADS" in os.environ else max(1, (os.cpu_count() or 1) // max(cpu_slots, 1))

        def spec(slot: Slot) -> WorkerSpec:
            return WorkerSpec(
                index=slot.index,
                device=slot.device,
                home=str(self.settings.home),
                default_keep_alive=self.settings.default_keep_alive,
                memory_budget_bytes=self.settings.memory_budget_bytes,
                log_level=self.settings.log_level,
                threads=threads if slot.kind == "cpu" and cpu_slots > 1 else 0,
            )

        return spec

    def _captioner_provider(self, keep_alive: float | None) -> CaptionerProvider:
        """A CaptionerProvider that reserves captioners in the daemon's registry (loading them once)."""
        return captioner_provider(self.registry, keep_alive)

    def _lock_folder(self, folder: str) -> None:
        """Wait until nobody else writes captions into ``folder``, then hold it (a job's captioning)."""
        with self._folder_locks_guard:
            lock = self._folder_locks.setdefault(str(folder), threading.Lock())
        lock.acquire()

    def _unlock_folder(self, folder: str) -> None:
        with self._folder_locks_guard:
            lock = self._folder_locks.get(str(folder))
        if lock is not None and lock.locked():
            lock.release()

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

    def list_models(self) -> list[HeldModel]:
        """Every resident model: each running worker's, then the daemon process's own (captioners)."""
        held: list[HeldModel] = []
        for handle in self.dispatcher.handles:
            if not handle.started:
                continue
            try:
                infos = handle.call("list", timeout=WORKER_ANSWER_SECONDS)
            except LoradError as err:  # it died or restarts: nothing resident there now
                log.warning("worker %d: cannot list its models: %s", handle.index, err)
                continue
            self.dispatcher.note_residents(handle.index, {info.key.base_model for info in infos})
            held += [HeldModel(info, handle.index) for info in infos]
        return held + [HeldModel(info, -1) for info in self.registry.list()]

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
    ) -> tuple[HeldModel, bool]:
        """Preload a base model in the worker a job with these settings would use (``device``: a device name,
        "" or auto for the machine's first GPU, else the first CPU worker), the way that job would use it."""
        check_request(
            "model load",
            paths={"base_model": base_model, "model_config_dir": model_config_dir, "tokenizer_path": tokenizer_path},
            keep_alive=keep_alive_seconds,
        )
        base = _absolute_base_dir(base_dir or "/", "model load")
        from lorad.config.schema import DeviceRequest

        want = self.dispatcher.check_want(DeviceRequest(), device or "auto")
        index = (want.named or want.any_of)[0]
        handle = self.dispatcher.handles[index]
        handle.ensure_started()
        settings = {
            "base_model": base_model,
            "base_dir": base,
            "mixed_precision": mixed_precision,
            "model_config_dir": model_config_dir,
            "tokenizer_path": tokenizer_path,
            "prediction_type": prediction_type,
            "allow_pickle": allow_pickle,
        }
        info, resident = handle.call("load", settings=settings, keep_alive=keep_alive_seconds or None)
        self.dispatcher.note_residents(
            index, {i.key.base_model for i in handle.call("list", timeout=WORKER_ANSWER_SECONDS)}
        )
        return HeldModel(info, index), resident

    def unload_model(self, model: str) -> int:
        """Unload ``model`` (an id or a base model path) wherever it is resident; the bytes freed.
        ModelInUse when a job uses it; ModelNotResident when nobody holds it."""
        freed, found, busy = 0, False, None
        owners: list[Any] = [h for h in self.dispatcher.handles if h.started] + [self.registry]
        for owner in owners:
            try:
                freed += owner.call("unload", model=model) if owner is not self.registry else owner.unload(model)
                found = True
            except ModelNotResident:
                continue
            except LoradError as err:
                busy = busy or err
        if busy is not None:
            raise busy
        if not found:
            raise ModelNotResident(f"no resident model has id or base model {model!r}")
        return freed

    def _reap_models(self) -> None:
        while not self._reaper_stop.wait(timeout=5.0):
            try:
                for model_id in self.registry.evict_expired():
                    log.info("unloaded model %s after its keep-alive", model_id)
            except Exception:
                log.exception("model reaper")

    # --- status --------------------------------------------------------------------------------
    def status(self) -> DaemonStatus:
        running = self.dispatcher.running_job_ids
        devices = self._devices()
        return DaemonStatus(
            version=__version__,
            started_at=self.started_at,
            uptime_seconds=time.time() - self.started_at,
            devices=devices,
            queue_length=len(self.store.list([JobState.QUEUED], limit=100_000, configs=False)),
            running_job_id=running[0] if running else "",
            addresses=self.addresses,
            token_required=True,
            home=str(self.settings.home),
            resident_models=sum(d.resident_models for d in devices) + len(self.registry.list()),
            pid=os.getpid(),
            jobs_revision=self.store.revision,
            running_job_ids=running,
            in_process=self.settings.in_process,
        )

    def _devices(self) -> list[DeviceInfo]:
        """Each worker's device: its memory (asked of the worker; nothing while it is not running, so the
        daemon itself never opens a GPU), its state, job and residents."""
        import platform

        devices = []
        for handle in self.dispatcher.handles:
            memory: dict[str, Any] = {}
            residents: list[ResidentInfo] = []
            if handle.started:
                try:
                    memory = handle.call("memory", timeout=WORKER_ANSWER_SECONDS)
                    residents = handle.call("list", timeout=WORKER_ANSWER_SECONDS)
                except LoradError as err:
                    log.warning("worker %d: no status: %s", handle.index, err)
            job = self.dispatcher.job_on(handle.index)
            state = handle.state
            if state == "ready":
                state = "running" if job else "idle"
            cpu = handle.slot.kind == "cpu"
            devices.append(
                DeviceInfo(
                    name=handle.device,
                    description=memory.get("description")
                    or (platform.processor() or platform.machine() if cpu else ""),
                    memory_total_bytes=int(memory.get("total", 0)),
                    memory_used_bytes=int(memory.get("used", 0)),
                    worker=handle.index,
                    worker_pid=handle.pid if handle.started else 0,
                    worker_state=state,
                    running_job_id=job,
                    resident_models=len(residents),
                    resident_bytes=sum(info.memory_bytes for info in residents),
                    worker_restarts=handle.restarts,
                    worker_rss_bytes=int(memory.get("rss", 0)),
                )
            )
        # The daemon process itself (gRPC, the job store, caption requests' models).
        devices.append(
            DeviceInfo(
                name="daemon",
                description=f"the daemon process (pid {os.getpid()}): gRPC, job store, caption requests",
                memory_total_bytes=0,
                memory_used_bytes=resident_set_bytes(),
                worker=-1,
                worker_pid=os.getpid(),
                worker_state="running",
                resident_models=len(self.registry.list()),
                resident_bytes=sum(info.memory_bytes for info in self.registry.list()),
            )
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
