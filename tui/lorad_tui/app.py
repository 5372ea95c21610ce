"""``LoradApp``: the one Textual App. It owns the connection to the daemon and the DaemonView.

Data flow: workers (threads: the client is synchronous gRPC) make every network call and post
the results as messages; the App's handlers, on the UI thread, fold them into ``self.view`` and
tell each screen on the stack ``ViewChanged``; screens redraw from the view. What the user asks
for (open a job, submit, cancel) comes back up from the screens as messages, and the App runs
the call in a worker. The core screens never touch the network; section screens of optional
services (captions, watches) run their own calls in workers through the App's client
(``lorad_tui.section_calls``), and hand a lost daemon back to the App.

Connection: at start, and whenever a call finds the daemon gone (``DaemonUnavailable``), the App
shows the daemon-down screen and retries every ``retry_seconds`` in a worker, discovering the
daemon afresh each time (so a daemon restarted on another port is found), until one answers.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Callable
from functools import partial, wraps
from pathlib import Path
from typing import Any, ClassVar, TypeVar, cast

from textual import work
from textual.app import App
from textual.binding import Binding, BindingType
from textual.message import Message
from textual.screen import Screen
from textual.worker import get_current_worker

from lorad_client import JOB_STATE_RUNNING, DaemonUnavailable, LoradRpcError
from lorad_client.format import describe_event
from lorad_tui.connection import Connector, DaemonClient, JobStream, WatchesStream, daemon_connector
from lorad_tui.messages import (
    CallFailed,
    Cancelled,
    CancelRequested,
    CloseJob,
    Connected,
    ConnectionLost,
    DaemonDown,
    JobsLoaded,
    OpenJob,
    Polled,
    RefreshRequested,
    RunAnswered,
    RunRequested,
    Streamed,
    StreamEnded,
    SubmitRejected,
    SubmitRequested,
    Submitted,
    ViewChanged,
    WatchesStreamed,
)
from lorad_tui.screens.captions import CaptionsScreen
from lorad_tui.screens.dashboard import DashboardScreen
from lorad_tui.screens.help import HelpScreen
from lorad_tui.screens.job_detail import JobDetailScreen
from lorad_tui.screens.offline import OfflineScreen
from lorad_tui.screens.submit import SubmitScreen
from lorad_tui.screens.watches import WatchesScreen
from lorad_tui.sections import SECTIONS, WATCH_SERVICE, section
from lorad_tui.state import DaemonView, is_final

# The client raises ValueError when a call races with closing its channel (after the daemon went
# away and the App dropped that client); for a worker that is the same as "the daemon is gone".
_GONE = (LoradRpcError, ValueError)

# Screens redraw at most this often while data streams in (10 frames a second reads as live).
REDRAW_SECONDS = 0.1

_Handler = TypeVar("_Handler", bound=Callable[..., None])


def _while_running(handler: _Handler) -> _Handler:
    """Drop a worker's late message once the App is shutting down (its screens are gone by then)."""

    @wraps(handler)
    def guarded(self: LoradApp, message: Message) -> None:
        if self.is_running and self.screen_stack:
            handler(self, message)

    return cast(_Handler, guarded)


