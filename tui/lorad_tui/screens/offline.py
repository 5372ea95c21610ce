"""Shown while no daemon answers: what is wrong and the one command that fixes it."""

from __future__ import annotations

from rich.text import Text
from textual.app import ComposeResult
from textual.containers import Center, Vertical
from textual.screen import Screen
from textual.widgets import Footer, Static

from lorad_tui.widgets.title_bar import TitleBar

HEADLINE = "no lorad daemon running — start one with `lorad serve`"


class OfflineScreen(Screen[None]):
    """The daemon-down screen. The App pushes it when a connection attempt fails and pops it when
    one succeeds; meanwhile it retries every ``retry_seconds`` and updates ``reason`` each time."""

    def __init__(self, reason: str, retry_seconds: float) -> None:
        super().__init__()
        self.reason = reason
        self.retry_seconds = retry_seconds

    def compose(self) -> ComposeResult:
        yield TitleBar("waiting for the daemon")
        with Center(), Vertical(id="offline-box"):
            yield Static(Text(HEADLINE, style="bold"), id="offline-headline")
            yield Static(id="offline-reason")
            yield Static(
                f"Trying again every {self.retry_seconds:g}s: this screen goes away by itself when the daemon answers.",
                id="offline-retry",
            )
        yield Footer()

    def on_mount(self) -> None:
        self.set_reason(self.reason)

    def set_reason(self, reason: str) -> None:
        """Show the latest connection error (it names the address tried and how it was found)."""
        self.reason = reason
        self.query_one("#offline-reason", Static).update(Text(reason))
