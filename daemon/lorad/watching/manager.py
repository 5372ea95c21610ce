"""The watch manager: settled folders become captioned, coalesced, versioned training jobs.

One thread owns every watch's runtime state. Observers only put events on its queue; the thread
feeds each folder's debouncer, polls it at its deadline, and on a settled batch with enough new
images captions what lacks a caption and queues one job through the daemon's own submission path
(validated like SubmitTraining). Captioning runs on a thread of its own and reports back through
the same queue, so a long captioning pass never delays the other watches. Bursts coalesce: a job
of the watch that is still queued has its config replaced instead of a second job being queued;
while one runs (or the folder is being captioned), the next batch waits as one follow-up that is
queued the moment the running job ends (so a CONTINUE follow-up starts from that job's LoRA). A
finished job's LoRA becomes the watch's newest version and is copied, atomically, to the publish
folder.

A folder that vanishes or cannot be watched puts only its own watch in ERROR; the thread checks
such folders every tick and resumes the watch (with a rescan) when the folder is back.
"""

from __future__ import annotations

import logging
import os
import queue
import shutil
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lorad.atomic import write_with_atomic
from lorad.config.dispatch import parse_any_config
from lorad.config.yaml_text import load_yaml_text
from lorad.errors import ConfigError, ConfigProblem, DataError, LoradError
from lorad.jobs.records import JobNotFound, JobRecord, JobState
from lorad.jobs.store import new_job_id
from lorad.watching.debounce import Debouncer
from lorad.watching.file_rules import FileStat, is_image_path, list_images
from lorad.watching.observer import (
    CHANGED,
    CLOSED,
    GONE_HINT,
    REMOVED,
    RESCAN,
    VANISHED,
    FileEvent,
    FolderObserver,
    WatchUnavailable,
)
from lorad.watching.records import (
    CONTINUE,
    WatchNotFound,
    WatchPolicy,
    WatchRecord,
    WatchState,
    WatchView,
)
from lorad.watching.store import WatchStore
from lorad.watching.usable import unusable_reasons, version_clash

log = logging.getLogger("lorad.watching")

# How often the thread looks at running jobs and vanished folders when no event wakes it.
TICK_SECONDS = 0.25
# FollowWatches changes kept for followers that fall behind (they get the whole list again).
_KEPT_CHANGES = 1000
_ACTIVE_JOB_STATES = frozenset({JobState.QUEUED, JobState.RUNNING, JobState.INTERRUPTED})


@dataclass(frozen=True)
class JobGateway:
    """What the manager needs from the daemon, injected so it stays testable.

    ``submit(fields, base_dir, source_name)`` validates and queues a job (ConfigError on a bad
    config); ``requeue(job_id, fields, base_dir, source_name)`` replaces a still-QUEUED job's config
    (validated the same way), None when it is no longer queued; ``get_job(job_id)``; and
    ``caption(fields, base_dir)`` captions the folder's uncaptioned images if the config names a
    captioner, returning how many it captioned.
    """

    submit: Callable[[Mapping[str, Any], str, str], JobRecord]
    requeue: Callable[[str, Mapping[str, Any], str, str], JobRecord | None]
    get_job: Callable[[str], JobRecord]
    caption: Callable[[Mapping[str, Any], str], int]


@dataclass
class _Live:
    """One watch's runtime state; touched only by the manager thread (and under its lock)."""

    record: WatchRecord
    debouncer: Debouncer
    observer: FolderObserver | None = None
    state: WatchState = WatchState.IDLE
    error: str = ""
    hint: str = ""
    images: dict[str, FileStat] = field(default_factory=dict)
    follow_up: bool = False  # a settled batch waits for the running job (or this watch's captioning) to end
    captioning: bool = False  # a captioning thread works on this folder; its _CaptionDone ends it
    stuck: bool = False  # in ERROR for a reason that does not fix itself (unreadable row, a folder too big)
    updated_at: float = field(default_factory=time.time)
    # While in ERROR because its job could not be queued: the template's (mtime, size) then, so an
    # edit of the template retries by itself; None for any other state.
    template_stamp: tuple[int, int] | None = None

    @property
    def folder(self) -> Path:
        return Path(self.record.folder)

    def new_images(self) -> dict[str, FileStat]:
        """Images not in the last queued job's snapshot, or changed since."""
        known = self.record.known
        return {rel: stat for rel, stat in self.images.items() if known.get(rel) != stat}


