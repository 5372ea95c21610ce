"""What the TUI knows about the daemon: its status, resident models and jobs (with their event history).

Plain Python over the generated messages, no Textual and no I/O: the App's workers fetch, the App
feeds the results in here (on the UI thread), and screens read from here when told something
changed. Keeping it pure keeps the screens dumb and this logic testable without a terminal.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from lorad_api.v1.models_pb2 import ResidentModel
from lorad_api.v1.system_pb2 import GetStatusResponse
from lorad_api.v1.watch_pb2 import FollowWatchesResponse, Watch
from lorad_client import (
    FINAL_STATES,
    JOB_STATE_CANCELLED,
    JOB_STATE_FAILED,
    JOB_STATE_INTERRUPTED,
    JOB_STATE_QUEUED,
    JOB_STATE_RUNNING,
    JOB_STATE_SUCCEEDED,
    Job,
    JobEvent,
)
from lorad_client.format import describe_event, format_duration

# Lines of a job's log kept in memory; the log widget shows the tail of these.
LOG_LINES = 500

# Event kinds that move a job to a new state (the stream carries them before ListJobs would).
_STATE_OF_EVENT = {
    "queued": JOB_STATE_QUEUED,
    "started": JOB_STATE_RUNNING,
    "finished": JOB_STATE_SUCCEEDED,
    "failed": JOB_STATE_FAILED,
    "cancelled": JOB_STATE_CANCELLED,
    "interrupted": JOB_STATE_INTERRUPTED,
}


def is_final(job: Job) -> bool:
    """True when ``job`` will never change again (succeeded, failed or cancelled)."""
    return job.state in FINAL_STATES


def lora_snippet(name: str, weight: float = 0.8) -> str:
    """The prompt snippet AUTOMATIC1111 / Forge use to apply a LoRA: ``<lora:NAME:0.8>``."""
    return f"<lora:{name}:{weight:g}>"


def usage_snippet(job: Job) -> str:
    """How to use what a succeeded job made: for an LLM adapter (an ``adapter`` output) the PEFT
    call that loads it, for an SD LoRA its ``<lora:NAME:0.8>`` prompt snippet."""
    adapter = job.outputs.get("adapter", "")
    if adapter:
        return f'PeftModel.from_pretrained(base_model, "{adapter}")'
    return lora_snippet(job.name)


@dataclass(frozen=True)
class SampleShot:
    """One sample image a job drew (from its ``sample_image`` events): a PNG on the daemon's disk."""

    step: int
    prompt_index: int
    prompt: str
    path: str
    width: int
    height: int


@dataclass
class JobView:
    """One job: the daemon's latest ``Job`` message plus what its events told us since.

    ``steps``/``losses``/``lrs`` are parallel lists, one entry per optimizer step seen (a resumed run
    drops the steps after its checkpoint, so the curve never doubles back). ``log`` holds the
    human lines of every other event as (time since submission, text), oldest first, at most
    ``LOG_LINES`` (a multi-line event continues with an empty time; ``log_total`` counts
    every line ever added, so a reader can tell which lines are new). ``last_seq`` is the
    newest event applied; a watch resumes after it and older events are ignored, so replays are safe.
    ``resumed_at`` is the step the latest run resumed at (0: it started fresh) and ``resumed_from``
    its checkpoint; ``partial`` the partial LoRA a stopped job left beside its checkpoint.
    ``samples`` maps (step, prompt index) to the newest image drawn there (a resumed run may draw a
    step again; step 0 is the baseline without the LoRA).
    """

    job: Job
    last_seq: int = 0
    steps: list[int] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)
    lrs: list[float] = field(default_factory=list)
    log: list[tuple[str, str]] = field(default_factory=list)
    data_report: str = ""
    epochs: int = 0
    log_total: int = 0
    resumed_at: int = 0
    resumed_from: str = ""
    partial: str = ""
    samples: dict[tuple[int, int], SampleShot] = field(default_factory=dict)

    @property
    def job_id(self) -> str:
        return self.job.job_id

    def sample_steps(self) -> list[int]:
        """The steps that have sample images, oldest first."""
        return sorted({step for step, _ in self.samples})

    def samples_at(self, step: int) -> list[SampleShot]:
        """The images of ``step``, by prompt index."""
        return [shot for (at, _), shot in sorted(self.samples.items()) if at == step]

    def update_job(self, job: Job) -> None:
        """Take a fresher ``Job`` message (from ListJobs/GetJob/the start of a watch).

        The list can lag behind the stream by a step; progress never goes backwards here, so a
        refresh during training does not make the bar jump back for a moment.
        """
        newer = Job()
        newer.CopyFrom(job)
        if newer.state == self.job.state and newer.progress.step < self.job.progress.step:
            newer.progress.CopyFrom(self.job.progress)
        self.job = newer

    def apply(self, event: JobEvent) -> bool:
        """Fold one event into the view; False (and no change) for an event already applied."""
        if event.seq and event.seq <= self.last_seq:
            return False
        self.last_seq = max(self.last_seq, event.seq)
        kind = event.WhichOneof("kind")
        job = self.job
        if kind in _STATE_OF_EVENT:
            job.state = _STATE_OF_EVENT[kind]
        if kind == "step":
            progress = event.step.progress
            job.progress.CopyFrom(progress)
            job.state = JOB_STATE_RUNNING
            self.steps.append(progress.step)
            self.losses.append(progress.loss)
            self.lrs.append(progress.lr)
        elif kind == "queued":
            job.queue_position = event.queued.queue_position
        elif kind == "started":
            job.queue_position = 0
            job.attempt = event.started.attempt or job.attempt
            job.started_at.CopyFrom(event.time)
        elif kind == "training_started":
            started = event.training_started
            self.epochs = started.epochs
            job.progress.total_steps = started.total_steps
            self.resumed_at, self.resumed_from = started.start_step, started.resumed_from
            if started.start_step:
                self._truncate_after(started.start_step)
        elif kind == "data_report":
            self.data_report = event.data_report.text
        elif kind == "checkpoint_saved":
            job.checkpoint = event.checkpoint_saved.path
        elif kind == "finished":
            job.outputs.update(event.finished.outputs)
            job.finished_at.CopyFrom(event.time)
        elif kind == "failed":
            job.error, job.hint = event.failed.error, event.failed.hint
            job.finished_at.CopyFrom(event.time)
        elif kind == "cancelled":
            job.finished_at.CopyFrom(event.time)
            self.partial = event.cancelled.partial or self.partial
        elif kind == "interrupted":
            self.partial = event.interrupted.partial or self.partial
        elif kind == "sample_image":
            i = event.sample_image
            self.samples[(i.step, i.prompt_index)] = SampleShot(
                i.step, i.prompt_index, i.prompt, i.path, i.width, i.height
            )
        line = describe_event(event)
        if line is not None:
            self._log(event, line)
        return True

    def _truncate_after(self, step: int) -> None:
        keep = next((i for i, s in enumerate(self.steps) if s > step), len(self.steps))
        del self.steps[keep:], self.losses[keep:], self.lrs[keep:]

    def _log(self, event: JobEvent, text: str) -> None:
        # Time since submission rather than wall-clock time: it reads as "how far in" and does
        # not depend on the viewer's time zone.
        since = event.time.seconds - self.job.created_at.seconds if self.job.created_at.seconds else 0
        stamp = f"+{format_duration(max(0, since))}"
        lines = text.splitlines() or [""]
        new = [(stamp, lines[0]), *(("", rest) for rest in lines[1:])]
        self.log.extend(new)
        self.log_total += len(new)
        del self.log[:-LOG_LINES]


