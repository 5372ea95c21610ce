"""A device's worker: the process that owns one device, keeps its resident models and runs its jobs.

The daemon starts one per device with ``spawn`` (:mod:`lorad.workers.handle`) and talks to it over a
pipe (:mod:`lorad.workers.link`). The worker runs each job through the one training loop on its own
device and its own model registry, and sends the job's events back as they come; a checkpoint is
reported with a call that returns only once the daemon has recorded it, so the loop prunes older
checkpoints only after that (nothing is lost when anything dies at any moment). A job on several
devices runs one rank here, in a process group joined for that job and left afterwards.

Whatever kills the worker (a CUDA error, a segfault in a kernel, SIGKILL) takes only this process:
the daemon sees its pipe close, resumes or fails the job it ran, and starts a new worker.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import threading
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import yaml

from lorad.config.dispatch import parse_any_config
from lorad.config.schema import TrainingKeys
from lorad.events import CheckpointSaved, Event
from lorad.families.registry import spec_for
from lorad.jobs.outcome import Outcome, outcome_of
from lorad.jobs.payloads import engine_event_payload
from lorad.models.registry import ModelRegistry
from lorad.models.residents import (
    base_model_provider,
    captioner_provider,
    lorad_registry,
    preload_key,
    resident_set_bytes,
    total_memory_bytes,
)
from lorad.training.run_requests import RequestNotDone, RunRequests
from lorad.workers.link import Link, LinkClosed

log = logging.getLogger("lorad.workers.host")

# How often the worker unloads models whose keep-alive ran out.
REAP_SECONDS = 5.0


@dataclass(frozen=True)
class WorkerSpec:
    """What a worker is told when it starts: its index and device, and the daemon's settings it needs."""

    index: int
    device: str  # "cuda:1", "cpu", "mps"
    home: str
    default_keep_alive: float
    memory_budget_bytes: int | None
    log_level: int = logging.INFO
    # torch's CPU threads in this worker (several CPU workers share the cores); 0 leaves torch's default.
    threads: int = 0


@dataclass(frozen=True)
class JobOrder:
    """One rank of a job, as the daemon hands it to a worker.

    ``config`` is the job's config mapping (resume_from already pointing at the job's own checkpoint
    when it resumes), parsed here against ``base_dir``. ``rank`` of ``world``: a job on several devices
    meets its other ranks through a FileStore at ``store_path``. ``keep_alive``: seconds the base model
    stays resident after the job (None: the daemon's default)."""

    job_id: str
    config: dict[str, Any]
    base_dir: str
    source: str
    keep_alive: float | None = None
    rank: int = 0
    world: int = 1
    store_path: str = ""


def job_config(order: JobOrder) -> TrainingKeys:
    """The job's parsed config (ConfigError names every problem)."""
    return parse_any_config(order.config, base_dir=Path(order.base_dir), source=order.source)


def config_mapping(config_yaml: str) -> dict[str, Any]:
    """A stored job config's YAML as a mapping (the daemon stored what it validated at submit)."""
    raw = yaml.safe_load(config_yaml) or {}
    return dict(raw) if isinstance(raw, dict) else {}


