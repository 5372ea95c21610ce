"""The worker: runs queued jobs one at a time on its device, and survives every job failure."""

from __future__ import annotations

import logging
import sqlite3
import threading
import time
import traceback
from collections.abc import Callable
from pathlib import Path

import yaml

from lorad.config.dispatch import parse_any_config
from lorad.config.schema import TrainingKeys
from lorad.disk_space import disk_full_error, is_disk_full
from lorad.errors import LoradError, TrainingInterrupted, is_out_of_memory
from lorad.events import CheckpointSaved, Event, StepDone
from lorad.families.registry import spec_for
from lorad.jobs.event_pump import EventPump
from lorad.jobs.hub import EventHub
from lorad.jobs.payloads import engine_event_payload
from lorad.jobs.records import JobRecord, JobState
from lorad.jobs.store import JobStore, store_failure
from lorad.training.run_requests import RequestNotDone, RunRequests

log = logging.getLogger("lorad.worker")

# How often the running job's progress is written to the store (events carry every step).
PROGRESS_WRITE_SECONDS = 2.0
# How often the worker tries again to record a job's end when the store could not be written.
STORE_RETRY_SECONDS = 2.0


class Worker:
    """One thread that takes QUEUED jobs in order and trains them.

    ``train`` is the training loop (``lorad.training.loop.train``) and ``models``
    the model provider handed to it; both are injected so the daemon wires the real ones and the
    module stays importable without torch. ``captions(config, on_event, stop)``, when given, makes
    each job's ``caption_missing`` hook (images without a caption are captioned before training).
    """

    def __init__(
        self,
        store: JobStore,
        hub: EventHub,
        *,
        train: Callable[..., object],
        models: Callable,
        device_name: str = "auto",
        captions: Callable[[TrainingKeys, Callable[[Event], None], threading.Event], Callable] | None = None,
    ) -> None:
        self.store = store
        self.hub = hub
        self.train = train
        self.models = models
        self.captions = captions
        self.device_name = device_name
        self._wake = threading.Event()
        self._shutdown = threading.Event()
        self._lock = threading.Lock()
        self._current: tuple[str, threading.Event] | None = None  # (job_id, its stop event)
        self._requests: dict[str, RunRequests] = {}  # the running job's "sample now" / "save now" channel
        self._cancel_requested: set[str] = set()
        self._progress: dict[str, dict[str, float]] = {}
        # Job ends the store could not take (full disk, damaged file): job_id -> (changes, (kind, payload)).
        # Retried until they are recorded; until then get_job shows them (see pending_outcome).
        self._unrecorded: dict[str, tuple[dict, tuple[str, dict]]] = {}
        self._thread = threading.Thread(target=self._run, name="lorad-worker", daemon=True)

    # --- control -------------------------------------------------------------------------------
    def start(self) -> None:
        self._thread.start()

    def wake(self) -> None:
        """A job was queued: look at the queue now."""
        self._wake.set()

    def shutdown(self, timeout: float | None = None) -> None:
        """Stop after the running job saves a checkpoint; it stays INTERRUPTED, to resume later."""
        self._shutdown.set()
        with self._lock:
            if self._current:
                self._current[1].set()
        self._wake.set()
        self._thread.join(timeout)

    @property
    def running_job_id(self) -> str | None:
        with self._lock:
            return self._current[0] if self._current else None

    def live_progress(self, job_id: str) -> dict[str, float] | None:
        """The running job's latest step, fresher than the store's copy."""
        return self._progress.get(job_id)

    def pending_outcome(self, job_id: str) -> dict | None:
        """The end of a job (its state, error, hint, ...) that the store has not taken yet, or None."""
        with self._lock:
            pending = self._unrecorded.get(job_id)
        return dict(pending[0]) if pending else None

    def cancel_running(self, job_id: str) -> bool:
        """Ask the running job to stop after its current step; False if it is not running here."""
        with self._lock:
            if not self._current or self._current[0] != job_id:
                return False
            self._cancel_requested.add(job_id)
            self._current[1].set()
            return True

    def ask_running(self, job_id: str, kind: str, *, timeout: float) -> list[Event]:
        """Ask the running job to ``kind`` ("sample" or "save", see lorad.training.run_requests) after its
        current step, and wait for the events that produced; RequestNotDone if it is not training here."""
        with self._lock:
            channel = self._requests.get(job_id)
        if channel is None:
            raise RequestNotDone(f"job {job_id} is not training now", "ask while the job is running")
        return channel.ask(kind, timeout=timeout)

    # --- the loop ------------------------------------------------------------------------------
    def _run(self) -> None:
        while not self._shutdown.is_set():
            if self._unrecorded and not self._record_pending():
                self._wake.wait(timeout=STORE_RETRY_SECONDS)  # the store still refuses writes: no new job
                self._wake.clear()
                continue
            try:
                job = self.store.next_queued()
                claimed = (
                    self.store.transition(
                        job.job_id,
                        expect={JobState.QUEUED},
                        to=JobState.RUNNING,
                        started_at=time.time(),
                        attempt=job.attempt + 1,
                    )
                    if job is not None
                    else None
                )
            except sqlite3.Error as err:  # the store cannot be read or written now: try again shortly
                log.error("the job store: %s", store_failure(self.store.path, err))
                self._wake.wait(timeout=STORE_RETRY_SECONDS)
                continue
            if job is None:
                self._wake.wait(timeout=5.0)
                self._wake.clear()
                continue
            if claimed is None:  # cancelled between the two calls
                continue
            try:
                self._run_job(claimed)
            except Exception:  # the worker must outlive any job
                log.exception("unexpected error around job %s", claimed.job_id)

    def _run_job(self, job: JobRecord) -> None:
        stop = threading.Event()
        requests = RunRequests()
        with self._lock:
            self._current = (job.job_id, stop)
            self._requests[job.job_id] = requests
        try:
            config = self._job_config(job)
            resumed_from = str(config.resume_from or "") if job.attempt > 1 else ""
            self.hub.publish(
                job.job_id,
                "started",
                {"attempt": job.attempt, "device": self.device_name, "resumed_from": resumed_from},
            )
            finished: list[dict] = []
            pump = EventPump(job.job_id, self.hub.publish)  # the run's events, published off its thread
            sink = self._sink(job.job_id, finished, pump)
            try:
                # Images without a caption are captioned first when the family can and the config names a captioner.
                hooks = (
                    {"caption_missing": self.captions(config, sink, stop)}
                    if self.captions and spec_for(config).uses_captioner
                    else {}
                )
                self.train(config, on_event=sink, stop=stop, models=self.models, requests=requests, **hooks)
            finally:
                publish_error = pump.close()  # every event of the run is stored before its final state
            if publish_error is not None:
                raise publish_error
            # State first, then the event: a watcher that sees "finished" and asks finds SUCCEEDED.
            changes = {
                "state": JobState.SUCCEEDED,
                "finished_at": time.time(),
                "outputs": finished[0]["outputs"],
                "progress": self._progress.get(job.job_id),
            }
            self._end(job, changes, ("finished", finished[0]))
        except TrainingInterrupted as err:
            self._stopped(job, err)
        except LoradError as err:
            self._fail(job, str(err), err.hint)
        except sqlite3.Error as err:  # the job store refused a write (a full disk under LORAD_HOME, a damaged file)
            failure = store_failure(self.store.path, err)
            self._fail(job, str(failure), failure.hint)
        except Exception as err:
            if is_disk_full(err):
                full = disk_full_error(Path(job.output_dir), "the job's outputs")
                self._fail(job, str(full), full.hint)
            elif is_out_of_memory(err):
                config = self._job_config(job) if job.config_yaml else None
                hint = spec_for(config).out_of_memory_hint(config) if config else ""
                self._fail(job, f"out of memory: {err}".splitlines()[0], hint)
            else:
                log.error("job %s crashed:\n%s", job.job_id, traceback.format_exc())
                self._fail(
                    job,
                    f"{type(err).__name__}: {err}",
                    "This looks like a bug in lorad; the daemon log has the traceback.",
                )
        finally:
            with self._lock:
                self._current = None
                self._cancel_requested.discard(job.job_id)
                self._requests.pop(job.job_id, None)
            requests.close("the job is no longer training")
            self._progress.pop(job.job_id, None)
            self.hub.forget(job.job_id)

    def _job_config(self, job: JobRecord) -> TrainingKeys:
        """The stored config, resuming from this job's own newest checkpoint after an interruption.

        Only this job's checkpoint (recorded from its CheckpointSaved events) is used: an older
        run into the same output_dir must never be resumed by mistake.
        """
        raw = yaml.safe_load(job.config_yaml) or {}
        if job.attempt > 1 and job.checkpoint and Path(job.checkpoint).is_dir():
            raw = dict(raw) | {"resume_from": job.checkpoint}
        return parse_any_config(raw, base_dir=Path(job.base_dir), source=job.source_name or f"job {job.job_id}")

    def _sink(self, job_id: str, finished: list[dict], pump: EventPump) -> Callable[[Event], None]:
        """Queues engine events on ``pump``; the final one is held in ``finished`` for the worker to
        publish after the job's state is stored."""
        last_write = [0.0]

        def on_event(event: Event) -> None:
            kind, payload = engine_event_payload(event)
            if kind == "finished":
                finished.append(payload)
                return
            if isinstance(event, CheckpointSaved):
                # Stored before anyone hears of it, and before the engine prunes older checkpoints
                # (it does so when this returns): a daemon killed at any moment resumes from a
                # checkpoint that exists. A store that cannot take it raises, which fails the job.
                self.store.update(job_id, checkpoint=event.path, progress=self._progress.get(job_id))
            pump.put(kind, payload)
            if isinstance(event, StepDone):
                self._progress[job_id] = {k: v for k, v in payload.items()}
                now = time.monotonic()
                if now - last_write[0] >= PROGRESS_WRITE_SECONDS:
                    last_write[0] = now
                    self.store.update(job_id, progress=self._progress[job_id])

        return on_event

    def _stopped(self, job: JobRecord, err: TrainingInterrupted) -> None:
        checkpoint = err.checkpoint or self._recorded_checkpoint(job)
        partial = {"partial": err.partial} if err.partial else {}
        if job.job_id in self._cancel_requested:
            changes = {"state": JobState.CANCELLED, "finished_at": time.time()}
            event = ("cancelled", {"checkpoint": err.checkpoint or "", **partial})
        else:  # the daemon is shutting down: resume on the next start
            changes = {"state": JobState.INTERRUPTED}
            event = ("interrupted", {"checkpoint": err.checkpoint or "", "will_resume": True, **partial})
        self._end(job, changes | {"checkpoint": checkpoint, "progress": self._progress.get(job.job_id)}, event)

    def _fail(self, job: JobRecord, error: str, hint: str) -> None:
        checkpoint = self._recorded_checkpoint(job)
        changes = {
            "state": JobState.FAILED,
            "finished_at": time.time(),
            "error": error,
            "hint": hint,
            "progress": self._progress.get(job.job_id),
        }
        self._end(job, changes, ("failed", {"error": error, "hint": hint, "checkpoint": checkpoint}))

    def _recorded_checkpoint(self, job: JobRecord) -> str:
        try:
            return self.store.get(job.job_id).checkpoint
        except sqlite3.Error:
            return job.checkpoint

    def _end(self, job: JobRecord, changes: dict, event: tuple[str, dict]) -> None:
        """Record the job's final state, then tell its watchers. A store that refuses the write
        (full disk, damaged file) must not leave the job RUNNING with no worker: the end is kept
        here, shown by get_job (pending_outcome), and recorded as soon as the store takes writes."""
        try:
            self.store.update(job.job_id, **changes)
            with self._lock:  # no longer this worker's job: a watcher that hears the end finds none running
                if self._current and self._current[0] == job.job_id:
                    self._current = None
            self.hub.publish(job.job_id, *event)
        except sqlite3.Error as err:
            failure = store_failure(self.store.path, err)
            log.error("job %s ended (%s) but %s", job.job_id, changes["state"].value, failure)
            with self._lock:
                self._unrecorded[job.job_id] = (changes, event)

    def _record_pending(self) -> bool:
        """Try to record the job ends the store refused before; True when none is left."""
        with self._lock:
            pending = list(self._unrecorded.items())
        for job_id, (changes, event) in pending:
            try:
                self.store.update(job_id, **changes)
                self.hub.publish(job_id, *event)
            except sqlite3.Error:
                return False
            with self._lock:
                self._unrecorded.pop(job_id, None)
            log.info("job %s: its end is recorded now", job_id)
        return True