@dataclass
class DaemonView:
    """The daemon as last seen: status, resident models (with when they were fetched) and jobs.

    ``jobs`` maps job id → view; ``order`` is the ids newest first, as ListJobs returns them.
    Times (``status_at``, ``models_at``) are the App clock's readings when the data arrived, so
    countdowns can be computed locally between refreshes.
    """

    status: GetStatusResponse | None = None
    status_at: float = 0.0
    models: list[ResidentModel] = field(default_factory=list)
    models_at: float = 0.0
    jobs: dict[str, JobView] = field(default_factory=dict)
    order: list[str] = field(default_factory=list)
    # Watched folders (id → latest state, oldest first) while the daemon serves WatchService;
    # ``watching`` is False when it does not, and the watch panels stay hidden.
    watching: bool = False
    watches: dict[str, Watch] = field(default_factory=dict)

    def set_status(self, status: GetStatusResponse, models: list[ResidentModel], now: float) -> None:
        """Record a status + models refresh taken at ``now``."""
        self.status, self.status_at = status, now
        self.models, self.models_at = list(models), now

    def replace_jobs(self, jobs: list[Job]) -> None:
        """The full job list (newest first); known jobs keep their event history."""
        self.order = [job.job_id for job in jobs]
        for job in jobs:
            self.upsert_job(job)

    def upsert_job(self, job: Job) -> JobView:
        """Add or update one job (a new one goes first: ids are listed newest first)."""
        view = self.jobs.get(job.job_id)
        if view is None:
            view = self.jobs[job.job_id] = JobView(Job())
            view.job.CopyFrom(job)
        else:
            view.update_job(job)
        if job.job_id not in self.order:
            self.order.insert(0, job.job_id)
        return view

    def apply_event(self, job_id: str, event: JobEvent) -> bool:
        """Fold an event into its job; False if the job is unknown or the event was seen already."""
        view = self.jobs.get(job_id)
        return view.apply(event) if view is not None else False

    def listed(self) -> list[JobView]:
        """Jobs in display order (newest first)."""
        return [self.jobs[job_id] for job_id in self.order if job_id in self.jobs]

    def count(self, state: int) -> int:
        """How many listed jobs are in ``state``."""
        return sum(1 for view in self.listed() if view.job.state == state)

    def keep_alive_left(self, model: ResidentModel, now: float) -> float:
        """Seconds until ``model`` unloads, counted down locally from the last refresh (never < 0)."""
        return max(0.0, model.keep_alive_seconds_left - (now - self.models_at))

    def apply_watches(self, item: FollowWatchesResponse) -> None:
        """Fold one FollowWatches message in: the snapshot replaces every watch, ``changed`` adds or
        updates one (an added watch goes last: they are listed oldest first), ``removed_watch_id`` drops one."""
        kind = item.WhichOneof("item")
        if kind == "snapshot":
            self.watches = {watch.watch_id: watch for watch in item.snapshot.watches}
        elif kind == "changed":
            self.watches[item.changed.watch_id] = item.changed
        elif kind == "removed_watch_id":
            self.watches.pop(item.removed_watch_id, None)

    def uptime(self, now: float) -> float:
        """The daemon's uptime, counted up locally from the last status refresh."""
        if self.status is None:
            return 0.0
        return self.status.uptime_seconds + (now - self.status_at)
