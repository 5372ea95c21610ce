"""The daemon's job dispatcher: queued jobs onto the devices' workers, and every job's end into the store.

One thread schedules (:mod:`lorad.jobs.scheduling`: first in, first out, resident models first) and
hands each job to its workers (one per device: :mod:`lorad.workers`), one rank per device. The job's
events come back from its rank 0 and are stored and published here, in order; a checkpoint is stored
before the worker hears back (so the loop prunes the older ones only after that). The dispatcher
outlives every job: a job that fails ends FAILED with a hint; a worker that dies (whatever killed it)
takes only its own job, which is queued again to resume from its checkpoint on as many devices (or
fails after :data:`MAX_WORKER_DEATHS` deaths); the worker is started again.
"""

from __future__ import annotations

import contextlib
import logging
import sqlite3
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lorad.config.dispatch import parse_any_config
from lorad.errors import LoradError
from lorad.events import Event
from lorad.jobs.event_pump import EventPump
from lorad.jobs.hub import EventHub
from lorad.jobs.outcome import Outcome
from lorad.jobs.records import JobRecord, JobState
from lorad.jobs.scheduling import Slot, Waiting, Want, assign, want_for
from lorad.jobs.store import JobStore, store_failure
from lorad.training.run_requests import RequestNotDone
from lorad.workers.handle import WorkerHandle, WorkerUnavailable
from lorad.workers.host import JobOrder, WorkerSpec, config_mapping

log = logging.getLogger("lorad.dispatcher")

# How often the running job's progress is written to the store (events carry every step).
PROGRESS_WRITE_SECONDS = 2.0
# How often the dispatcher tries again to record a job's end when the store could not be written.
STORE_RETRY_SECONDS = 2.0
# After one rank of a job fails, how long its other ranks get to notice and end by themselves (gloo tells
# them at once; NCCL may wait in a collective forever) before their workers are ended.
RANK_GRACE_SECONDS = 15.0
# A job whose worker died this many times fails instead of resuming again (a crash that comes back).
MAX_WORKER_DEATHS = 3


@dataclass
class _Running:
    """A job the workers are running: its ranks' workers (rank 0 first) and what came back so far."""

    job: JobRecord
    slots: tuple[int, ...]
    pump: EventPump
    store_path: str = ""
    open_ranks: set[int] = field(default_factory=set)
    outcomes: dict[int, Outcome] = field(default_factory=dict)
    failure: Outcome | None = None
    died: str = ""  # why a worker of the job died, when one did
    cancel: bool = False
    progress: dict[str, float] | None = None
    last_write: float = 0.0
    timer: threading.Timer | None = None


