"""The dashboard: the daemon's status, the resident models, the watched folders and the job table."""

from __future__ import annotations

from collections.abc import Callable
from typing import ClassVar

from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import Vertical
from textual.screen import Screen
from textual.widgets import DataTable, Footer, Static

from lorad_client.format import JOB_COLUMNS
from lorad_tui.display import (
    MODEL_COLUMNS,
    WATCH_COLUMNS,
    job_cells,
    model_cells,
    status_text,
    watch_cells,
)
from lorad_tui.messages import CancelRequested, OpenJob, RefreshRequested, ViewChanged
from lorad_tui.screens.confirm import ConfirmScreen, cancel_question
from lorad_tui.state import DaemonView, is_final
from lorad_tui.widgets.tables import key_under_cursor
from lorad_tui.widgets.title_bar import TitleBar


class DashboardScreen(Screen[None]):
    """Everything at a glance; ``enter`` opens the highlighted job, ``c`` cancels it.

    Draws only from ``view`` (the App's DaemonView) when told it changed (``ViewChanged``), and
    once a second for the countdowns (uptime, keep-alive), using ``clock`` for the time.
    """

    BINDINGS: ClassVar[list[BindingType]] = [
        # Priority: the focused job table has its own (hidden) enter binding, which would hide this one
        # from the footer; both open the job anyway.
        Binding("enter", "open_job", "Details", priority=True, key_display="enter"),
        Binding("c", "cancel_job", "Cancel"),
        Binding("r", "refresh", "Refresh"),
    ]

    def __init__(self, view: DaemonView, clock: Callable[[], float]) -> None:
        super().__init__()
        self.view = view
        self.clock = clock
        self._keys_state: tuple[str | None, bool] | None = None

    def compose(self) -> ComposeResult:
        yield TitleBar("dashboard")
        yield Static("connecting to the lorad daemon…", id="status")
        yield Static("Resident models", classes="section-title")
        yield DataTable(id="models", cursor_type="none", zebra_stripes=True)
        yield Static(
            "none — a base model loads with the first job that uses it", id="models-empty", classes="empty-note"
        )
        # Watched folders: only on a daemon that serves WatchService (hidden until it says so).
        yield Static("Watched folders", classes="section-title watches-part", id="watches-title")
        yield DataTable(id="watches", cursor_type="none", zebra_stripes=True, classes="watches-part")
        yield Static(
            "none — press w to watch a folder of images", id="watches-empty", classes="empty-note watches-part"
        )
        yield Static("Jobs", classes="section-title")
        with Vertical(id="jobs-panel"):
            yield DataTable(id="jobs", cursor_type="row", zebra_stripes=True)
            yield Static("no jobs yet — press s to pick a config and submit it", id="jobs-empty", classes="empty-note")
        yield Footer()

    def on_mount(self) -> None:
        models = self.query_one("#models", DataTable)
        for column in MODEL_COLUMNS:
            models.add_column(column, key=column)
        watches = self.query_one("#watches", DataTable)
        for column in WATCH_COLUMNS:
            watches.add_column(column, key=column)
        jobs = self.query_one("#jobs", DataTable)
        for column in JOB_COLUMNS:
            jobs.add_column(column, key=column)
        jobs.focus()
        self.redraw()
        # Countdowns (uptime, keep-alive) move every second between the App's refreshes.
        self.set_interval(1.0, self._tick)

    def on_view_changed(self, message: ViewChanged) -> None:
        if message.job_ids:
            self._update_job_rows(message.job_ids)
        else:
            self.redraw()

    def on_screen_resume(self) -> None:
        self.redraw()

    def redraw(self) -> None:
        """Draw status, models and the whole job table from the view."""
        self._draw_status()
        self._draw_models()
        self._draw_watches()
        self._draw_jobs()
        self._sync_keys()

    def _tick(self) -> None:
        self._draw_status()
        self._draw_models()

    def _draw_status(self) -> None:
        status = self.view.status
        if status is None:
            return
        running = self.view.jobs.get(status.running_job_id)
        name = (running.job.name if running else "") or status.running_job_id
        self.query_one("#status", Static).update(status_text(status, self.view.uptime(self.clock()), name))

    def _draw_models(self) -> None:
        table = self.query_one("#models", DataTable)
        now = self.clock()
        keys = [model.model_id for model in self.view.models]
        if [row.value for row in table.rows] != keys:
            table.clear()
            for model in self.view.models:
                table.add_row(*model_cells(model, self.view.keep_alive_left(model, now)), key=model.model_id)
        else:
            for model in self.view.models:
                cells = model_cells(model, self.view.keep_alive_left(model, now))
                for column, cell in zip(MODEL_COLUMNS, cells, strict=True):
                    table.update_cell(model.model_id, column, cell)
        table.display = bool(keys)
        self.query_one("#models-empty").display = not keys

    def _draw_watches(self) -> None:
        for part in self.query(".watches-part"):
            part.display = self.view.watching
        if not self.view.watching:
            return
        table = self.query_one("#watches", DataTable)
        table.clear()
        folder_width = max(16, self.size.width - 52)
        for watch in self.view.watches.values():
            table.add_row(*watch_cells(watch, folder_width), key=watch.watch_id)
        table.display = bool(self.view.watches)
        self.query_one("#watches-empty").display = not self.view.watches

    def _draw_jobs(self) -> None:
        table = self.query_one("#jobs", DataTable)
        views = self.view.listed()
        keys = [view.job_id for view in views]
        if [row.value for row in table.rows] == keys:
            self._update_job_rows(frozenset(keys))
        else:
            selected = self.selected_job_id()
            table.clear()
            now = self.clock()
            for view in views:
                table.add_row(*job_cells(view, now), key=view.job_id)
            if selected in keys:
                table.move_cursor(row=keys.index(selected))
        self.query_one("#jobs-empty").display = not keys

    def _update_job_rows(self, job_ids: frozenset[str]) -> None:
        table = self.query_one("#jobs", DataTable)
        known = {row.value for row in table.rows}
        if not job_ids <= known:
            self._draw_jobs()  # a job we have no row for: the order changed
            return
        now = self.clock()
        for job_id in job_ids:
            cells = job_cells(self.view.jobs[job_id], now)
            for column, cell in zip(JOB_COLUMNS, cells, strict=True):
                table.update_cell(job_id, column, cell, update_width=True)
        self._sync_keys()

    def selected_job_id(self) -> str | None:
        """The id of the job under the table's cursor, or None when the table is empty."""
        return key_under_cursor(self.query_one("#jobs", DataTable))

    def check_action(self, action: str, parameters: tuple[object, ...]) -> bool | None:
        if action in ("open_job", "cancel_job"):
            job_id = self.selected_job_id()
            # False hides the key (Textual's None would show it dimmed): no job, or nothing to cancel.
            if job_id is None:
                return False
            if action == "cancel_job" and is_final(self.view.jobs[job_id].job):
                return False
        return True

    def on_data_table_row_highlighted(self, event: DataTable.RowHighlighted) -> None:
        self._sync_keys()

    def _sync_keys(self) -> None:
        """Refresh the footer when what the keys can do changed (which job, finished or not).

        Only then: a footer refresh rebuilds it, and a running job changes many times a second.
        """
        job_id = self.selected_job_id()
        state = (job_id, job_id is not None and is_final(self.view.jobs[job_id].job))
        if state != self._keys_state:
            self._keys_state = state
            self.refresh_bindings()

    def on_data_table_row_selected(self, event: DataTable.RowSelected) -> None:
        if event.data_table.id == "jobs" and event.row_key.value:
            self.post_message(OpenJob(event.row_key.value))

    def action_open_job(self) -> None:
        job_id = self.selected_job_id()
        if job_id:
            self.post_message(OpenJob(job_id))

    def action_cancel_job(self) -> None:
        job_id = self.selected_job_id()
        if job_id is None:
            return
        view = self.view.jobs[job_id]

        def confirmed(yes: bool | None) -> None:
            if yes:
                self.post_message(CancelRequested(job_id))

        self.app.push_screen(ConfirmScreen(cancel_question(view.job)), confirmed)

    def action_refresh(self) -> None:
        self.post_message(RefreshRequested())