class LoradApp(App[None]):
    """The lorad dashboard.

    ``address``/``home`` override where the daemon is looked for (default: as the CLI, via
    ``$LORAD_ADDRESS`` and ``$LORAD_HOME``); ``connect`` replaces the whole lookup (tests pass a
    fake client this way). ``base_dir`` is the folder relative config paths resolve against
    (default: the working directory, as for ``lorad train``). ``clock`` gives the wall time for
    every "ago" and countdown on screen. ``retry_seconds`` paces reconnect attempts and
    ``refresh_seconds`` the status/models refresh.
    """

    CSS_PATH = "lorad_tui.tcss"
    TITLE = "lorad"
    # Every action has a key in the footer and on the help screen; a command palette would only
    # take footer space from them.
    ENABLE_COMMAND_PALETTE = False
    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("q", "quit", "Quit"),
        Binding("question_mark", "help", "Help", key_display="?"),
        *(Binding(entry.key, f"open_section('{entry.name}')", entry.title) for entry in SECTIONS),
    ]

    def __init__(
        self,
        *,
        address: str | None = None,
        home: Path | None = None,
        connect: Connector | None = None,
        base_dir: Path | None = None,
        clock: Callable[[], float] = time.time,
        retry_seconds: float = 2.0,
        refresh_seconds: float = 3.0,
    ) -> None:
        super().__init__()
        self.view = DaemonView()
        self.client: DaemonClient | None = None
        self.services: frozenset[str] = frozenset()
        self.base_dir = (base_dir or Path.cwd()).resolve()
        self.clock = clock
        self.retry_seconds = retry_seconds
        self.refresh_seconds = refresh_seconds
        self._connect = connect or daemon_connector(address, home)
        # Set on exit: wakes workers sleeping between retries/refreshes so the process can end.
        self._stopping = threading.Event()
        self._exiting = False
        self._offline: OfflineScreen | None = None
        # Streams being followed (job id → stream), touched from the UI thread and from workers.
        self._streams: dict[str, JobStream] = {}
        self._streams_lock = threading.Lock()
        self._following: set[str] = set()
        self._history_loaded: set[str] = set()
        self._open_jobs: Counter[str] = Counter()
        self._daemon_identity: tuple[int, int] | None = None
        self._redraw_pending = False
        self._dirty_all = False
        self._dirty_jobs: set[str] = set()
        self._poll_signature: tuple[int, str, int] | None = None
        self._watches_stream: WatchesStream | None = None

    # -- lifetime ------------------------------------------------------------------------------

    def get_default_screen(self) -> Screen:
        return DashboardScreen(self.view, self.clock)

    def on_mount(self) -> None:
        self._connect_loop()

    def exit(self, *args: Any, **kwargs: Any) -> None:
        # Keys typed after `q` are still delivered while the App closes; a screen pushed then is
        # mounted without its widgets and fails. Remember that we are leaving, and open nothing.
        self._exiting = True
        self._stopping.set()
        super().exit(*args, **kwargs)

    def on_unmount(self) -> None:
        # Thread workers run in asyncio's executor, which the process waits for on exit: wake the
        # sleepers and end the blocking streams, or quitting would hang until the daemon speaks.
        self._stopping.set()
        self._drop_streams()
        self._stop_watches()
        if self.client is not None:
            self.client.close()

    @property
    def connected(self) -> bool:
        """True while a daemon answers."""
        return self.client is not None

    # -- keys ----------------------------------------------------------------------------------

    def check_action(self, action: str, parameters: tuple[object, ...]) -> bool | None:
        if action == "open_section":
            # Sections open from the dashboard (the hub), and only when the daemon serves them;
            # elsewhere the key is hidden (False), which also keeps narrow footers short.
            return (
                self.connected
                and isinstance(self.screen, DashboardScreen)
                and section(str(parameters[0])).service in self.services
            )
        return True

    def action_open_section(self, name: str) -> None:
        """Open a registered top-level screen (e.g. submit) over the dashboard."""
        if not self._exiting:
            self.push_screen(section(name).make(self.base_dir, self.view))

    def action_help(self) -> None:
        if self._exiting or isinstance(self.screen, HelpScreen):
            return
        self.push_screen(HelpScreen(self.help_groups()))

    def help_groups(self) -> list[tuple[str, list[BindingType]]]:
        """(title, bindings) of every screen, for the help screen. ``escape`` goes back on every
        screen, so it is listed once, under "Everywhere", not in each screen's group."""
        sections = [
            binding
            for binding in self.BINDINGS
            if isinstance(binding, Binding) and binding.action.startswith("open_section")
        ]
        served = [binding for binding, entry in zip(sections, SECTIONS, strict=True) if entry.service in self.services]
        screens: list[tuple[str, list[BindingType]]] = [
            ("Dashboard", [*DashboardScreen.BINDINGS, *served]),
            ("Submit", list(SubmitScreen.BINDINGS)),
            ("Job detail", list(JobDetailScreen.BINDINGS)),
            *(
                (entry.title, list(screen.BINDINGS))
                for entry, screen in ((section("captions"), CaptionsScreen), (section("watches"), WatchesScreen))
                if entry.service in self.services
            ),
        ]
        everywhere = [
            *(b for b in self.BINDINGS if b not in sections),
            Binding("escape", "", "Back, or close a box", key_display="esc"),
        ]
        return [
            ("Everywhere", everywhere),
            *(
                (title, [b for b in bindings if not (isinstance(b, Binding) and b.key == "escape")])
                for title, bindings in screens
            ),
            (
                "Moving around",
                [
                    Binding("up,down", "", "Move in a table, tree or list", key_display="↑ ↓"),
                    Binding("tab", "", "Next part of the screen"),
                    Binding("enter", "", "Open, pick or press", key_display="enter"),
                ],
            ),
        ]

    # -- connection ----------------------------------------------------------------------------

    @work(exclusive=True, thread=True, group="connect")
    def _connect_loop(self) -> None:
        """Try to connect every ``retry_seconds`` until a daemon answers (→ Connected)."""
        worker = get_current_worker()
        while not (worker.is_cancelled or self._stopping.is_set()):
            try:
                client = self._connect()
            except _GONE as err:
                self.post_message(DaemonDown(str(err)))
            else:
                try:
                    status = client.status()
                    services = self._served(client)
                except _GONE as err:
                    client.close()
                    self.post_message(DaemonDown(str(err)))
                else:
                    if worker.is_cancelled:
                        client.close()
                        return
                    self.post_message(Connected(client, status, services))
                    return
            self._stopping.wait(self.retry_seconds)

    @staticmethod
    def _served(client: DaemonClient) -> frozenset[str]:
        """The registered sections' services this daemon serves (per the standard health service)."""
        served = set()
        for entry in SECTIONS:
            try:
                if client.health(entry.service) == "SERVING":
                    served.add(entry.service)
            except LoradRpcError as err:
                if isinstance(err, DaemonUnavailable):
                    raise
        return frozenset(served)

    @_while_running
    def on_daemon_down(self, message: DaemonDown) -> None:
        if self._exiting:
            return
        if self._offline is None:
            self._offline = OfflineScreen(message.reason, self.retry_seconds)
            self.push_screen(self._offline)
        else:
            self._offline.set_reason(message.reason)

    @_while_running
    def on_connected(self, message: Connected) -> None:
        self.client = message.client
        self.services = message.services
        self.view.set_status(message.status, self.view.models, self.clock())
        self._daemon_identity = (message.status.pid, message.status.started_at.seconds)
        self._poll_signature = None
        if self._offline is not None:
            offline, self._offline = self._offline, None
            offline.pop_until_active()
            self.pop_screen()
        self._following.clear()
        self._poll_loop(message.client)
        self._load_jobs(message.client)
        self.view.watching = WATCH_SERVICE in message.services
        if self.view.watching:
            self._follow_watches(message.client)
        self._changed()
        self.refresh_bindings()

    @_while_running
    def on_connection_lost(self, message: ConnectionLost) -> None:
        if message.client is not self.client:
            return  # an old client's worker reporting late: already handled
        self.client = None
        self.workers.cancel_group(self, "poll")
        self._drop_streams()
        self._stop_watches()
        message.client.close()
        self.refresh_bindings()
        self.post_message(DaemonDown(message.reason))
        self._connect_loop()

    # -- status, models and the job list -------------------------------------------------------

    @work(exclusive=True, thread=True, group="poll")
    def _poll_loop(self, client: DaemonClient) -> None:
        """Status and resident models every ``refresh_seconds`` (→ Polled) until the daemon goes."""
        worker = get_current_worker()
        while not (worker.is_cancelled or self._stopping.is_set()):
            try:
                status, models = client.status(), client.list_models()
            except DaemonUnavailable as err:
                self.post_message(ConnectionLost(client, str(err)))
                return
            except _GONE:
                pass  # a refused or timed-out refresh: the next one will tell
            else:
                self.post_message(Polled(client, status, models, self.clock()))
            self._stopping.wait(self.refresh_seconds)

    @work(exclusive=True, thread=True, group="jobs")
    def _load_jobs(self, client: DaemonClient) -> None:
        """The whole job list (→ JobsLoaded)."""
        try:
            jobs = client.list_jobs()
        except DaemonUnavailable as err:
            self.post_message(ConnectionLost(client, str(err)))
        except _GONE as err:
            self.post_message(CallFailed("list jobs", str(err)))
        else:
            self.post_message(JobsLoaded(jobs))

    @_while_running
    def on_polled(self, message: Polled) -> None:
        if message.client is not self.client:
            return
        status = message.status
        self.view.set_status(status, message.models, message.at)
        identity = (status.pid, status.started_at.seconds)
        restarted, self._daemon_identity = identity != self._daemon_identity, identity
        # There is no stream of all jobs, and re-listing them every few seconds would be wasteful.
        # Running jobs are followed by their own WatchJob streams (live rows); the rest of the list
        # changes only when a job is submitted, starts, ends or is cancelled. The status tells us
        # the queue length and the running job, so the list is fetched again only when those move
        # (a job submitted from the CLI, a queued job that started) or the daemon restarted.
        # jobs_revision moves with every submit and state change, so a burst that came and went
        # between two polls (queued, ran, finished) still reloads the list.
        signature = (status.queue_length, status.running_job_id, status.jobs_revision)
        if restarted or signature != self._poll_signature:
            self._load_jobs(message.client)
        self._poll_signature = signature
        self._changed()

    @_while_running
    def on_jobs_loaded(self, message: JobsLoaded) -> None:
        self.view.replace_jobs(message.jobs)
        self._sync_streams()
        self._changed()

    def on_refresh_requested(self, message: RefreshRequested) -> None:
        if self.client is not None:
            self._load_jobs(self.client)
            self._poll_loop(self.client)  # restarts the loop: a refresh now, then every few seconds

    # -- watched folders -----------------------------------------------------------------------

    @work(exclusive=True, thread=True, group="watches")
    def _follow_watches(self, client: DaemonClient) -> None:
        """Follow the FollowWatches stream (→ WatchesStreamed) while the daemon serves WatchService."""
        try:
            stream = client.follow_watches()
            self._watches_stream = stream
            for item in stream:
                self.post_message(WatchesStreamed(client, item))
        except DaemonUnavailable as err:
            self.post_message(ConnectionLost(client, str(err)))
        except _GONE as err:
            self.post_message(CallFailed("follow watched folders", str(err)))

    def _stop_watches(self) -> None:
        stream, self._watches_stream = self._watches_stream, None
        if stream is not None:
            stream.cancel()

    @_while_running
    def on_watches_streamed(self, message: WatchesStreamed) -> None:
        if message.client is not self.client:
            return
        self.view.apply_watches(message.item)
        self._changed()

    # -- following jobs ------------------------------------------------------------------------

    def _sync_streams(self) -> None:
        """Follow exactly the jobs that change: running ones, and unfinished ones on a detail screen.

        Queued jobs are not followed while nobody looks at them: each stream holds a thread here
        and in the daemon, and a long queue would tie up both; the status refresh notices when a
        queued job starts, and the list reload then starts its stream.
        """
        if self.client is None:
            return
        wanted = {view.job_id for view in self.view.listed() if view.job.state == JOB_STATE_RUNNING}
        wanted |= {
            job_id
            for job_id, count in self._open_jobs.items()
            if count > 0 and job_id in self.view.jobs and not is_final(self.view.jobs[job_id].job)
        }
        for job_id in wanted - self._following:
            self._start_stream(job_id, history_only=False)
        for job_id in self._following - wanted:
            self._stop_stream(job_id)

    def _start_stream(self, job_id: str, *, history_only: bool) -> None:
        if self.client is None:
            return
        if not history_only:
            self._following.add(job_id)
        view = self.view.jobs.get(job_id)
        after = view.last_seq if view is not None else 0
        # One worker per followed job (its own group: exclusive per job, not across jobs).
        self.run_worker(
            partial(self._stream_job, self.client, job_id, after, history_only),
            name=f"watch {job_id}",
            group=f"watch:{job_id}",
            exclusive=True,
            thread=True,
        )

    def _stream_job(self, client: DaemonClient, job_id: str, after_seq: int, history_only: bool) -> None:
        """Worker: follow one job's WatchJob stream, posting each message (→ Streamed, StreamEnded)."""
        stream: JobStream | None = None
        try:
            stream = client.watch_job(job_id, after_seq, history_only=history_only)
            with self._streams_lock:
                previous = self._streams.get(job_id)
                self._streams[job_id] = stream
            if previous is not None:
                previous.cancel()
            for item in stream:
                self.post_message(Streamed(job_id, item))
        except DaemonUnavailable as err:
            self.post_message(ConnectionLost(client, str(err)))
            self.post_message(StreamEnded(job_id, str(err)))
        except _GONE as err:
            self.post_message(StreamEnded(job_id, str(err)))
        else:
            self.post_message(StreamEnded(job_id))
        finally:
            with self._streams_lock:
                if stream is not None and self._streams.get(job_id) is stream:
                    del self._streams[job_id]

    def _stop_stream(self, job_id: str) -> None:
        self._following.discard(job_id)
        with self._streams_lock:
            stream = self._streams.pop(job_id, None)
        if stream is not None:
            stream.cancel()

    def _drop_streams(self) -> None:
        with self._streams_lock:
            streams, self._streams = list(self._streams.values()), {}
        for stream in streams:
            stream.cancel()
        self._following.clear()

    @_while_running
    def on_streamed(self, message: Streamed) -> None:
        item = message.item
        if item.WhichOneof("item") == "job":
            self.view.upsert_job(item.job)
        elif not self.view.apply_event(message.job_id, item.event):
            return
        self._changed(frozenset({message.job_id}))

    @_while_running
    def on_stream_ended(self, message: StreamEnded) -> None:
        followed = message.job_id in self._following
        self._following.discard(message.job_id)
        view = self.view.jobs.get(message.job_id)
        if message.error or view is None or not is_final(view.job):
            return
        self._history_loaded.add(message.job_id)
        if followed and self.client is not None:
            # A followed job ended: its final fields (finished_at, outputs) and whichever queued job
            # starts next come with a fresh list.
            self._load_jobs(self.client)

    # -- what the screens ask for --------------------------------------------------------------

    def on_open_job(self, message: OpenJob) -> None:
        self._show_job(message.job_id)

    def _show_job(self, job_id: str, *, replace: bool = False) -> None:
        if self._exiting:
            return
        self._open_jobs[job_id] += 1
        screen = JobDetailScreen(job_id, self.view, self.clock)
        if replace:
            self.switch_screen(screen)
        else:
            self.push_screen(screen)
        view = self.view.jobs.get(job_id)
        if view is not None and is_final(view.job):
            if job_id not in self._history_loaded:
                self._start_stream(job_id, history_only=True)
        else:
            self._sync_streams()

    def on_close_job(self, message: CloseJob) -> None:
        self._open_jobs[message.job_id] -= 1
        if self._open_jobs[message.job_id] <= 0:
            del self._open_jobs[message.job_id]
        self._sync_streams()

    def on_submit_requested(self, message: SubmitRequested) -> None:
        if self.client is None:
            self.notify("not connected to the daemon", severity="error")
            return
        self._submit(self.client, message.path, message.text)

    @work(exclusive=True, thread=True, group="submit")
    def _submit(self, client: DaemonClient, path: Path, text: str) -> None:
        """Queue a config (→ Submitted, or CallFailed with the daemon's list of problems)."""
        try:
            job = client.submit_training(text, base_dir=self.base_dir, source_name=str(path))
        except DaemonUnavailable as err:
            self.post_message(CallFailed("submit", str(err)))
            self.post_message(ConnectionLost(client, str(err)))
        except _GONE as err:
            self.post_message(CallFailed("submit", str(err)))
        else:
            self.post_message(Submitted(job))

    @_while_running
    def on_submitted(self, message: Submitted) -> None:
        job = message.job
        self.view.upsert_job(job)
        self.notify(f"queued {job.name} (job {job.job_id})", title="submitted")
        # The detail replaces the submit screen: back from it leads to the dashboard.
        self._show_job(job.job_id, replace=isinstance(self.screen, SubmitScreen))
        if self.client is not None:
            self._load_jobs(self.client)
        self._changed(frozenset({job.job_id}))

    def on_cancel_requested(self, message: CancelRequested) -> None:
        if self.client is None:
            self.notify("not connected to the daemon", severity="error")
            return
        self._cancel(self.client, message.job_id)

    @work(exclusive=True, thread=True, group="cancel")
    def _cancel(self, client: DaemonClient, job_id: str) -> None:
        """Cancel a job (→ Cancelled, or CallFailed)."""
        try:
            job = client.cancel_job(job_id)
        except DaemonUnavailable as err:
            self.post_message(CallFailed("cancel", str(err)))
            self.post_message(ConnectionLost(client, str(err)))
        except _GONE as err:
            self.post_message(CallFailed("cancel", str(err)))
        else:
            self.post_message(Cancelled(job))

    @_while_running
    def on_cancelled(self, message: Cancelled) -> None:
        job = message.job
        self.view.upsert_job(job)
        if is_final(job):
            self.notify(f"{job.name} cancelled", title="cancel")
        else:
            self.notify(f"{job.name} stops after its current step and keeps its last checkpoint", title="cancel")
        if self.client is not None:
            self._load_jobs(self.client)
        self._changed(frozenset({job.job_id}))

    def on_run_requested(self, message: RunRequested) -> None:
        if self.client is None:
            self.notify("not connected to the daemon", severity="error")
            return
        self.notify("after the current step…", title=f"{message.what} now")
        self._ask_run(self.client, message.job_id, message.what)

    @work(exclusive=False, thread=True, group="run-request")
    def _ask_run(self, client: DaemonClient, job_id: str, what: str) -> None:
        """Sample now / save now (→ RunAnswered, or CallFailed); waits for the job's current step to end."""
        try:
            events = client.sample_now(job_id) if what == "sample" else client.save_now(job_id)
        except DaemonUnavailable as err:
            self.post_message(CallFailed(f"{what} now", str(err)))
            self.post_message(ConnectionLost(client, str(err)))
        except _GONE as err:
            self.post_message(CallFailed(f"{what} now", str(err)))
        else:
            self.post_message(RunAnswered(job_id, what, [line for e in events if (line := describe_event(e))]))

    @_while_running
    def on_run_answered(self, message: RunAnswered) -> None:
        # The images themselves arrive through the job's stream, like every other event.
        self.notify("\n".join(message.lines) or "done", title=f"{message.what} now")

    @_while_running
    def on_call_failed(self, message: CallFailed) -> None:
        if message.what == "submit":
            for screen in self.screen_stack:
                if isinstance(screen, SubmitScreen):
                    screen.post_message(SubmitRejected(message.error))
        self.notify(message.error, title=f"{message.what} failed", severity="error")

    # -- telling the screens -------------------------------------------------------------------

    def _changed(self, job_ids: frozenset[str] = frozenset()) -> None:
        """Note that the view changed (``job_ids``: only these jobs; empty: anything) and tell the
        screens within ``REDRAW_SECONDS``.

        Coalesced because a stream can bring hundreds of events at once (a job's history when its
        detail opens): the screens then redraw once, not once per event.
        """
        if job_ids:
            self._dirty_jobs |= job_ids
        else:
            self._dirty_all = True
        if not self._redraw_pending:
            self._redraw_pending = True
            self.set_timer(REDRAW_SECONDS, self._tell_screens)

    def _tell_screens(self) -> None:
        """Post one ViewChanged to every screen on the stack, so a covered one is current when shown."""
        job_ids = frozenset() if self._dirty_all else frozenset(self._dirty_jobs)
        self._redraw_pending, self._dirty_all, self._dirty_jobs = False, False, set()
        for screen in self.screen_stack:
            screen.post_message(ViewChanged(job_ids))