class _Stuck(LoradError):
    """A watch that cannot run until it is removed and added again."""


@dataclass(frozen=True)
class _CaptionDone:
    """A watch's captioning thread finished: how many images it captioned, or the error it raised."""

    captioned: int = 0
    error: BaseException | None = None


@dataclass(frozen=True)
class _Retry:
    """RetryWatch asks the manager thread to try a watch again; ``done`` is set once it has."""

    done: threading.Event = field(default_factory=threading.Event)


@dataclass(frozen=True)
class WatchChange:
    """One FollowWatches item: ``view`` for an added or changed watch, else ``removed_id``."""

    view: WatchView | None = None
    removed_id: str = ""


class WatchManager:
    """Every watch of the daemon: add, remove, list, follow; a thread turns file events into jobs."""

    def __init__(self, db_path: Path, gateway: JobGateway, *, clock: Callable[[], float] = time.monotonic) -> None:
        self.store = WatchStore(db_path)
        self._state_dir = db_path.parent
        self.gateway = gateway
        self._clock = clock
        self._lock = threading.RLock()
        self._changed = threading.Condition(self._lock)
        self._live: dict[str, _Live] = {}
        self._events: queue.Queue[tuple[str, FileEvent | _CaptionDone | _Retry]] = queue.Queue()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="lorad-watch", daemon=True)
        self._changes: list[tuple[int, WatchChange]] = []
        self._seq = 0
        self._published: dict[str, WatchView] = {}

    # --- lifecycle -----------------------------------------------------------------------------
    def start(self) -> None:
        """Bring back every stored watch (scanning its folder for images added while the daemon was
        down), then start the thread. A watch that cannot be brought back (a row that does not
        decode, a folder that cannot be watched) is listed in ERROR, saying why, and can be removed:
        one watch never keeps the daemon from starting."""
        for record, broken in self.store.load_all():
            live = self._make_live(record)
            try:
                if broken:
                    raise _Stuck(
                        f"the stored settings of the watch on {record.folder} cannot be read ({broken})",
                        f"remove it with `lorad watch rm {record.watch_id}` and add it again",
                    )
                self._open(live)
            except Exception as err:  # a bug in one watch must not stop the daemon: log it, show it
                log.error("watch %s: cannot be restored", record.folder, exc_info=not isinstance(err, LoradError))
                if live.observer:
                    live.observer.stop()
                    live.observer = None
                live.stuck = not isinstance(err, WatchUnavailable)
                hint = err.hint if isinstance(err, LoradError) else "remove the watch and add it again"
                live.state, live.error, live.hint = WatchState.ERROR, str(err), hint
            pending = record.last_job_id and record.queued_version > record.version
            if pending and not live.debouncer.busy and live.state != WatchState.ERROR:
                live.state = WatchState.TRAINING  # the tick settles what became of that job
            with self._lock:
                self._live[record.watch_id] = live
            self._publish(live)
        self._thread.start()

    def stop(self) -> None:
        """Stop the thread and every observer."""
        self._stop.set()
        self._events.put(("", FileEvent(RESCAN, "")))  # wake the thread
        if self._thread.is_alive():
            self._thread.join(timeout=10)
        with self._lock:
            lives = list(self._live.values())
        for live in lives:
            if live.observer:
                live.observer.stop()
        with self._changed:
            self._changed.notify_all()
        self.store.close()

    # --- the API -------------------------------------------------------------------------------
    def add(self, *, folder: str, config_path: str, base_dir: str, policy: WatchPolicy) -> WatchView:
        """Watch ``folder`` (absolute) with the template config at ``config_path`` (absolute).

        The config is checked now as a job of this watch would use it (ConfigError naming every
        problem); WatchExists when the folder is watched already; a ConfigError naming the clash when
        another watch's versioned outputs would be overwritten. The folder is scanned and watched
        before the watch is stored, so a watch that cannot work is never saved.
        """
        root = Path(folder)
        if not root.is_dir():
            what = "is a file, not a folder" if root.exists() else "does not exist"
            raise ConfigError([ConfigProblem("folder", f"{root} {what}", "name an existing folder of images")], "watch")
        if (why := self._refused_folder(root)) is not None:
            raise ConfigError(
                [ConfigProblem("folder", why, "watch the folder of your training images itself")], "watch"
            )
        now = time.time()
        record = WatchRecord(
            watch_id=new_job_id(),
            folder=str(root),
            config_path=config_path,
            base_dir=base_dir,
            policy=policy,
            created_at=now,
            updated_at=now,
        )
        self._check_config(record)
        clash = version_clash(str(root), job_fields(record, version=1), self._version_fields())
        if clash is not None:
            raise clash
        try:
            images = list_images(root)
        except DataError as err:
            raise ConfigError([ConfigProblem("folder", str(err), err.hint)], "watch") from None
        live = self._make_live(record)
        with self._lock:  # the thread waits for it: events from the new observer must find the watch
            self._open(live, images=images)
            if live.state == WatchState.ERROR:
                raise WatchUnavailable(live.error, live.hint)
            try:
                self.store.add(
                    folder=str(root),
                    config_path=config_path,
                    base_dir=base_dir,
                    policy=policy,
                    now=now,
                    watch_id=record.watch_id,
                )
            except BaseException:
                if live.observer:
                    live.observer.stop()
                raise
            self._live[record.watch_id] = live
            self._publish(live)
        return self._view(live)

    def _refused_folder(self, root: Path) -> str | None:
        """Why ``root`` may never be watched (it would watch the whole disk, or the daemon's own
        state), or None. Checked before anything walks or watches it."""
        real = Path(os.path.realpath(root))
        if real == Path(real.anchor):
            return f"{root} is the root of the file system"
        state = Path(os.path.realpath(self._state_dir))
        if real == state or real in state.parents:
            return f"{root} holds the daemon's state directory ({state})"
        return None

    def _check_config(self, record: WatchRecord) -> None:
        """Raise ConfigError unless the template config makes a valid job for this watch."""
        fields = job_fields(record, version=record.version + 1)
        parse_any_config(dict(fields), base_dir=Path(record.base_dir), source=record.config_path)

    def _version_fields(self, skip: str = "") -> list[tuple[str, dict[str, Any]]]:
        """(folder, job fields) of every watch but ``skip`` whose template can be read now."""
        with self._lock:
            records = [live.record for live in self._live.values() if live.record.watch_id != skip]
        found = []
        for record in records:
            try:
                found.append((record.folder, job_fields(record, version=record.version + 1)))
            except LoradError:
                continue  # its own template is broken: that watch reports it
        return found

    def retry(self, watch: str, timeout: float = 30.0) -> WatchView:
        """Try a watch again now (by id or absolute folder): its template is read again (ConfigError
        naming every problem while it is still invalid), a folder that could not be watched is opened
        again, and new images queue their job. WatchNotFound if unknown."""
        with self._lock:
            live = self._live.get(watch) or next((w for w in self._live.values() if w.record.folder == watch), None)
        if live is None:
            raise WatchNotFound(f"no watch with id or folder {watch!r}")
        self._check_config(live.record)
        request = _Retry()
        self._events.put((live.record.watch_id, request))
        request.done.wait(timeout)  # the manager thread owns the watch's state
        return self._view(live)

    def remove(self, watch: str) -> WatchView:
        """Stop watching (by id or absolute folder); queued jobs stay. WatchNotFound if unknown."""
        with self._lock:
            live = self._live.get(watch) or next((w for w in self._live.values() if w.record.folder == watch), None)
            if live is None:
                raise WatchNotFound(f"no watch with id or folder {watch!r}")
            del self._live[live.record.watch_id]
            self._published.pop(live.record.watch_id, None)
            self._push(WatchChange(removed_id=live.record.watch_id))
        if live.observer:
            live.observer.stop()
        self.store.remove(live.record.watch_id)
        return self._view(live)

    def list(self) -> list[WatchView]:
        """Every watch, oldest first."""
        with self._lock:
            lives = list(self._live.values())
        return sorted((self._view(live) for live in lives), key=lambda v: (v.record.created_at, v.record.watch_id))

    def follow(self, active: Callable[[], bool] = lambda: True) -> Iterator[list[WatchView] | WatchChange]:
        """The whole list first, then each change, until ``active()`` turns False or the manager stops."""
        with self._lock:
            seen = self._seq
            snapshot = self.list()
        yield snapshot
        while active() and not self._stop.is_set():
            with self._changed:
                if self._seq == seen:
                    self._changed.wait(timeout=1.0)
                changes = [change for seq, change in self._changes if seq > seen]
                behind = self._changes and self._changes[0][0] > seen + 1
                seen = self._seq
            if behind:  # missed some: every watch again
                changes = [WatchChange(view=view) for view in self.list()]
            yield from changes

    def wake(self) -> None:
        """Wake followers (one whose client left can notice and stop)."""
        with self._changed:
            self._changed.notify_all()

    # --- the thread ----------------------------------------------------------------------------
    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self._drain(self._wait_seconds())
                with self._lock:
                    lives = list(self._live.values())
                for live in lives:
                    if self._stop.is_set():
                        break
                    try:
                        self._tick(live)
                    except Exception:  # one watch's bug must not stop the others
                        log.exception("watch %s", live.record.folder)
            except Exception:
                log.exception("the watch thread")

    def _wait_seconds(self) -> float:
        now = self._clock()
        with self._lock:
            deadlines = [d for live in self._live.values() if (d := live.debouncer.deadline()) is not None]
        return max(0.0, min([TICK_SECONDS, *(d - now for d in deadlines)]))

    def _drain(self, timeout: float) -> None:
        try:
            item = self._events.get(timeout=timeout) if timeout > 0 else self._events.get_nowait()
        except queue.Empty:
            return
        while True:
            self._apply(*item)
            try:
                item = self._events.get_nowait()
            except queue.Empty:
                return

    def _apply(self, watch_id: str, event: FileEvent | _CaptionDone | _Retry) -> None:
        with self._lock:
            live = self._live.get(watch_id)
        if isinstance(event, _Retry):
            if live is not None:
                self._retry(live)
            event.done.set()
            return
        if live is None:  # removed meanwhile (a captioning thread may still report back: ignored)
            return
        if isinstance(event, _CaptionDone):
            self._captioned(live, event)
            return
        debouncer, root = live.debouncer, live.record.folder
        if event.kind == VANISHED:
            self._unavailable(live, WatchUnavailable(f"{root} was deleted or moved away", GONE_HINT))
        elif event.kind == RESCAN:
            self._rescan(live, event.path or root)
        elif not is_image_path(event.path, root):
            return
        elif event.kind == REMOVED:
            debouncer.removed(event.path)
        elif event.kind == CLOSED:
            debouncer.closed(event.path)
        elif event.kind == CHANGED:
            debouncer.changed(event.path, complete=event.complete)
        if debouncer.busy and live.state in (WatchState.IDLE,):
            self._set(live, WatchState.SETTLING)
        else:
            self._publish(live)

    def _rescan(self, live: _Live, folder: str) -> None:
        """Treat every image under ``folder`` that differs from what is known now as changed, and
        every known image under it that is gone as removed."""
        root = live.folder
        try:
            prefix = Path(folder).relative_to(root).as_posix()
        except ValueError:  # moved out of the watched folder: its files' own events say what went
            return
        if not root.is_dir():
            return

        def under(rel: str) -> bool:
            return prefix == "." or rel == prefix or rel.startswith(prefix + "/")

        now = list_images(root)
        for rel, stat in now.items():
            if under(rel) and live.images.get(rel) != stat:
                live.debouncer.changed(str(root / rel))
        for rel in live.images:
            if rel not in now and under(rel):
                live.debouncer.removed(str(root / rel))

    def _tick(self, live: _Live) -> None:
        if live.stuck:
            return  # only removing the watch helps
        if live.state == WatchState.ERROR and live.observer is None:
            self._open(live)  # the folder may be back
            return
        stamp = live.template_stamp
        if live.state == WatchState.ERROR and stamp is not None and _stamp(live.record.config_path) != stamp:
            self._retry(live)  # the template was edited (a typo fixed?): read it again now
        if live.observer is not None and not (live.folder.is_dir() and live.observer.alive):
            what = "cannot be watched any more" if live.folder.is_dir() else "was deleted or moved away"
            self._unavailable(live, WatchUnavailable(f"{live.folder} {what}", GONE_HINT))
            return
        if live.record.last_job_id and live.record.queued_version > live.record.version:
            self._check_job(live)
        batch = live.debouncer.poll()
        if batch is not None:
            self._settled(live)
        elif live.debouncer.busy:
            self._publish(live)  # pending_files may have changed

    def _retry(self, live: _Live) -> None:
        """Try an ERROR watch again: open a folder that could not be watched, else queue the job of
        its new images (which reads the template again), else just leave ERROR."""
        if live.observer is None:
            self._open(live)
            return
        live.template_stamp = None
        if live.captioning or self._job_running(live):
            live.follow_up = True
            self._set(live, WatchState.CAPTIONING if live.captioning else WatchState.TRAINING)
            return
        live.images = list_images(live.folder)
        if len(self._usable_new(live)) >= live.record.policy.min_new_images:
            self._queue_job(live)
        else:
            self._set(live, WatchState.TRAINING if self._job_active(live) else WatchState.IDLE)

    def _usable_new(self, live: _Live) -> dict[str, FileStat]:
        """The new images a job would train on: files training skips (corrupt, or uncaptioned without
        a captioner) are not a reason for a new version."""
        new = live.new_images()
        try:
            fields = job_fields(live.record, version=live.record.version + 1)
        except LoradError:
            return new  # a broken template: queueing reports it
        skipped = unusable_reasons(live.folder, new, fields)
        if skipped:
            log.info(
                "watch %s: not new training data: %s",
                live.record.folder,
                "; ".join(f"{r}: {why}" for r, why in skipped.items()),
            )
        return {rel: stat for rel, stat in new.items() if rel not in skipped}

    # --- settle -> caption -> job ----------------------------------------------------------------
    def _settled(self, live: _Live) -> None:
        live.images = list_images(live.folder)
        new = self._usable_new(live)
        if live.captioning or self._job_running(live):
            live.follow_up = len(new) >= live.record.policy.min_new_images
            if not live.captioning:
                self._set(live, WatchState.TRAINING)
            return
        if len(new) < live.record.policy.min_new_images:
            self._set(live, WatchState.TRAINING if self._job_active(live) else WatchState.IDLE)
            return
        self._queue_job(live)

    def _job_active(self, live: _Live) -> bool:
        job = self._last_job(live)
        return job is not None and job.state in _ACTIVE_JOB_STATES

    def _job_running(self, live: _Live) -> bool:
        job = self._last_job(live)
        return job is not None and job.state in (JobState.RUNNING, JobState.INTERRUPTED)

    def _last_job(self, live: _Live) -> JobRecord | None:
        if not live.record.last_job_id:
            return None
        try:
            return self.gateway.get_job(live.record.last_job_id)
        except JobNotFound:
            return None

    def _queue_job(self, live: _Live, *, captioned: bool = False) -> None:
        """Queue the folder's job, or update the one still queued. When the config names a captioner
        and ``captioned`` is False, start captioning what lacks a caption instead; its thread's
        _CaptionDone calls this again with ``captioned=True``."""
        record = live.record
        if live.captioning:  # this folder is being captioned: the batch follows when that ends
            live.follow_up = True
            return
        queued = self._last_job(live)
        if queued is not None and queued.state != JobState.QUEUED:
            queued = None
        version = record.queued_version if queued else record.version + 1
        source = f"watch {record.folder}"
        try:
            fields = job_fields(record, version=version)
            clash = version_clash(record.folder, fields, self._version_fields(skip=record.watch_id))
            if clash is not None:
                raise clash
            if fields.get("captioner") and not captioned:
                self._start_captioning(live, fields)
                return
            if queued is not None:
                job = self.gateway.requeue(queued.job_id, fields, record.base_dir, source)
                if job is None:  # the worker took it meanwhile: these images follow when it ends
                    live.follow_up = True
                    self._set(live, WatchState.TRAINING)
                    return
            else:
                job = self.gateway.submit(fields, record.base_dir, source)
        except Exception as err:
            self._cannot_queue(live, err)
            return
        live.follow_up = False
        live.record = self.store.update(
            record, last_job_id=job.job_id, queued_version=version, known=dict(live.images), updated_at=time.time()
        )
        log.info(
            "watch %s: %s job %s (%s_v%d)",
            record.folder,
            "updated the queued" if queued else "queued",
            job.job_id,
            watch_name(record),
            version,
        )
        self._set(live, WatchState.TRAINING)

    def _cannot_queue(self, live: _Live, err: BaseException) -> None:
        """Put the watch in ERROR for ``err`` (a domain error's message and hint, else the exception's
        name); the next batch of images retries. Other watches are untouched."""
        if isinstance(err, LoradError):
            log.warning("watch %s: cannot queue a job: %s", live.record.folder, err)
            hint = (err.hint + " " if err.hint else "") + RETRY_HINT
            self._set(live, WatchState.ERROR, error=str(err), hint=hint)
            live.template_stamp = _stamp(live.record.config_path)
            return
        log.error("watch %s: cannot queue a job", live.record.folder, exc_info=err)
        self._set(
            live,
            WatchState.ERROR,
            error=f"{type(err).__name__}: {err}",
            hint="This looks like a bug in lorad; the daemon log has the traceback. The next batch of images retries.",
        )

    def _start_captioning(self, live: _Live, fields: Mapping[str, Any]) -> None:
        """Caption the folder's uncaptioned images on a thread of its own (a captioner on a CPU can
        take minutes, and this thread serves every watch); the result comes back as a _CaptionDone."""
        watch_id, base_dir = live.record.watch_id, live.record.base_dir

        def caption() -> None:
            try:
                done = _CaptionDone(captioned=self.gateway.caption(fields, base_dir))
            except BaseException as err:  # reported to the manager thread, which errs this watch alone
                done = _CaptionDone(error=err)
            self._events.put((watch_id, done))

        live.captioning, live.follow_up = True, False
        self._set(live, WatchState.CAPTIONING)
        threading.Thread(target=caption, name=f"lorad-watch-caption-{watch_id}", daemon=True).start()

    def _captioned(self, live: _Live, done: _CaptionDone) -> None:
        """A captioning thread finished: queue the job it prepared, or put the watch in ERROR."""
        live.captioning = False
        if done.error is not None:
            self._cannot_queue(live, done.error)
            return
        log.info("watch %s: captioned %d new image(s)", live.record.folder, done.captioned)
        live.images = list_images(live.folder)  # captions were written beside them: take a fresh look
        self._queue_job(live, captioned=True)

    def _check_job(self, live: _Live) -> None:
        job = self._last_job(live)
        if job is not None and job.state in _ACTIVE_JOB_STATES:
            return
        record = live.record
        if job is not None and job.state == JobState.SUCCEEDED and record.queued_version > record.version:
            output = job.outputs.get("kohya", "")
            published = publish(output, record) if output else ""
            live.record = self.store.update(
                record,
                version=record.queued_version,
                latest_output=output,
                published_path=published or record.published_path,
                updated_at=time.time(),
            )
        elif record.queued_version > record.version:
            # Failed, cancelled or gone: the next batch retries this version; the job says why it failed.
            live.record = self.store.update(record, queued_version=record.version)
        if live.state == WatchState.TRAINING:
            self._set(live, WatchState.IDLE)
        if live.follow_up and not live.debouncer.busy:
            live.follow_up = False
            live.images = list_images(live.folder)
            if len(self._usable_new(live)) >= record.policy.min_new_images:
                self._queue_job(live)

    # --- observers and errors ----------------------------------------------------------------
    def _make_live(self, record: WatchRecord) -> _Live:
        return _Live(record=record, debouncer=Debouncer(record.policy.quiet_seconds, clock=self._clock))

    def _open(self, live: _Live, *, images: dict[str, FileStat] | None = None) -> None:
        """Start the watch's observer and scan its folder (images added while nobody watched count as
        new; ``images``: that scan, done already); ERROR with a hint if it cannot be watched."""
        watch_id = live.record.watch_id
        if (why := self._refused_folder(live.folder)) is not None:  # stored by an older version
            live.stuck = True
            self._unavailable(live, WatchUnavailable(why, "remove this watch with `lorad watch rm`"))
            return
        if images is None:
            try:
                images = list_images(live.folder)
            except DataError as err:  # too big to watch: rescanning every tick would not change that
                live.stuck = True
                self._unavailable(live, WatchUnavailable(str(err), err.hint))
                return
        observer = FolderObserver(
            live.folder, lambda event: self._events.put((watch_id, event)), polling=live.record.policy.polling
        )
        try:
            observer.start()
        except WatchUnavailable as err:
            if live.state != WatchState.ERROR or live.error != str(err):
                self._unavailable(live, err)
            return
        live.observer = observer
        was_error = live.state == WatchState.ERROR
        now = images
        for rel, stat in now.items():
            if live.record.known.get(rel) != stat:
                live.debouncer.changed(str(live.folder / rel))
        live.images = now
        if was_error or live.debouncer.busy:
            self._set(live, WatchState.SETTLING if live.debouncer.busy else WatchState.IDLE)

    def _unavailable(self, live: _Live, err: WatchUnavailable) -> None:
        if live.observer:
            live.observer.stop()
            live.observer = None
        log.warning("watch %s: %s", live.record.folder, err)
        self._set(live, WatchState.ERROR, error=str(err), hint=err.hint)

    # --- views and followers ------------------------------------------------------------------
    def _set(self, live: _Live, state: WatchState, *, error: str = "", hint: str = "") -> None:
        if state != WatchState.ERROR:
            live.template_stamp = None
        if (live.state, live.error, live.hint) != (state, error, hint):
            live.state, live.error, live.hint = state, error, hint
            live.updated_at = time.time()
        self._publish(live)

    def _view(self, live: _Live) -> WatchView:
        return WatchView(
            record=live.record,
            state=live.state,
            error=live.error,
            hint=live.hint,
            images_seen=len(live.images),
            new_images=len(live.new_images()),
            pending_files=live.debouncer.pending,
            updated_at=live.updated_at,
        )

    def _publish(self, live: _Live) -> None:
        """Tell followers when the watch's view changed."""
        view = self._view(live)
        with self._lock:
            if live.record.watch_id not in self._live or self._published.get(live.record.watch_id) == view:
                return
            self._published[live.record.watch_id] = view
            self._push(WatchChange(view=view))

    def _push(self, change: WatchChange) -> None:
        with self._changed:
            self._seq += 1
            self._changes.append((self._seq, change))
            del self._changes[:-_KEPT_CHANGES]
            self._changed.notify_all()


