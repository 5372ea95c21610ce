"""The daemon's side of one device's worker: start it (``spawn``, never ``fork``: the daemon runs gRPC
threads), talk to it, notice when it dies, and start it again.

A worker starts with the first job or model request that needs it (``lorad serve`` starts them all at
once), and lives until the daemon stops. When its process ends unasked, whatever the cause (a native
crash, an out-of-memory kill, SIGKILL), the handle tells the dispatcher (:meth:`on_death`), which
resumes or fails the job it ran, and starts a new process for the device.
"""

from __future__ import annotations

import atexit
import logging
import multiprocessing
import multiprocessing.util  # before our exit handler is registered: ours then runs first (LIFO)
import os
import signal
import threading
import time
import weakref
from collections.abc import Callable
from typing import Any

from lorad.errors import LoradError
from lorad.jobs.scheduling import Slot
from lorad.workers.host import WorkerHost, WorkerSpec, worker_main
from lorad.workers.link import Link, LinkClosed

log = logging.getLogger("lorad.workers")

# How long a new worker may take to import torch and say it is ready.
START_TIMEOUT = 300.0
# A worker that dies this soon after starting, again and again, is restarted ever more slowly.
QUICK_DEATH_SECONDS = 30.0
MAX_RESTART_DELAY = 60.0

_SPAWN = multiprocessing.get_context("spawn")


class WorkerUnavailable(LoradError):
    """A device's worker could not be started (or died while asked something)."""