class WorkerHost:
    """The worker's side of the channel: jobs, resident models, memory. Runs in the worker process (or,
    with ``lorad serve --in-process``, in a thread of the daemon). ``train`` is the training loop
    (injected so tests can script it)."""

    def __init__(self, spec: WorkerSpec, connection: Any, *, train: Callable[..., object] | None = None) -> None:
        self.spec = spec
        self.device = spec.device
        self.registry: ModelRegistry = lorad_registry(
            default_keep_alive=spec.default_keep_alive, memory_budget_bytes=spec.memory_budget_bytes
        )
        if train is None:
            from lorad.training.loop import train as loop_train

            train = loop_train
        self.train = train
        self._lock = threading.Lock()
        self._jobs: dict[str, tuple[threading.Thread, threading.Event]] = {}
        self._requests: dict[str, RunRequests] = {}  # a job's "sample now" / "save now" channel (its rank 0)
        self._stopping = threading.Event()
        self.link = Link(connection, on_call=self._on_call, on_note=self._on_note, name=f"worker {spec.index}")

    # --- the channel ---------------------------------------------------------------------------
    def serve(self) -> None:
        """Say ready, then answer the daemon until it closes the channel or asks the worker to shut down."""
        reaper = threading.Thread(target=self._reap, name="lorad-worker-reaper", daemon=True)
        reaper.start()
        self.link.note("ready", pid=os.getpid())
        self.link.serve()
        self._stopping.set()

    def _on_note(self, op: str, args: dict[str, Any]) -> None:
        if op == "run":
            self._start_job(args["order"])
        elif op == "stop":
            with self._lock:
                job = self._jobs.get(args["job_id"])
            if job is not None:
                job[1].set()
        elif op == "shutdown":
            threading.Thread(target=self._shutdown, name="lorad-worker-shutdown", daemon=True).start()
        else:
            log.warning("worker %d: unknown note %r", self.spec.index, op)

    def _on_call(self, op: str, args: dict[str, Any]) -> Any:
        if op == "list":
            return self.registry.list()
        if op == "load":
            key = preload_key(device=self.device, **args["settings"])
            return self.registry.load(key, keep_alive=args.get("keep_alive"))
        if op == "unload":
            return self.registry.unload(args["model"])
        if op == "memory":
            return self._memory()
        if op == "ask":
            return self._ask(args["job_id"], args["kind"], args["wait"])
        raise ValueError(f"worker {self.spec.index}: unknown call {op!r}")

    # --- jobs ----------------------------------------------------------------------------------
    def _start_job(self, order: JobOrder) -> None:
        stop = threading.Event()
        thread = threading.Thread(target=self._run_job, args=(order, stop), name=f"lorad-job-{order.job_id}")
        with self._lock:
            self._jobs[order.job_id] = (thread, stop)
            if order.rank == 0:  # the reporting rank alone samples and saves
                self._requests[order.job_id] = RunRequests()
        if self._stopping.is_set():
            stop.set()  # shutting down: the job stops at once, with a checkpoint if it has a step
        thread.start()

    def _run_job(self, order: JobOrder, stop: threading.Event) -> None:
        finished: list[dict[str, Any]] = []
        config: TrainingKeys | None = None
        try:
            config = job_config(order)
            config = replace(config, device=self.device)  # this worker's device, whatever the config said
            extra: dict[str, Any] = {}
            if order.world > 1:
                import torch

                from lorad.training.distributed import join_local_group

                extra["ranks"] = join_local_group(
                    rank=order.rank, world=order.world, device=torch.device(self.device), store_path=order.store_path
                )
            sink = self._sink(order, finished)
            with self._lock:
                requests = self._requests.get(order.job_id)
            if requests is not None:
                extra["requests"] = requests
            if order.rank == 0 and spec_for(config).uses_captioner:
                extra["caption_missing"] = self._caption_filler(config, sink, stop, order.keep_alive)
            self.train(
                config,
                on_event=sink,
                stop=stop,
                models=base_model_provider(self.registry, order.keep_alive),
                **extra,
            )
            outcome = Outcome("succeeded", finished=finished[0] if finished else None)
        except BaseException as err:  # every end is the daemon's to record
            outcome = outcome_of(err, config, str(config.output_dir) if config else "")
        finally:
            with self._lock:
                self._jobs.pop(order.job_id, None)
                requests = self._requests.pop(order.job_id, None)
            if requests is not None:  # the loop closes it too, unless the job failed before the loop began
                requests.close("the job is no longer training")
        # The end goes out before the process group is left: the daemon hears this rank's own reason before
        # the other ranks' "a peer went away".
        with contextlib.suppress(LinkClosed):
            self.link.note("ended", job_id=order.job_id, rank=order.rank, outcome=outcome)
        if order.world > 1:
            from lorad.training.distributed import leave_group

            leave_group()

    def _ask(self, job_id: str, kind: str, wait: float) -> list[Event]:
        """Ask the job's run to ``kind`` after its current step and wait (at most ``wait`` s) for the events
        that produced; RequestNotDone when it does not train here (any more)."""
        with self._lock:
            channel = self._requests.get(job_id)
        if channel is None:
            raise RequestNotDone(f"job {job_id} is not training now", "ask while the job is running")
        return channel.ask(kind, timeout=wait)

    def _sink(self, order: JobOrder, finished: list[dict[str, Any]]) -> Callable[[Event], None]:
        """The run's events, sent to the daemon in order. A checkpoint is a call: it returns only after the
        daemon recorded it in the job store, so the loop prunes the older ones after that (a store that
        refused it raises here, which fails the job). The final event travels with the job's end."""

        def on_event(event: Event) -> None:
            kind, payload = engine_event_payload(event)
            if kind == "finished":
                finished.append(payload)
            elif isinstance(event, CheckpointSaved):
                self.link.call("checkpoint", job_id=order.job_id, payload=payload)
            else:
                self.link.note("event", job_id=order.job_id, kind=kind, payload=payload)

        return on_event

    def _caption_filler(self, config: TrainingKeys, sink: Callable, stop: threading.Event, keep_alive: float | None):
        """The job's ``caption_missing`` hook: resident captioners of this worker; the caption folder is held
        through the daemon, which also serves caption requests into the same folders."""
        from contextlib import contextmanager

        from lorad.captioning.training import caption_filler

        @contextmanager
        def exclusive(folder: Path):
            self.link.call("hold_folder", folder=str(folder))
            try:
                yield
            finally:
                with contextlib.suppress(LinkClosed):
                    self.link.call("release_folder", folder=str(folder))

        return caption_filler(
            config,
            on_event=sink,
            provide=captioner_provider(self.registry, keep_alive),
            stop=stop,
            exclusive=exclusive,
        )

    # --- the rest --------------------------------------------------------------------------------
    def _memory(self) -> dict[str, Any]:
        """The device's description and memory: total, and what this worker holds (for the CPU, its RSS)."""
        import platform

        rss = resident_set_bytes()
        if self.device.startswith("cuda"):
            import torch

            _free, total = torch.cuda.mem_get_info(self.device)
            used = torch.cuda.memory_reserved(self.device)
            return {"description": torch.cuda.get_device_name(self.device), "total": total, "used": used, "rss": rss}
        if self.device == "mps":
            import torch

            return {
                "description": "Apple GPU",
                "total": 0,
                "used": int(torch.mps.current_allocated_memory()),
                "rss": rss,
            }
        return {
            "description": platform.processor() or platform.machine(),
            "total": total_memory_bytes(),
            "used": rss,
            "rss": rss,
        }

    def _reap(self) -> None:
        while not self._stopping.wait(timeout=REAP_SECONDS):
            try:
                for model_id in self.registry.evict_expired():
                    log.info("worker %d: unloaded model %s after its keep-alive", self.spec.index, model_id)
            except Exception:
                log.exception("worker %d: model reaper", self.spec.index)

    def _shutdown(self) -> None:
        """Stop every job after its current step (each saves a checkpoint and reports its end), unload the
        models and say goodbye: the daemon then closes the channel, which ends :meth:`serve`."""
        self._stopping.set()
        with self._lock:
            jobs = list(self._jobs.values())
        for _, stop in jobs:
            stop.set()
        for thread, _ in jobs:
            thread.join()
        self.registry.close()
        with contextlib.suppress(LinkClosed):
            self.link.note("bye")


def worker_main(connection: Any, spec: WorkerSpec) -> None:
    """The worker process: serve the daemon until it closes the channel (a daemon that died) or asks it
    to shut down. Ctrl-C in the daemon's terminal reaches the whole process group: the worker ignores
    it and lets the daemon stop its jobs in order."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    os.environ["LORAD_HOME"] = spec.home
    logging.basicConfig(
        level=spec.log_level, format=f"%(asctime)s %(levelname)s worker {spec.index} %(name)s: %(message)s"
    )
    from lorad.cli.progress import quiet_libraries

    quiet_libraries()
    import torch

    if spec.threads:
        torch.set_num_threads(spec.threads)
    if spec.device.startswith("cuda"):
        torch.cuda.set_device(torch.device(spec.device))  # "cuda" and NCCL mean this worker's GPU
    host = WorkerHost(spec, connection)
    host.serve()
    # Shut down on request, every job has reported its end; or the daemon is gone (killed): stop at once,
    # its next start resumes the job from its checkpoint. Either way nothing is left to wait for.
    logging.shutdown()
    os._exit(0)