RETRY_HINT = "Saving the fixed template retries by itself; `lorad watch retry FOLDER` retries now."


def _stamp(path: str) -> tuple[int, int]:
    """(mtime_ns, size) of the file at ``path``; (0, 0) when it cannot be read."""
    try:
        stat = Path(path).stat()
    except OSError:
        return (0, 0)
    return (stat.st_mtime_ns, stat.st_size)


# --- jobs of a watch ---------------------------------------------------------------------------
def watch_name(record: WatchRecord) -> str:
    """The LoRA's name: the template's output_name, else its output_dir's folder name, else the folder's."""
    template = read_template(record)
    name = str(template.get("output_name") or "").strip()
    if not name and template.get("output_dir"):
        name = Path(str(template["output_dir"])).name
    return name or Path(record.folder).name


def read_template(record: WatchRecord) -> dict[str, Any]:
    """The template config as a mapping; ConfigError naming `config_path` when unreadable. The file's
    text never appears in an error (it may not be a config at all)."""
    path = Path(record.config_path)
    try:
        loaded = load_yaml_text(path.read_text(encoding="utf-8"), source=str(path))
    except ConfigError as err:  # what load_yaml_text found, said of `config_path`
        raise ConfigError(
            [ConfigProblem("config_path", f"{path}: {p.message}", p.fix) for p in err.problems], "watch"
        ) from None
    except UnicodeDecodeError as err:
        raise ConfigError(
            [ConfigProblem("config_path", f"{path} is not UTF-8 text", "point the watch at a YAML training config")],
            "watch",
        ) from err
    except OSError as err:
        raise ConfigError(
            [
                ConfigProblem(
                    "config_path",
                    f"cannot read {path} ({err.strerror or err})",
                    "point the watch at a readable YAML training config",
                )
            ],
            "watch",
        ) from err
    if not isinstance(loaded, dict):
        raise ConfigError(
            [ConfigProblem("config_path", f"{path} is not a mapping of config keys", "see `lorad config --example`")],
            "watch",
        )
    return loaded


