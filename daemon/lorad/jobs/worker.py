"""The worker: runs queued jobs one at a time on its device, and survives every job failure."""

from __future__ import annotations

import logging
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import yaml

from lorad.config.dispatch import parse_any_config
from lorad.config.schema import TrainingKeys
from lorad.errors import LoradError, TrainingInterrupted
from lorad.events import CheckpointSaved, Event, StepDone
from lorad.families.registry import spec_for
from lorad.jobs.hub import EventHub
from lorad.jobs.payloads import engine_event_payload
from lorad.jobs.records import JobRecord, JobState
from lorad.jobs.store import JobStore

log = logging.getLogger("lorad.worker")

# How often the running job's progress is written to the store (events carry every step).
PROGRESS_WRITE_SECONDS = 2.0


def is_out_of_memory(err: BaseException) -> bool:
    """torch's CUDA/MPS OOM errors (OutOfMemoryError, or a RuntimeError saying so) and MemoryError."""
    return isinstance(err, MemoryError) or (
        type(err).__name__ == "OutOfMemoryError" or (isinstance(err, RuntimeError) and "out of memory" in str(err))
    )


@contextmanager
def _no_models(config: TrainingKeys, placement: object) -> Iterator[object]:
    raise AssertionError("the worker was started without a model provider")  # pragma: no cover
    yield


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
        models: Callable = _no_models,
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
        self._cancel_requested: set[str] = set()
        self._progress: dict[str, dict[str, float]] = {}
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

    def cancel_running(self, job_id: str) -> bool:
        """Ask the running job to stop after its current step; False if it is not running here."""
        with self._lock:
            if not self._current or self._current[0] != job_id:
                return False
            self._cancel_requested.add(job_id)
            self._current[1].set()
            return True

    # --- the loop ------------------------------------------------------------------------------
    def _run(self) -> None:
        while not self._shutdown.is_set():
            job = self.store.next_queued()
            if job is None:
                self._wake.wait(timeout=5.0)
                self._wake.clear()
                continue
            claimed = self.store.transition(
                job.job_id,
                expect={JobState.QUEUED},
                to=JobState.RUNNING,
                started_at=time.time(),
                attempt=job.attempt + 1,
            )
            if claimed is None:  # cancelled between the two calls
                continue
            try:
                self._run_job(claimed)
            except Exception:  # the worker must outlive any job
                log.exception("unexpected error around job %s", claimed.job_id)

    def _run_job(self, job: JobRecord) -> None:
        stop = threading.Event()
        with self._lock:
            self._current = (job.job_id, stop)
        try:
            config = self._job_config(job)
            resumed_from = str(config.resume_from or "") if job.attempt > 1 else ""
            self.hub.publish(
                job.job_id,
                "started",
                {"attempt": job.attempt, "device": self.device_name, "resumed_from": resumed_from},
            )
            finished: list[dict] = []
            sink = self._sink(job.job_id, finished)
            # Images without a caption are captioned first when the family can and the config names a captioner.
            hooks = (
                {"caption_missing": self.captions(config, sink, stop)}
                if self.captions and spec_for(config).uses_captioner
                else {}
            )
            self.train(config, on_event=sink, stop=stop, models=self.models, **hooks)
            # State first, then the event: a watcher that sees "finished" and asks finds SUCCEEDED.
            self.store.update(
                job.job_id,
                state=JobState.SUCCEEDED,
                finished_at=time.time(),
                outputs=finished[0]["outputs"],
                progress=self._progress.get(job.job_id),
            )
            self.hub.publish(job.job_id, "finished", finished[0])
        except TrainingInterrupted as err:
            self._stopped(job, err)
        except LoradError as err:
            self._fail(job, str(err), err.hint)
        except Exception as err:
            if is_out_of_memory(err):
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

    def _sink(self, job_id: str, finished: list[dict]) -> Callable[[Event], None]:
        """Publishes engine events; the final one is held in ``finished`` for the worker to publish
        after the job's state is stored."""
        last_write = [0.0]

        def on_event(event: Event) -> None:
            kind, payload = engine_event_payload(event)
            if kind == "finished":
                finished.append(payload)
                return
            if isinstance(event, CheckpointSaved):
                # Stored before anyone hears of it: a daemon killed right after still resumes from it.
                self.store.update(job_id, checkpoint=event.path, progress=self._progress.get(job_id))
            self.hub.publish(job_id, kind, payload)
            if isinstance(event, StepDone):
                self._progress[job_id] = {k: v for k, v in payload.items()}
                now = time.monotonic()
                if now - last_write[0] >= PROGRESS_WRITE_SECONDS:
                    last_write[0] = now
                    self.store.update(job_id, progress=self._progress[job_id])

        return on_event

    def _stopped(self, job: JobRecord, err: TrainingInterrupted) -> None:
        checkpoint = err.checkpoint or ""
        if job.job_id in self._cancel_requested:
            self.store.update(
                job.job_id,
                state=JobState.CANCELLED,
                finished_at=time.time(),
                checkpoint=checkpoint or self.store.get(job.job_id).checkpoint,
                progress=self._progress.get(job.job_id),
            )
            self.hub.publish(job.job_id, "cancelled", {"checkpoint": checkpoint})
        else:  # the daemon is shutting down: resume on the next start
            self.store.update(
                job.job_id,
                state=JobState.INTERRUPTED,
                checkpoint=checkpoint or self.store.get(job.job_id).checkpoint,
                progress=self._progress.get(job.job_id),
            )
            self.hub.publish(job.job_id, "interrupted", {"checkpoint": checkpoint, "will_resume": True})

    def _fail(self, job: JobRecord, error: str, hint: str) -> None:
        checkpoint = self.store.get(job.job_id).checkpoint
        self.store.update(
            job.job_id,
            state=JobState.FAILED,
            finished_at=time.time(),
            error=error,
            hint=hint,
            progress=self._progress.get(job.job_id),
        )
        self.hub.publish(job.job_id, "failed", {"error": error, "hint": hint, "checkpoint": checkpoint})