def machine_slots(cpu_workers: int) -> list[Slot]:
    """The daemon's workers: one per CUDA GPU (or the Apple GPU), then ``cpu_workers`` on the CPU (they
    train jobs that ask for the CPU, or every job on a machine without a GPU)."""
    import torch

    devices: list[str] = []
    if torch.cuda.is_available():
        devices += [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    elif torch.backends.mps.is_available():
        devices.append("mps")
    devices += ["cpu"] * cpu_workers
    return [Slot(index, device) for index, device in enumerate(devices)]


class WorkerHandle:
    """One device's worker, seen from the daemon. Thread-safe.

    ``on_note(handle, op, args)`` and ``on_call(handle, op, args)`` take what the worker sends (a job's
    events, its end, checkpoint records); ``on_death(handle, reason)`` hears that its process ended
    unasked (called before the new process starts). ``in_process`` runs the worker in a thread of this
    process instead (no crash isolation; ``train`` may then be injected)."""

    def __init__(
        self,
        slot: Slot,
        spec: WorkerSpec,
        *,
        on_note: Callable[[WorkerHandle, str, dict[str, Any]], None],
        on_call: Callable[[WorkerHandle, str, dict[str, Any]], Any],
        on_death: Callable[[WorkerHandle, str], None],
        in_process: bool = False,
        train: Callable[..., object] | None = None,
    ) -> None:
        self.slot = slot
        self.spec = spec
        self.in_process = in_process
        self._train = train
        self._on_note = on_note
        self._on_call = on_call
        self._on_death = on_death
        self._lock = threading.Lock()
        self._ready = threading.Event()
        self._bye = threading.Event()
        self._link: Link | None = None
        self._process: Any = None
        self._closing = False
        self._started_at = 0.0
        self._restart_delay = 0.0
        self.pid = 0
        self.restarts = 0
        self.host: WorkerHost | None = None  # the worker itself, when it runs in this process
        self.state = "not started"  # "starting", "ready", "restarting", "stopped"

    @property
    def index(self) -> int:
        return self.slot.index

    @property
    def device(self) -> str:
        return self.slot.device

    @property
    def started(self) -> bool:
        """Whether a worker process is up and ready."""
        return self._ready.is_set() and self.state == "ready"

    # --- life ----------------------------------------------------------------------------------
    def start(self) -> None:
        """Start the worker if it is not running or starting (returns at once; see :meth:`wait_ready`)."""
        with self._lock:
            if self._closing or self.state in ("starting", "ready", "restarting"):
                return
            self._launch()

    def ensure_started(self, timeout: float = START_TIMEOUT) -> None:
        """Start the worker if needed and wait until it is ready; WorkerUnavailable if it does not come up."""
        self.start()
        if not self._ready.wait(timeout) or self.state != "ready":
            raise WorkerUnavailable(
                f"the worker for {self.device} (worker {self.index}) did not start within {timeout:g} s",
                "the daemon log says why; `lorad status` shows the workers",
            )

    def _launch(self) -> None:
        """Start a worker process (or thread) with a fresh channel (lock held)."""
        parent, child = _SPAWN.Pipe(duplex=True)
        self._ready.clear()
        self._bye.clear()
        self.state = "starting"
        self._started_at = time.monotonic()
        link = Link(parent, on_call=self._call_from_worker, on_note=self._note_from_worker, name=f"worker {self.index}")
        self._link = link
        if self.in_process:
            host = WorkerHost(self.spec, child, train=self._train)
            self.host = host  # in this process: a debugger (or a test) may look at its models
            self._process = threading.Thread(target=host.serve, name=f"lorad-worker-{self.index}", daemon=True)
            self._process.start()
        else:
            self._process = _SPAWN.Process(
                target=worker_main, args=(child, self.spec), name=f"lorad-worker-{self.index}", daemon=False
            )
            try:
                self._process.start()
            except Exception as err:
                self.state = "not started"
                self._link = None
                link.close()
                child.close()
                raise WorkerUnavailable(
                    f"cannot start the worker for {self.device}: {type(err).__name__}: {err}".splitlines()[0],
                    "the daemon log has the details",
                ) from err
            child.close()  # the worker holds its end alone: its death closes the pipe for the daemon
            _LIVE.add(self._process)
        threading.Thread(
            target=self._serve, args=(link, self._process), name=f"lorad-link-{self.index}", daemon=True
        ).start()

    def _serve(self, link: Link, process: Any) -> None:
        """Read the worker until its channel closes; if that was not asked for, the worker died."""
        link.serve()
        reason = self._exit_reason(process)
        with self._lock:
            if self._link is not link:
                return
            self._ready.clear()
            if self._closing:
                self.state = "stopped"
                return
            self.state = "restarting"
            self.restarts += 1
            quick = time.monotonic() - self._started_at < QUICK_DEATH_SECONDS
            self._restart_delay = min(MAX_RESTART_DELAY, max(1.0, self._restart_delay * 2)) if quick else 0.0
            delay = self._restart_delay
        log.error("worker %d (%s, pid %d) died: %s; starting it again", self.index, self.device, self.pid, reason)
        try:
            self._on_death(self, reason)
        except Exception:
            log.exception("worker %d: handling its death", self.index)
        if delay:
            time.sleep(delay)
        with self._lock:
            if not self._closing and self._link is link:
                self._launch()

    def _exit_reason(self, process: Any) -> str:
        if isinstance(process, threading.Thread):
            return "its thread ended"
        process.join(timeout=10)
        code = process.exitcode
        if code is None:
            process.kill()  # it closed the channel but lives on: it can do nothing useful any more
            process.join(timeout=10)
            return "it closed its channel"
        if code < 0:
            try:
                return f"killed by {signal.Signals(-code).name}"
            except ValueError:
                return f"killed by signal {-code}"
        return f"exit code {code}"

    def kill(self) -> None:
        """End the worker process now (SIGKILL): for the other ranks of a job whose rank died, stuck in a
        collective that will never complete. It is started again like any dead worker."""
        process = self._process
        if process is not None and not isinstance(process, threading.Thread) and process.is_alive():
            log.warning("worker %d (%s): ending its process (pid %d)", self.index, self.device, process.pid)
            process.kill()

    def shutdown(self, timeout: float) -> None:
        """Ask the worker to stop its jobs (they checkpoint), unload its models and exit; kill it after
        ``timeout`` seconds."""
        with self._lock:
            self._closing = True
            link, process = self._link, self._process
        if link is None:
            self.state = "stopped"
            return
        try:
            link.note("shutdown")
            self._bye.wait(timeout)
        except LinkClosed:
            pass
        link.close()
        if process is not None and not isinstance(process, threading.Thread):
            process.join(timeout=10)
            if process.is_alive():
                process.kill()
                process.join(timeout=10)
        elif process is not None:
            process.join(timeout=10)
        self.state = "stopped"

    # --- talking to it -----------------------------------------------------------------------------
    def note(self, op: str, **args: Any) -> None:
        """Send the worker a one-way message; WorkerUnavailable when it is not running."""
        link = self._link
        if link is None or not self._ready.is_set():
            raise WorkerUnavailable(f"the worker for {self.device} is not running", "try again in a moment")
        try:
            link.note(op, **args)
        except LinkClosed as err:
            raise WorkerUnavailable(f"the worker for {self.device} went away: {err}", "try again in a moment") from None

    def call(self, op: str, *, timeout: float | None = None, **args: Any) -> Any:
        """Ask the worker and wait for its answer; its errors are raised here, WorkerUnavailable when it is
        gone."""
        link = self._link
        if link is None or not self._ready.is_set():
            raise WorkerUnavailable(f"the worker for {self.device} is not running", "try again in a moment")
        try:
            return link.call(op, timeout=timeout, **args)
        except LinkClosed as err:
            raise WorkerUnavailable(f"the worker for {self.device} went away: {err}", "try again in a moment") from None

    def _note_from_worker(self, op: str, args: dict[str, Any]) -> None:
        if op == "ready":
            self.pid = int(args["pid"])
            with self._lock:
                self.state = "ready"
            self._ready.set()
            log.info("worker %d (%s) ready, pid %d", self.index, self.device, self.pid)
        elif op == "bye":
            self._bye.set()
        else:
            self._on_note(self, op, args)

    def _call_from_worker(self, op: str, args: dict[str, Any]) -> Any:
        return self._on_call(self, op, args)


# Worker processes still running when the daemon's interpreter exits without stopping them (an
# exception in serve): killed first, so multiprocessing's own exit handler does not wait on them forever.
_LIVE: weakref.WeakSet[Any] = weakref.WeakSet()


@atexit.register
def _kill_live_workers() -> None:
    for process in list(_LIVE):
        if process.is_alive() and process.pid != os.getpid():
            process.kill()