def job_fields(record: WatchRecord, *, version: int) -> dict[str, Any]:
    """The config of the watch's job that writes ``NAME_v{version}``: the template (read again now),
    training on the folder, writing into its own ``NAME_vN`` folder under the template's output_dir;
    CONTINUE starts from the newest LoRA with ``continue_steps`` steps when there is one."""
    template = read_template(record)
    name = watch_name(record)
    fields = dict(template)
    fields["train_data_dir"] = record.folder
    if template.get("metadata_path"):
        # Captions of the watched folder live in it: the template's own CSV belongs to other data.
        # The folder's metadata.csv when it has one (or the captioner will write it); else its
        # `.txt` sidecars, so a folder of images with sidecars works with a template made for a CSV.
        folder_csv = Path(record.folder) / "metadata.csv"
        if folder_csv.is_file() or template.get("captioner"):
            fields["metadata_path"] = str(folder_csv)
        else:
            fields.pop("metadata_path")
    output_dir = Path(str(template.get("output_dir") or "output")).expanduser()
    if not output_dir.is_absolute():
        output_dir = Path(record.base_dir) / output_dir
    fields["output_dir"] = str(output_dir / f"{name}_v{version}")
    fields["output_name"] = f"{name}_v{version}"
    fields.pop("resume_from", None)
    policy = record.policy
    if policy.mode == CONTINUE and record.latest_output and Path(record.latest_output).is_file():
        fields["init_lora"] = record.latest_output
        if policy.continue_steps:
            fields["max_train_steps"] = policy.continue_steps
    return fields


def publish(output: str, record: WatchRecord) -> str:
    """Copy the newest LoRA to ``publish_dir`` as ``NAME.safetensors`` atomically (readers see the old
    file or the new one, never half of one); the path, or "" without a publish_dir or on failure."""
    if not record.policy.publish_dir:
        return ""
    target = Path(record.policy.publish_dir) / f"{watch_name(record)}{Path(output).suffix}"
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        write_with_atomic(target, lambda tmp: shutil.copyfile(output, tmp), user_file=True)
    except OSError as err:
        log.warning("watch %s: cannot publish %s to %s: %s", record.folder, output, target, err)
        return ""
    return str(target)
