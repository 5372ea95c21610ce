"""The help screen: every key of every screen, read from the screens' own bindings."""

from __future__ import annotations

from collections.abc import Callable
from typing import ClassVar

from rich.console import Group
from rich.table import Table
from rich.text import Text
from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import VerticalScroll
from textual.screen import ModalScreen
from textual.widgets import Footer, Static

KeyGroups = list[tuple[str, list[BindingType]]]


def keys_table(groups: KeyGroups, key_display: Callable[[Binding], str]) -> Group:
    """Key → what it does, one titled group after another (``key_display`` names a key as the footer
    does). The keys line up across groups; a title is its own line, so it never widens the key column."""
    width = max((len(key_display(b)) for _, bindings in groups for b in bindings if isinstance(b, Binding)), default=1)
    parts: list[Text | Table] = []
    for title, bindings in groups:
        rows = [(key_display(b), b.description) for b in bindings if isinstance(b, Binding) and b.description]
        if not rows:
            continue
        if parts:
            parts.append(Text(""))
        parts.append(Text(title, style="bold underline"))
        table = Table.grid(padding=(0, 2))
        table.add_column(style="bold", no_wrap=True, min_width=width)
        table.add_column()
        for key, description in rows:
            table.add_row(key, description)
        parts.append(table)
    return Group(*parts)


def balanced_split(groups: KeyGroups) -> int:
    """Where to split ``groups`` into two columns of about the same number of rows (a group is its
    title, its keys and a blank line)."""
    sizes = [2 + sum(1 for b in bindings if isinstance(b, Binding) and b.description) for _, bindings in groups]
    total, running = sum(sizes), 0
    for index, size in enumerate(sizes):
        if running + size / 2 >= total / 2:
            return max(1, index)
        running += size
    return len(groups)


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
        split = balanced_split(self.groups)
        columns = Table.grid(padding=(0, 4))
        columns.add_row(
            keys_table(self.groups[:split], self.app.get_key_display),
            keys_table(self.groups[split:], self.app.get_key_display),
        )
        box = VerticalScroll(Static(columns), id="help-box")
        # Title and the mouse note sit in the border: every row inside is for keys.
        box.border_title = "lorad — keys"
        box.border_subtitle = "the mouse works too: click a row, a button or a file"
        yield box
        yield Footer()

    def action_close(self) -> None:
        self.dismiss()