class Dispatcher:
    """Schedules queued jobs on the workers of ``slots`` and records how they end. Thread-safe.

    ``spec_for(slot)`` is the worker's start-up settings. ``hold_folder(folder)`` / ``release_folder``
    give a job's captioning the daemon's lock on a caption folder. ``in_process`` runs the workers in
    threads of this process (``train`` may then be injected; jobs take one device each)."""

    def __init__(
        self,
        store: JobStore,
        hub: EventHub,
        slots: Sequence[Slot],
        spec_for: Callable[[Slot], WorkerSpec],
        *,
        in_process: bool = False,
        train: Callable[..., object] | None = None,
        hold_folder: Callable[[str], None] = lambda folder: None,
        release_folder: Callable[[str], None] = lambda folder: None,
    ) -> None:
        self.store = store
        self.hub = hub
        self.slots = list(slots)
        self.in_process = in_process
        self.handles = [
            WorkerHandle(
                slot,
                spec_for(slot),
                on_note=self._on_note,
                on_call=self._on_call,
                on_death=self._on_death,
                in_process=in_process,
                train=train,
            )
            for slot in self.slots
        ]
        self._hold_folder = hold_folder
        self._release_folder = release_folder
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._shutdown = threading.Event()
        self._running: dict[str, _Running] = {}
        self._slot_job: dict[int, str] = {}
        self._wants: dict[str, tuple[str, Want]] = {}  # job_id -> (config text, what it wants)
        self._residents: dict[int, set[str]] = {}  # worker -> base models resident there (as last heard)
        self._held: dict[int, list[str]] = {}  # worker -> caption folders its jobs hold
        # Job ends the store could not take (full disk, damaged file): job_id -> (changes, (kind, payload)).
        # Retried until they are recorded; until then get_job shows them (see pending_outcome).
        self._unrecorded: dict[str, tuple[dict, tuple[str, dict]]] = {}
        self._thread = threading.Thread(target=self._run, name="lorad-dispatcher", daemon=True)

    # --- control -------------------------------------------------------------------------------
    def start(self, *, start_workers: bool = False) -> None:
        """Start scheduling; with ``start_workers`` start every worker now (else each starts with its first job)."""
        if not self.in_process:
            # Every spawn needs multiprocessing's resource tracker, which is started with sys.stderr's descriptor:
            # start it now, while that is the daemon's own stderr. A host that swaps sys.stderr later (Textual
            # does, for a TUI sharing the process in tests) would otherwise make the first worker's start fail
            # with "bad value(s) in fds_to_keep".
            from multiprocessing import resource_tracker

            resource_tracker.ensure_running()
        if start_workers:
            for handle in self.handles:
                handle.start()
        self._thread.start()

    def wake(self) -> None:
        """A job was queued (or a device freed): look at the queue now."""
        self._wake.set()

    def shutdown(self, timeout: float | None = None) -> None:
        """Stop every running job after its current step (each saves a checkpoint and stays INTERRUPTED, to
        resume on the next start), then stop the workers."""
        self._shutdown.set()
        self._wake.set()
        with self._lock:
            running = list(self._running.values())
        for job in running:
            self._send_stop(job)
        deadline = time.monotonic() + (timeout if timeout is not None else 120.0)
        asked = time.monotonic()
        while time.monotonic() < deadline:
            with self._lock:
                running = list(self._running.values())
            if not running:
                break
            if time.monotonic() - asked > 1.0:  # a rank whose worker was still starting hears it now
                asked = time.monotonic()
                for job in running:
                    self._send_stop(job)
            time.sleep(0.05)
        for handle in self.handles:
            handle.shutdown(timeout=max(1.0, deadline - time.monotonic()))
        self._thread.join(timeout=10)

    def check_want(self, request: Any, device: str) -> Want:
        """What a config's ``devices``/``device`` ask of this daemon's workers; ConfigError when it cannot be met."""
        return want_for(request, device, self.slots, max_ranks=1 if self.in_process else None)

    @property
    def running_job_ids(self) -> list[str]:
        """The jobs training now, oldest first."""
        with self._lock:
            jobs = sorted(self._running.values(), key=lambda r: (r.job.created_at, r.job.job_id))
        return [r.job.job_id for r in jobs]

    def job_on(self, index: int) -> str:
        """The job worker ``index`` trains now, or ""."""
        with self._lock:
            return self._slot_job.get(index, "")

    def devices_of(self, job_id: str) -> list[str]:
        """The devices a running job trains on, rank 0 first ([] when it is not running)."""
        with self._lock:
            running = self._running.get(job_id)
            return [self.slots[i].device for i in running.slots] if running else []

    def live_progress(self, job_id: str) -> dict[str, float] | None:
        """The running job's latest step, fresher than the store's copy."""
        with self._lock:
            running = self._running.get(job_id)
            return dict(running.progress) if running and running.progress else None

    def pending_outcome(self, job_id: str) -> dict | None:
        """The end of a job (its state, error, hint, ...) that the store has not taken yet, or None."""
        with self._lock:
            pending = self._unrecorded.get(job_id)
        return dict(pending[0]) if pending else None

    def cancel_running(self, job_id: str) -> bool:
        """Ask the running job to stop after its current step; False if it is not running."""
        with self._lock:
            running = self._running.get(job_id)
            if running is None:
                return False
            running.cancel = True
        self._send_stop(running)
        return True

    def ask_running(self, job_id: str, kind: str, *, timeout: float) -> list[Event]:
        """Ask the running job to ``kind`` ("sample" or "save", see lorad.training.run_requests) after its
        current step, through the worker of its rank 0, and wait for the events that produced;
        RequestNotDone if it is not training (or its worker went away meanwhile)."""
        with self._lock:
            running = self._running.get(job_id)
        if running is None:
            raise RequestNotDone(f"job {job_id} is not training now", "ask while the job is running")
        try:
            # The worker waits up to ``timeout`` for the step to end; the channel allows a little more.
            handle = self.handles[running.slots[0]]
            return handle.call("ask", timeout=timeout + 30, job_id=job_id, kind=kind, wait=timeout)
        except WorkerUnavailable as err:
            raise RequestNotDone(f"job {job_id} is not training now: {err}", "ask again once it resumes") from None

    def note_residents(self, index: int, base_models: set[str]) -> None:
        """What worker ``index`` holds now (after a job, a load or a listing): the scheduler prefers it for
        jobs on those base models."""
        with self._lock:
            self._residents[index] = set(base_models)

    # --- scheduling ----------------------------------------------------------------------------
    def _run(self) -> None:
        while not self._shutdown.is_set():
            if self._unrecorded and not self._record_pending():
                self._wake.wait(timeout=STORE_RETRY_SECONDS)  # the store still refuses writes: no new job
                self._wake.clear()
                continue
            try:
                self._schedule()
            except sqlite3.Error as err:  # the store cannot be read or written now: try again shortly
                log.error("the job store: %s", store_failure(self.store.path, err))
                self._wake.wait(timeout=STORE_RETRY_SECONDS)
                continue
            except Exception:  # the dispatcher must outlive anything
                log.exception("scheduling")
            self._wake.wait(timeout=5.0)
            self._wake.clear()

    def _schedule(self) -> None:
        queued = {job.job_id: job for job in self.store.queued()}
        waiting = []
        for job in queued.values():
            want = self._want(job)
            if want is not None:
                waiting.append(Waiting(job.job_id, want, job.base_model))
        with self._lock:
            free = [
                h.index
                for h in self.handles
                if h.index not in self._slot_job and h.state not in ("restarting", "stopped")
            ]
            residents = {index: set(models) for index, models in self._residents.items()}
        for job_id, slots in assign(waiting, free, residents):
            if self._shutdown.is_set():
                return
            job = queued[job_id]
            claimed = self.store.transition(
                job_id, expect={JobState.QUEUED}, to=JobState.RUNNING, started_at=time.time(), attempt=job.attempt + 1
            )
            if claimed is None:  # cancelled meanwhile
                continue
            self._wants.pop(job_id, None)
            running = _Running(
                job=claimed,
                slots=slots,
                pump=EventPump(job_id, self.hub.publish),  # the run's events, published off the link's thread
                open_ranks=set(range(len(slots))),
            )
            with self._lock:
                self._running[job_id] = running
                for index in slots:
                    self._slot_job[index] = job_id
            threading.Thread(target=self._launch, args=(running,), name=f"lorad-launch-{job_id}", daemon=True).start()

    def _want(self, job: JobRecord) -> Want | None:
        """What a queued job wants (parsed once per config text); a job whose config or devices can never
        be satisfied fails here, with the reason."""
        cached = self._wants.get(job.job_id)
        if cached is not None and cached[0] == job.config_yaml:
            return cached[1]
        try:
            config = parse_any_config(
                config_mapping(job.config_yaml),
                base_dir=Path(job.base_dir),
                source=job.source_name or f"job {job.job_id}",
            )
            want = self.check_want(config.devices, config.device)
        except LoradError as err:
            failed = self.store.transition(
                job.job_id,
                expect={JobState.QUEUED},
                to=JobState.FAILED,
                finished_at=time.time(),
                error=str(err),
                hint=err.hint,
            )
            if failed is not None:
                self.hub.publish(
                    job.job_id, "failed", {"error": str(err), "hint": err.hint, "checkpoint": job.checkpoint}
                )
            return None
        self._wants[job.job_id] = (job.config_yaml, want)
        return want

    def _launch(self, running: _Running) -> None:
        """Start the job's workers if needed, say the job started, and hand each its rank."""
        job = running.job
        try:
            for index in running.slots:
                self.handles[index].ensure_started()
        except WorkerUnavailable as err:
            for rank in range(len(running.slots)):
                self._rank_ended(running, rank, Outcome("failed", error=str(err), hint=err.hint))
            return
        if self._shutdown.is_set():  # the daemon stops: the job waits for the next start, as if interrupted
            for rank in range(len(running.slots)):
                self._rank_ended(running, rank, Outcome("stopped"))
            return
        with self._lock:
            if running.outcomes:  # a worker died while starting: the job is queued again already
                return
        config = config_mapping(job.config_yaml)
        resumed_from = ""
        if job.attempt > 1 and job.checkpoint and Path(job.checkpoint).is_dir():
            # Only this job's own checkpoint (recorded from its events): never an older run's in the same folder.
            config["resume_from"] = job.checkpoint
            resumed_from = job.checkpoint
        elif job.attempt > 1 and config.get("resume_from"):
            resumed_from = str(config["resume_from"])
        devices = [self.slots[i].device for i in running.slots]
        world = len(running.slots)
        if world > 1:
            # The ranks meet through a file in the private state folder (0700): nobody else can join.
            folder = self.store.path.parent / "rendezvous"
            folder.mkdir(mode=0o700, parents=True, exist_ok=True)
            running.store_path = str(folder / f"{job.job_id}-{job.attempt}")
            Path(running.store_path).unlink(missing_ok=True)
        self.hub.publish(
            job.job_id, "started", {"attempt": job.attempt, "device": ",".join(devices), "resumed_from": resumed_from}
        )
        keep_alive = job.keep_alive_seconds if job.keep_alive_seconds > 0 else None
        for rank, index in enumerate(running.slots):
            order = JobOrder(
                job_id=job.job_id,
                config=config,
                base_dir=job.base_dir,
                source=job.source_name or f"job {job.job_id}",
                keep_alive=keep_alive,
                rank=rank,
                world=world,
                store_path=running.store_path,
            )
            with contextlib.suppress(WorkerUnavailable):  # it died just now: its death ends this rank (_on_death)
                self.handles[index].note("run", order=order)
        with self._lock:
            cancelled = running.cancel
        if cancelled:  # cancelled while its workers started: that stop found no job to stop, this one does
            self._send_stop(running)

    # --- what the workers send ---------------------------------------------------------------------
    def _on_note(self, handle: WorkerHandle, op: str, args: dict[str, Any]) -> None:
        with self._lock:
            running = self._running.get(args.get("job_id", ""))
        if running is None:
            return
        if op == "event":
            kind, payload = args["kind"], args["payload"]
            running.pump.put(kind, payload)
            if kind == "step":
                running.progress = dict(payload)
                now = time.monotonic()
                if now - running.last_write >= PROGRESS_WRITE_SECONDS:
                    running.last_write = now
                    try:
                        self.store.update(running.job.job_id, progress=running.progress)
                    except sqlite3.Error as err:
                        log.warning("job %s: progress not stored: %s", running.job.job_id, err)
        elif op == "ended":
            self._rank_ended(running, int(args["rank"]), args["outcome"])

    def _on_call(self, handle: WorkerHandle, op: str, args: dict[str, Any]) -> Any:
        if op == "checkpoint":
            with self._lock:
                running = self._running.get(args["job_id"])
            if running is None:
                return None
            payload = args["payload"]
            try:
                # Stored before anyone hears of it, and before the loop prunes older checkpoints (it does so
                # when this returns): a daemon killed at any moment resumes from a checkpoint that exists.
                self.store.update(running.job.job_id, checkpoint=payload["path"], progress=running.progress)
            except sqlite3.Error as err:  # the run fails with this (a full disk under LORAD_HOME, ...)
                raise store_failure(self.store.path, err) from None
            running.pump.put("checkpoint_saved", payload)
            return None
        if op == "hold_folder":
            self._hold_folder(args["folder"])
            with self._lock:
                self._held.setdefault(handle.index, []).append(args["folder"])
            return None
        if op == "release_folder":
            with self._lock:
                held = self._held.get(handle.index, [])
                owned = args["folder"] in held
                if owned:
                    held.remove(args["folder"])
            if owned:
                self._release_folder(args["folder"])
            return None
        raise ValueError(f"unknown call from worker {handle.index}: {op!r}")

    def _on_death(self, handle: WorkerHandle, reason: str) -> None:
        """A worker's process ended unasked: its caption folders are free again, and its job lost a rank."""
        with self._lock:
            folders = self._held.pop(handle.index, [])
            self._residents.pop(handle.index, None)
            job_id = self._slot_job.get(handle.index)
            running = self._running.get(job_id) if job_id else None
        for folder in folders:
            self._release_folder(folder)
        if running is None:
            return
        rank = running.slots.index(handle.index)
        why = f"the worker on {handle.device} died ({reason})"
        with self._lock:
            if rank not in running.open_ranks:
                return  # its part of the job had ended already
            running.died = running.died or why
        self._rank_ended(running, rank, Outcome("failed", error=why))

    # --- a job's end -----------------------------------------------------------------------------
    def _rank_ended(self, running: _Running, rank: int, outcome: Outcome) -> None:
        with self._lock:
            if rank not in running.open_ranks:
                return
            running.open_ranks.discard(rank)
            running.outcomes[rank] = outcome
            if outcome.state == "failed" and (
                running.failure is None or (running.failure.peer_lost and not outcome.peer_lost)
            ):
                running.failure = outcome
            left = sorted(running.open_ranks)
            died = bool(running.died)
        if left and (died or outcome.state == "failed"):
            # The other ranks wait in a collective that will not complete: a dead rank's peers are ended at
            # once (NCCL cannot be trusted after that); after a failure they get a moment to end by themselves.
            self._end_ranks_after(running, 0.0 if died else RANK_GRACE_SECONDS)
        if not left:
            self._finish(running)

    def _end_ranks_after(self, running: _Running, seconds: float) -> None:
        def end_them() -> None:
            with self._lock:
                left = [running.slots[rank] for rank in running.open_ranks]
            for index in left:
                self.handles[index].kill()  # its death ends its rank (see _on_death)

        with self._lock:
            if running.timer is not None:
                if seconds > 0:
                    return
                running.timer.cancel()
            running.timer = threading.Timer(seconds, end_them)
            running.timer.daemon = True
            running.timer.start()

    def _finish(self, running: _Running) -> None:
        job = running.job
        if running.timer is not None:
            running.timer.cancel()
        publish_error = running.pump.close()  # every event of the run is stored before its final state
        if running.store_path:
            Path(running.store_path).unlink(missing_ok=True)
        try:
            self._record(running, publish_error)
        finally:
            with self._lock:
                self._running.pop(job.job_id, None)
                for index in running.slots:
                    if self._slot_job.get(index) == job.job_id:
                        del self._slot_job[index]
            self.hub.forget(job.job_id)
            threading.Thread(target=self._refresh_residents, args=(running.slots,), daemon=True).start()
            self.wake()

    def _record(self, running: _Running, publish_error: BaseException | None) -> None:
        job = running.job
        progress = running.progress
        main = running.outcomes.get(0, Outcome("failed"))
        if running.died:
            if self._shutdown.is_set():
                return  # stays RUNNING: the next daemon start resumes it
            self._resume_after_death(running)
        elif publish_error is not None:
            failure = (
                store_failure(self.store.path, publish_error)
                if isinstance(publish_error, sqlite3.Error)
                else LoradError(f"{type(publish_error).__name__}: {publish_error}", "")
            )
            self._fail(job, str(failure), failure.hint, progress)
        elif running.failure is not None:
            self._fail(job, running.failure.error, running.failure.hint, progress)
        elif main.state == "stopped":
            self._stopped(running, main)
        else:
            changes = {
                "state": JobState.SUCCEEDED,
                "finished_at": time.time(),
                "outputs": (main.finished or {}).get("outputs", {}),
                "progress": progress,
            }
            # State first, then the event: a watcher that sees "finished" and asks finds SUCCEEDED.
            self._end(job, changes, ("finished", main.finished or {}))

    def _resume_after_death(self, running: _Running) -> None:
        """Queue the job again (it resumes from its checkpoint on as many devices), unless its workers died
        too often running it."""
        job = running.job
        try:
            current = self.store.get(job.job_id)
            deaths = 1 + sum(
                1 for e in self.store.events(job.job_id) if e.kind == "interrupted" and e.payload.get("reason")
            )
        except sqlite3.Error as err:
            failure = store_failure(self.store.path, err)
            self._end(job, {"state": JobState.FAILED, "error": str(failure), "hint": failure.hint}, ("failed", {}))
            return
        if deaths >= MAX_WORKER_DEATHS:
            self._fail(
                job,
                f"{running.died}; its workers died {deaths} times running this job",
                "A crash inside native code (a CUDA error, a kernel's segfault) or the system ending the process "
                "(out of host memory). The daemon log has the worker's last lines; resubmit with "
                f"`resume_from: {current.checkpoint}` once it is fixed."
                if current.checkpoint
                else "A crash inside native code (a CUDA error, a kernel's segfault) or the system ending the process "
                "(out of host memory). The daemon log has the worker's last lines.",
                running.progress,
            )
            return
        self._end(
            job,
            {"state": JobState.QUEUED, "progress": running.progress},
            ("interrupted", {"checkpoint": current.checkpoint, "will_resume": True, "reason": running.died}),
        )

    def _stopped(self, running: _Running, outcome: Outcome) -> None:
        job = running.job
        checkpoint = outcome.checkpoint or self._recorded_checkpoint(job)
        partial = {"partial": outcome.partial} if outcome.partial else {}
        if running.cancel:
            changes = {"state": JobState.CANCELLED, "finished_at": time.time()}
            event = ("cancelled", {"checkpoint": outcome.checkpoint or "", **partial})
        else:  # the daemon is shutting down: resume on the next start
            changes = {"state": JobState.INTERRUPTED}
            event = ("interrupted", {"checkpoint": outcome.checkpoint or "", "will_resume": True, **partial})
        self._end(job, changes | {"checkpoint": checkpoint, "progress": running.progress}, event)

    def _fail(self, job: JobRecord, error: str, hint: str, progress: dict[str, float] | None) -> None:
        checkpoint = self._recorded_checkpoint(job)
        changes = {
            "state": JobState.FAILED,
            "finished_at": time.time(),
            "error": error,
            "hint": hint,
            "progress": progress,
        }
        self._end(job, changes, ("failed", {"error": error, "hint": hint, "checkpoint": checkpoint}))

    def _recorded_checkpoint(self, job: JobRecord) -> str:
        try:
            return self.store.get(job.job_id).checkpoint
        except sqlite3.Error:
            return job.checkpoint

    def _end(self, job: JobRecord, changes: dict, event: tuple[str, dict]) -> None:
        """Record the job's final state, then tell its watchers. A store that refuses the write (full disk,
        damaged file) must not leave the job RUNNING with no worker: the end is kept here, shown by get_job
        (pending_outcome), and recorded as soon as the store takes writes."""
        try:
            self.store.update(job.job_id, **changes)
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

    # --- helpers ----------------------------------------------------------------------------------
    def _send_stop(self, running: _Running) -> None:
        for index in running.slots:
            with contextlib.suppress(WorkerUnavailable):
                self.handles[index].note("stop", job_id=running.job.job_id)

    def _refresh_residents(self, slots: Sequence[int]) -> None:
        for index in slots:
            handle = self.handles[index]
            if not handle.started:
                continue
            try:
                infos = handle.call("list", timeout=30)
            except (WorkerUnavailable, LoradError):
                continue
            self.note_residents(index, {info.key.base_model for info in infos})
