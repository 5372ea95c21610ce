"""The one-line bar at the top of every screen: "lorad · <where you are>"."""

from __future__ import annotations

from rich.text import Text
from textual.widgets import Static


class TitleBar(Static):
    """A static title line docked to the top of its screen.

    Used instead of Textual's ``Header``: that one re-reads the app and screen titles in a
    callback that fails when its screen is dismissed right after being shown (the daemon-down
    screen is, when the daemon answers at once), and a clock or icon is not needed here.
    """

    DEFAULT_CSS = """
    TitleBar {
        dock: top;
        width: 100%;
        height: 1;
        background: $panel;
        color: $foreground;
        content-align: center middle;
    }
    """

    def __init__(self, where: str) -> None:
        super().__init__(Text.assemble(("lorad", "bold"), f" · {where}"))
