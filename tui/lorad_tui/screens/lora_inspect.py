"""What a LoRA file is, as the daemon's InspectLora reports it: base model, modules, parameters and
precision, trigger words, rank and alpha per block, metadata and problems.

Opened from a finished job's detail (``i``) on the job's kohya file. The file is read by the daemon
(the TUI never imports torch), in a worker of this screen; the wording is ``lorad_client.format``'s,
the same as ``lorad lora inspect`` and the WebUI tab print.
"""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar

from rich.text import Text
from textual import work
from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import VerticalScroll
from textual.screen import Screen
from textual.widgets import DataTable, Footer, Static

from lorad_api.v1.lora_tools_pb2 import InspectLoraResponse
from lorad_client.format import (
    LORA_BLOCK_COLUMNS,
    lora_block_cells,
    lora_metadata_lines,
    lora_problem_lines,
    lora_summary_lines,
)
from lorad_tui.messages import LoraInspected, SectionCallFailed
from lorad_tui.section_calls import call_daemon
from lorad_tui.widgets.title_bar import TitleBar


class LoraInspectScreen(Screen[None]):
    """The inspect report of ``path`` (a LoRA file on the daemon's machine; a relative one is relative to
    ``base_dir``, default the working directory).

    Keys: ``r`` inspects the file again (after it changed), ``escape`` goes back.
    """

    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("escape", "back", "Back"),
        Binding("r", "reload", "Inspect again"),
    ]

    def __init__(self, path: str, base_dir: Path | None = None) -> None:
        super().__init__()
        self.path = path
        self.base_dir = base_dir
        self.report: InspectLoraResponse | None = None

    def compose(self) -> ComposeResult:
        yield TitleBar(f"inspect {Path(self.path).name}")
        with VerticalScroll(id="inspect-body"):
            yield Static(Text(self.path, style="bold"), id="inspect-path")
            yield Static("inspecting…", id="inspect-summary")
            yield Static("Problems", classes="section-title")
            yield Static(id="inspect-problems")
            yield Static("Rank and alpha per block", classes="section-title")
            yield DataTable(id="inspect-blocks", cursor_type="row", zebra_stripes=True)
            yield Static("Metadata", classes="section-title")
            yield Static(id="inspect-metadata")
        yield Footer()

    def on_mount(self) -> None:
        self.query_one("#inspect-blocks", DataTable).add_columns(*LORA_BLOCK_COLUMNS)
        self.query_one("#inspect-body").focus()
        self._inspect()

    @work(exclusive=True, thread=True, group="inspect")
    def _inspect(self) -> None:
        call_daemon(
            self, "inspect", lambda client: LoraInspected(client.inspect_lora(self.path, base_dir=self.base_dir))
        )

    def on_lora_inspected(self, message: LoraInspected) -> None:
        report = self.report = message.report
        self.query_one("#inspect-path", Static).update(Text(report.path or self.path, style="bold"))
        self.query_one("#inspect-summary", Static).update(Text("\n".join(lora_summary_lines(report))))
        problems = lora_problem_lines(report)
        shown = Text("\n").join(Text(line, style="dim" if line.startswith(" ") else "bold red") for line in problems)
        self.query_one("#inspect-problems", Static).update(shown if problems else Text("✓ none found", style="green"))
        table = self.query_one("#inspect-blocks", DataTable)
        table.clear()
        for cells in lora_block_cells(report):
            table.add_row(*cells)
        metadata = lora_metadata_lines(report)
        self.query_one("#inspect-metadata", Static).update(
            Text("\n".join(metadata)) if metadata else Text("none", style="dim")
        )

    def on_section_call_failed(self, message: SectionCallFailed) -> None:
        # The daemon's text names the file and what is wrong with it (not a LoRA, unreadable, gone).
        self.query_one("#inspect-summary", Static).update(Text(f"✗ {message.error}", style="bold red"))

    def action_reload(self) -> None:
        self.query_one("#inspect-summary", Static).update("inspecting…")
        self._inspect()

    def action_back(self) -> None:
        self.dismiss()
