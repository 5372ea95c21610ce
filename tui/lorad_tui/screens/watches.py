"""Watched folders: add one (a folder of images + a template config), see every watch's state live,
remove one.

The left tree picks both: enter on a folder fills the folder, on a YAML file the config. The table
is drawn from the App's DaemonView, which the FollowWatches stream keeps current; adding and
removing are calls of this screen, and their effect shows when the stream reports it.
"""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar

from rich.text import Text
from textual import work
from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import Horizontal, Vertical
from textual.screen import Screen
from textual.widgets import Button, Checkbox, DataTable, DirectoryTree, Footer, Input, Select, Static

from lorad_tui.display import WATCH_COLUMNS, watch_cells, watch_detail
from lorad_tui.messages import SectionCallFailed, ViewChanged, WatchAdded, WatchRemoved
from lorad_tui.screens.confirm import ConfirmScreen
from lorad_tui.screens.submit import ConfigTree
from lorad_tui.section_calls import call_daemon
from lorad_tui.state import DaemonView
from lorad_tui.widgets.tables import key_under_cursor
from lorad_tui.widgets.title_bar import TitleBar

MODES = (("continue", "continue"), ("retrain", "retrain"))  # see WatchMode in watch.proto


class WatchesScreen(Screen[None]):
    """Add, follow and remove the daemon's watched folders (relative paths: to ``base_dir``)."""

    AUTO_FOCUS = "#watch-tree"
    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("escape", "back", "Back"),
        Binding("a", "add", "Add watch"),
        Binding("d", "remove", "Remove"),
    ]

    def __init__(self, base_dir: Path, view: DaemonView) -> None:
        super().__init__()
        self.base_dir = base_dir
        self.view = view

    def compose(self) -> ComposeResult:
        yield TitleBar("watched folders")
        with Horizontal(id="watch-form"):
            yield ConfigTree(self.base_dir, id="watch-tree")
            with Vertical(id="watch-fields"):
                yield Input(placeholder="image folder (enter on a folder in the tree)", id="watch-folder")
                yield Input(placeholder="template config .yaml (enter on a file)", id="watch-config")
                # The policy; an empty field means the daemon's default (WatchPolicy in watch.proto).
                with Horizontal(id="watch-policy-row"):
                    yield Select(MODES, value="continue", allow_blank=False, id="watch-mode")
                    yield Input(
                        placeholder="10",
                        type="number",
                        id="watch-quiet",
                        classes="watch-number",
                        tooltip="seconds without file changes before training (default 10)",
                    )
                    yield Input(
                        placeholder="1",
                        type="integer",
                        id="watch-min-new",
                        classes="watch-number",
                        tooltip="new images needed before a job (default 1)",
                    )
                    yield Input(
                        placeholder="cfg",
                        type="integer",
                        id="watch-steps",
                        classes="watch-number",
                        tooltip="steps of a continue job (default: the config's)",
                    )
                with Horizontal(id="watch-add-row"):
                    yield Input(placeholder="optional", id="watch-publish")
                    yield Checkbox("poll", id="watch-polling", tooltip="poll the folder (network drives)")
                    yield Button("Add (a)", id="watch-add", variant="primary")
        yield Static(id="watch-problem")
        yield Static("Watched folders", classes="section-title")
        yield DataTable(id="watch-table", cursor_type="row", zebra_stripes=True)
        yield Static(
            "no folder is watched — pick a folder and a config above, then press a",
            id="watch-empty",
            classes="empty-note",
        )
        yield Static(id="watch-detail")
        yield Footer()

    def on_mount(self) -> None:
        # Labels on the fields' top edges: a placeholder vanishes once a value is typed.
        for field, label in (
            ("#watch-mode", "mode"),
            ("#watch-quiet", "quiet"),
            ("#watch-min-new", "min"),
            ("#watch-steps", "steps"),
            ("#watch-publish", "publish to"),
        ):
            self.query_one(field).border_title = label
        table = self.query_one("#watch-table", DataTable)
        for column in WATCH_COLUMNS:
            table.add_column(column, key=column)
        self.query_one("#watch-problem").display = False
        self.redraw()

    def on_view_changed(self, message: ViewChanged) -> None:
        if not message.job_ids:
            self.redraw()

    def on_screen_resume(self) -> None:
        self.redraw()

    def redraw(self) -> None:
        """The table (and the selected watch's detail) from the view."""
        table = self.query_one("#watch-table", DataTable)
        watches = list(self.view.watches.values())
        selected = self.selected()
        folder_width = max(16, self.size.width - 52)
        table.clear()
        for watch in watches:
            table.add_row(*watch_cells(watch, folder_width), key=watch.watch_id)
        keys = [watch.watch_id for watch in watches]
        if selected in keys:
            table.move_cursor(row=keys.index(selected))
        table.display = bool(watches)
        self.query_one("#watch-empty").display = not watches
        self._draw_detail()
        self.refresh_bindings()

    def selected(self) -> str | None:
        """The id of the watch under the table's cursor, or None."""
        return key_under_cursor(self.query_one("#watch-table", DataTable))

    def _draw_detail(self) -> None:
        watch = self.view.watches.get(self.selected() or "")
        self.query_one("#watch-detail", Static).update(watch_detail(watch) if watch is not None else "")

    def on_data_table_row_highlighted(self, event: DataTable.RowHighlighted) -> None:
        self._draw_detail()
        self.refresh_bindings()

    # -- picking -------------------------------------------------------------------------------

    def _shown(self, path: Path) -> str:
        try:
            return str(path.resolve().relative_to(self.base_dir)) or "."
        except ValueError:
            return str(path)

    def on_directory_tree_directory_selected(self, event: DirectoryTree.DirectorySelected) -> None:
        event.stop()
        self.query_one("#watch-folder", Input).value = self._shown(event.path)

    def on_directory_tree_file_selected(self, event: DirectoryTree.FileSelected) -> None:
        event.stop()
        self.query_one("#watch-config", Input).value = self._shown(event.path)

    # -- adding and removing -------------------------------------------------------------------

    def on_input_submitted(self, event: Input.Submitted) -> None:
        event.stop()
        self.action_add()

    def on_button_pressed(self, event: Button.Pressed) -> None:
        if event.button.id == "watch-add":
            self.action_add()

    def action_add(self) -> None:
        folder = self.query_one("#watch-folder", Input).value.strip()
        config = self.query_one("#watch-config", Input).value.strip()
        if not folder or not config:
            self._problem("pick the image folder and the template config first")
            return
        try:
            policy = self._policy()
        except ValueError as error:
            self._problem(str(error))
            return
        self._problem("")
        self._add(folder, config, policy)

    def _problem(self, text: str) -> None:
        """Say what is wrong right under the form, where it stays until the next try (a toast would cover
        the form being corrected for seconds); "" clears it."""
        problem = self.query_one("#watch-problem", Static)
        problem.update(Text(f"✗ {text}", style="bold red") if text else "")
        problem.display = bool(text)

    def _policy(self) -> dict[str, object]:
        """The policy fields as ``add_watch`` keywords; only those set (the daemon fills in the rest and
        checks the ranges). ValueError names a field that is not a number."""
        policy: dict[str, object] = {"mode": str(self.query_one("#watch-mode", Select).value)}
        numbers = (
            ("#watch-quiet", "quiet_seconds", float),
            ("#watch-min-new", "min_new_images", int),
            ("#watch-steps", "continue_steps", int),
        )
        for field, keyword, kind in numbers:
            text = self.query_one(field, Input).value.strip()
            if text:
                try:
                    policy[keyword] = kind(text)
                except ValueError:
                    raise ValueError(f"{keyword.replace('_', ' ')} must be a number, not {text!r}") from None
        publish = self.query_one("#watch-publish", Input).value.strip()
        if publish:
            policy["publish_dir"] = publish
        if self.query_one("#watch-polling", Checkbox).value:
            policy["polling"] = True
        return policy

    @work(exclusive=True, thread=True, group="watch-add")
    def _add(self, folder: str, config: str, policy: dict[str, object]) -> None:
        call_daemon(
            self,
            "add watch",
            lambda client: WatchAdded(client.add_watch(folder, config, base_dir=str(self.base_dir), **policy)),
        )

    def on_watch_added(self, message: WatchAdded) -> None:
        self.view.watches[message.watch.watch_id] = message.watch  # the stream confirms it shortly
        self.notify(f"watching {message.watch.folder}", title="watch added")
        self.query_one("#watch-folder", Input).value = ""
        self.redraw()

    def action_remove(self) -> None:
        watch = self.view.watches.get(self.selected() or "")
        if watch is None:
            return

        def confirmed(yes: bool | None) -> None:
            if yes:
                self._remove(watch.watch_id)

        self.app.push_screen(
            ConfirmScreen(f"Stop watching {watch.folder}?\nJobs it already queued are left alone; its files stay."),
            confirmed,
        )

    @work(exclusive=True, thread=True, group="watch-remove")
    def _remove(self, watch_id: str) -> None:
        call_daemon(self, "remove watch", lambda client: WatchRemoved(client.remove_watch(watch_id)))

    def on_watch_removed(self, message: WatchRemoved) -> None:
        self.view.watches.pop(message.watch.watch_id, None)
        self.notify(f"stopped watching {message.watch.folder}", title="watch removed")
        self.redraw()

    def on_section_call_failed(self, message: SectionCallFailed) -> None:
        self._problem(f"{message.what} failed: {message.error}")

    def check_action(self, action: str, parameters: tuple[object, ...]) -> bool | None:
        if action == "remove":
            return self.selected() is not None
        return True

    def action_back(self) -> None:
        self.dismiss()
