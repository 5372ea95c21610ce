"""The help screen: every key of every screen, read from the screens' own bindings."""

from __future__ import annotations

from collections.abc import Callable
from typing import ClassVar

from rich.table import Table
from rich.text import Text
from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import VerticalScroll
from textual.screen import ModalScreen
from textual.widgets import Footer, Static

KeyGroups = list[tuple[str, list[BindingType]]]


def keys_table(groups: KeyGroups, key_display: Callable[[Binding], str]) -> Table:
    """Key → what it does, one titled group after another (``key_display`` names a key as the footer does)."""
    table = Table.grid(padding=(0, 2))
    table.add_column(style="bold", no_wrap=True)
    table.add_column()
    for title, bindings in groups:
        rows = [(key_display(b), b.description) for b in bindings if isinstance(b, Binding) and b.description]
        if not rows:
            continue
        if table.row_count:
            table.add_row("", "")
        table.add_row(Text(title, style="bold underline"), "")
        for key, description in rows:
            table.add_row(key, description)
    return table


class HelpScreen(ModalScreen[None]):
    """Lists ``groups`` — (screen title, its bindings) — built by the App from the screen classes,
    so the help never drifts from the real keys; they are laid out in two columns so the whole
    list fits an 80×24 terminal. ``escape``, ``q`` or ``?`` close it."""

    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("escape,q,question_mark", "close", "Close", key_display="esc"),
    ]

    def __init__(self, groups: KeyGroups) -> None:
        super().__init__()
        self.groups = groups

    def compose(self) -> ComposeResult:
        half = (len(self.groups) + 1) // 2
        columns = Table.grid(padding=(0, 4))
        columns.add_row(keys_table(self.groups[:half], self.app.get_key_display),
                        keys_table(self.groups[half:], self.app.get_key_display))
        with VerticalScroll(id="help-box"):
            yield Static(Text("lorad — keys", style="bold"), id="help-title")
            yield Static(columns)
            yield Static("The mouse works too: click a row, a button or a file.", classes="empty-note")
        yield Footer()

    def action_close(self) -> None:
        self.dismiss()
