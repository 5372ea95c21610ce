"""Captions: caption a folder with a chosen captioner, watch it go, then review and edit the captions.

The table lists every image of the folder with its caption as training reads it and where that
caption comes from. ``enter`` on a row puts its caption in the editor below; ``enter`` there keeps
the edit (marked unsaved in the table) and moves to the next image; ``ctrl+s`` writes every kept
edit through the daemon, which puts each where the folder keeps its captions. The daemon does all
the file work (SetCaptions), so the TUI never writes into the folder itself.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from rich.text import Text
from textual import work
from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import Horizontal
from textual.message import Message
from textual.screen import Screen
from textual.widgets import Button, DataTable, Footer, Input, ProgressBar, Select, Static

from lorad_api.v1 import caption_pb2
from lorad_tui.connection import CaptionStream, DaemonClient
from lorad_tui.messages import CaptionsListed, CaptionsSaved, CaptionStreamed, SectionCallFailed
from lorad_tui.section_calls import call_daemon
from lorad_tui.widgets.tables import key_under_cursor
from lorad_tui.widgets.title_bar import TitleBar

CAPTIONERS = (
    ("BLIP sentences", caption_pb2.CAPTIONER_KIND_BLIP),
    ("WD14 tags", caption_pb2.CAPTIONER_KIND_WD14),
    ("CLIP phrases", caption_pb2.CAPTIONER_KIND_CLIP),
)
SOURCE_LABELS = {
    caption_pb2.CAPTION_SOURCE_CSV: "csv",
    caption_pb2.CAPTION_SOURCE_SIDECAR: "sidecar",
    caption_pb2.CAPTION_SOURCE_NONE: "none",
}
COLUMNS = ("Image", "Caption", "From")
SOURCE_WIDTH = 15
HINT = "Type an image folder: enter lists its captions, g captions the images that have none."


@dataclass
class CaptionRowView:
    """What one table row shows: the caption, where it comes from, and an error (unreadable caption,
    failed image) shown in its place."""

    caption: str
    source: str
    error: str = ""


def source_text(row: CaptionRowView, *, edited: bool) -> Text:
    """The From cell: where the caption lives, who wrote it, or that an edit is not saved yet."""
    if edited:
        return Text("✎ not saved", style="bold yellow")
    style = {"none": "dim", "✓ new": "green", "failed": "bold red"}.get(row.source, "")
    return Text(row.source, style=style)


def caption_text(row: CaptionRowView, caption: str) -> Text:
    """The Caption cell: the caption (cut with … to the column), or the error in red."""
    if row.error:
        return Text(f"✗ {row.error}", style="red", no_wrap=True, overflow="ellipsis")
    return Text(caption or "—", style="" if caption else "dim", no_wrap=True, overflow="ellipsis")


class CaptionEditor(Input):
    """The one-line caption editor under the table; ``escape`` drops the edit and goes back to the table."""

    BINDINGS: ClassVar[list[BindingType]] = [Binding("escape", "drop", "Drop the edit", key_display="esc")]

    def action_drop(self) -> None:
        self.post_message(self.Dropped())

    class Dropped(Message):
        """The user dropped the edit in progress."""


class CaptionsScreen(Screen[None]):
    """Caption a folder (relative paths: to ``base_dir``), see each caption arrive, edit, save."""

    AUTO_FOCUS = "#caption-folder"
    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("escape", "back", "Back"),
        Binding("g", "caption", "Caption"),
        Binding("p", "next_captioner", "Captioner"),
        Binding("x", "stop", "Stop"),
        Binding("e", "edit", "Edit"),
        Binding("ctrl+s", "save", "Save edits"),
        Binding("r", "reload", "Reload"),
    ]

    def __init__(self, base_dir: Path) -> None:
        super().__init__()
        self.base_dir = base_dir
        self.folder = ""
        self.rows: dict[str, CaptionRowView] = {}
        self.edits: dict[str, str] = {}
        self._editing: str | None = None
        self._stream: CaptionStream | None = None
        self._warned_unsaved = False
        self._summary: Text | None = None  # how the last captioning went, kept over the listing after it

    def compose(self) -> ComposeResult:
        yield TitleBar("captions")
        with Horizontal(id="caption-controls"):
            yield Input(placeholder="image folder, then enter", id="caption-folder")
            yield Select(CAPTIONERS, value=caption_pb2.CAPTIONER_KIND_BLIP, allow_blank=False, id="captioner")
            yield Input(placeholder="model (empty: the usual one)", id="caption-model")
            yield Button("Caption (g)", id="caption-button", variant="primary")
        with Horizontal(id="caption-progress-row"):
            yield Static(HINT, id="caption-status")
            yield ProgressBar(id="caption-progress", show_eta=False)
        yield DataTable(id="captions-table", cursor_type="row", zebra_stripes=True)
        yield CaptionEditor(placeholder="enter on an image edits its caption here", id="caption-edit")
        yield Footer()

    def on_mount(self) -> None:
        self.query_one("#caption-progress").display = False
        # The editor is in the tab order only while an edit is open: tabbing on from the model field
        # must not land in an empty editor that edits nothing.
        self.query_one("#caption-edit", CaptionEditor).can_focus = False
        self._lay_out_table()

    def on_resize(self) -> None:
        self._lay_out_table()

    # -- the table -----------------------------------------------------------------------------

    def _lay_out_table(self) -> None:
        """(Re)build the table with the caption column taking what the image and source leave."""
        table = self.query_one("#captions-table", DataTable)
        width = max(self.size.width, 40)
        image_width = min(max([len("Image"), *map(len, self.rows)]), max(12, width // 4))
        # Each column pads one cell on both sides; 2 more for the vertical scrollbar.
        caption_width = max(10, width - image_width - SOURCE_WIDTH - 6 - 2)
        cursor = table.cursor_row
        table.clear(columns=True)
        table.add_column("Image", key="Image", width=image_width)
        table.add_column("Caption", key="Caption", width=caption_width)
        table.add_column("From", key="From", width=SOURCE_WIDTH)
        for rel, row in self.rows.items():
            table.add_row(*self._cells(rel, row), key=rel)
        if self.rows:
            table.move_cursor(row=min(cursor, len(self.rows) - 1))

    def _cells(self, rel: str, row: CaptionRowView) -> tuple[Text, Text, Text]:
        caption = self.edits.get(rel, row.caption)
        return (
            Text(rel, no_wrap=True, overflow="ellipsis"),
            caption_text(row, caption),
            source_text(row, edited=rel in self.edits),
        )

    def _update_row(self, rel: str) -> None:
        table = self.query_one("#captions-table", DataTable)
        if rel not in {key.value for key in table.rows}:
            self._lay_out_table()
            return
        for column, cell in zip(COLUMNS, self._cells(rel, self.rows[rel]), strict=True):
            table.update_cell(rel, column, cell)

    def selected(self) -> str | None:
        """The image under the table's cursor, or None."""
        return key_under_cursor(self.query_one("#captions-table", DataTable))

    def _status(self, text: str | Text) -> None:
        self.query_one("#caption-status", Static).update(text)

    # -- listing -------------------------------------------------------------------------------

    def on_input_submitted(self, event: Input.Submitted) -> None:
        event.stop()
        if event.input.id == "caption-edit":
            self._keep_edit(event.value)
        elif event.input.id in ("caption-folder", "caption-model") and self._folder_field():
            self.action_reload()

    def _folder_field(self) -> str:
        return self.query_one("#caption-folder", Input).value.strip()

    def action_reload(self) -> None:
        folder = self._folder_field()
        if not folder:
            self.notify("type the image folder first", severity="warning")
            return
        if folder != self.folder:
            self.edits.clear()
        self.folder = folder
        self._status(f"reading the captions of {folder}…")
        self._list(folder)

    @work(exclusive=True, thread=True, group="captions-list")
    def _list(self, folder: str) -> None:
        call_daemon(self, "list", lambda client: CaptionsListed(client.list_captions(folder, base_dir=self.base_dir)))

    def on_captions_listed(self, message: CaptionsListed) -> None:
        listing = message.listing
        self.rows = {row.path: CaptionRowView(row.caption, _source(row), row.error) for row in listing.rows}
        self.edits = {rel: text for rel, text in self.edits.items() if rel in self.rows}
        self._lay_out_table()
        count = len(self.rows)
        missing = sum(1 for row in listing.rows if row.source == caption_pb2.CAPTION_SOURCE_NONE)
        summary, self._summary = self._summary, None
        self._status(
            summary
            or Text.assemble(
                (f"{count} image{'s' if count != 1 else ''}", "bold"),
                f", {missing} without a caption · captions go to {listing.written_to}",
            )
        )
        if count:
            self.query_one("#captions-table", DataTable).focus()
        self.refresh_bindings()

    # -- captioning ----------------------------------------------------------------------------

    def on_button_pressed(self, event: Button.Pressed) -> None:
        if event.button.id == "caption-button":
            self.action_caption()

    def action_next_captioner(self) -> None:
        """Pick the next captioner (BLIP → WD14 → CLIP → BLIP) from the keyboard, wherever the focus is."""
        picker = self.query_one("#captioner", Select)
        values = [value for _, value in CAPTIONERS]
        picker.value = values[(values.index(picker.value) + 1) % len(values)]
        label = next(name for name, value in CAPTIONERS if value == picker.value)
        self._status(f"captioner: {label} — g captions the images that have none")

    def action_caption(self) -> None:
        folder = self._folder_field()
        if not folder:
            self.notify("type the image folder first", severity="warning")
            return
        if self._stream is not None:
            return
        self.folder = folder
        captioner = self.query_one("#captioner", Select).value
        model = self.query_one("#caption-model", Input).value.strip()
        self._status(f"captioning {folder}: reading the folder…")
        self.query_one("#caption-button", Button).disabled = True
        self._caption(folder, int(captioner), model)  # type: ignore[arg-type]  # never blank
        self.refresh_bindings()

    @work(exclusive=True, thread=True, group="captions-run")
    def _caption(self, folder: str, captioner: int, model: str) -> None:
        """Follow one CaptionImages stream, posting each message (→ CaptionStreamed)."""

        def run(client: DaemonClient) -> None:
            stream = client.caption_images(folder, base_dir=self.base_dir, captioner=captioner, model=model)
            self._stream = stream
            try:
                for item in stream:
                    self.post_message(CaptionStreamed(item))
            finally:
                self._stream = None

        call_daemon(self, "caption", run)

    def on_caption_streamed(self, message: CaptionStreamed) -> None:
        item = message.item
        kind = item.WhichOneof("item")
        progress = self.query_one("#caption-progress", ProgressBar)
        if kind == "planned":
            planned = item.planned
            self.rows = {}
            progress.update(total=max(planned.images_found, 1), progress=0)
            progress.display = True
            self._status(
                f"{planned.to_caption} to caption, {planned.to_keep} kept"
                + (f", {planned.unusable} unusable" if planned.unusable else "")
            )
        elif kind == "captioner_ready":
            ready = item.captioner_ready
            how = "already loaded" if ready.resident else f"loaded in {ready.seconds:.1f}s"
            self._status(f"{ready.captioner} ({ready.model_version}) {how} — captioning…")
        elif kind == "image":
            image = item.image
            label = {caption_pb2.CAPTION_STATUS_CAPTIONED: "✓ new", caption_pb2.CAPTION_STATUS_KEPT: "kept"}.get(
                image.status, "failed"
            )
            self.rows[image.path] = CaptionRowView(image.caption, label, image.error)
            if image.status == caption_pb2.CAPTION_STATUS_CAPTIONED:
                self.edits.pop(image.path, None)  # a new caption replaces an edit made before it
            self._update_row(image.path)
            progress.update(total=max(image.total, 1), progress=image.done)
            self._status(f"captioning {image.done}/{image.total}")
        elif kind == "finished":
            done = item.finished
            progress.display = False
            self.query_one("#caption-button", Button).disabled = False
            verb = "stopped" if done.stopped else "done"
            self._summary = Text.assemble(
                (f"{verb}: ", "bold"),
                f"{done.captioned} captioned, {done.kept} kept, "
                f"{done.failed} failed in {done.seconds:.1f}s · in {done.written_to}",
            )
            self._status(self._summary)
            self.notify(f"{done.captioned} new captions in {done.written_to}", title=f"captioning {verb}")
            self._list(self.folder)  # sources and who wrote each, as the daemon reads them now
        self.refresh_bindings()

    def action_stop(self) -> None:
        stream = self._stream
        if stream is not None:
            stream.cancel()
            self._status("stopping after the current batch; captions written so far stay")

    def on_unmount(self) -> None:
        self.action_stop()

    # -- editing -------------------------------------------------------------------------------

    def on_data_table_row_selected(self, event: DataTable.RowSelected) -> None:
        event.stop()
        self.action_edit()

    def on_data_table_row_highlighted(self, event: DataTable.RowHighlighted) -> None:
        self.refresh_bindings()

    def action_edit(self) -> None:
        rel = self.selected()
        if rel is None:
            return
        self._editing = rel
        editor = self.query_one("#caption-edit", CaptionEditor)
        editor.value = self.edits.get(rel, self.rows[rel].caption)
        editor.border_title = rel
        editor.can_focus = True
        editor.focus()
        editor.cursor_position = len(editor.value)
        self.refresh_bindings()

    def on_caption_editor_dropped(self, message: CaptionEditor.Dropped) -> None:
        self._editing = None
        editor = self.query_one("#caption-edit", CaptionEditor)
        editor.value, editor.border_title, editor.can_focus = "", None, False
        self.query_one("#captions-table", DataTable).focus()
        self.refresh_bindings()

    def _keep_edit(self, value: str) -> None:
        rel, self._editing = self._editing, None
        editor = self.query_one("#caption-edit", CaptionEditor)
        editor.value, editor.border_title, editor.can_focus = "", None, False
        table = self.query_one("#captions-table", DataTable)
        table.focus()
        if rel is None or rel not in self.rows:
            return
        text = " ".join(value.split())
        if not text:
            self.notify("a caption cannot be empty; escape drops the edit", severity="warning")
            return
        if text == self.rows[rel].caption:
            self.edits.pop(rel, None)
        else:
            self.edits[rel] = text
        self._warned_unsaved = False
        self._update_row(rel)
        if table.cursor_row < table.row_count - 1:
            table.move_cursor(row=table.cursor_row + 1)
        self._status(
            Text.assemble(
                (f"{len(self.edits)} unsaved edit{'s' if len(self.edits) != 1 else ''}", "bold yellow"),
                " — ctrl+s saves them into the folder",
            )
        )
        self.refresh_bindings()

    def action_save(self) -> None:
        editor = self.query_one("#caption-edit", CaptionEditor)
        if self._editing is not None and editor.has_focus:
            self._keep_edit(editor.value)  # ctrl+s while typing saves what is typed too
        if not self.edits:
            self.notify("no edits to save", severity="warning")
            return
        self._status(f"saving {len(self.edits)} caption{'s' if len(self.edits) != 1 else ''}…")
        self._save(self.folder, dict(self.edits))

    @work(exclusive=True, thread=True, group="captions-save")
    def _save(self, folder: str, edits: dict[str, str]) -> None:
        call_daemon(
            self, "save", lambda client: CaptionsSaved(client.set_captions(folder, edits, base_dir=self.base_dir))
        )

    def on_captions_saved(self, message: CaptionsSaved) -> None:
        saved = message.saved
        for row in saved.rows:
            self.edits.pop(row.path, None)
            self.rows[row.path] = CaptionRowView(row.caption, _source(row), row.error)
            self._update_row(row.path)
        count = len(saved.rows)
        self._status(
            Text.assemble(("saved ", "bold green"), f"{count} caption{'s' if count != 1 else ''} to {saved.written_to}")
        )
        self.notify(f"saved {count} caption{'s' if count != 1 else ''}", title="captions")
        self.refresh_bindings()

    def on_section_call_failed(self, message: SectionCallFailed) -> None:
        if message.what == "caption":
            self.query_one("#caption-progress").display = False
            self.query_one("#caption-button", Button).disabled = False
        self._status(Text(f"✗ {message.what} failed — see the message", style="bold red"))
        self.notify(message.error, title=f"{message.what} failed", severity="error", timeout=15)
        self.refresh_bindings()

    # -- keys ----------------------------------------------------------------------------------

    def check_action(self, action: str, parameters: tuple[object, ...]) -> bool | None:
        if action == "stop":
            return self._stream is not None  # shown only while captioning
        if action == "caption":
            return self._stream is None
        if action == "save":
            return True if self.edits or self._editing is not None else None
        if action == "edit":
            return self.selected() is not None
        return True

    def action_back(self) -> None:
        if self.edits and not self._warned_unsaved:
            self._warned_unsaved = True
            self.notify(
                f"{len(self.edits)} unsaved edits: ctrl+s saves them, escape again leaves without saving",
                severity="warning",
            )
            return
        self.dismiss()


def _source(row: caption_pb2.CaptionRow) -> str:
    """Where a listed caption lives and, when lorad wrote it, that it did."""
    where = SOURCE_LABELS.get(row.source, "none")
    return f"{where} · lorad" if row.generated else where
