"""The log tail of a job: timed lines that wrap under their own text and re-wrap on resize."""

from __future__ import annotations

from collections.abc import Iterable

from rich.table import Table
from textual.events import Resize
from textual.widgets import RichLog

# Lines kept (and shown by scrolling back); the same bound as the job's view keeps.
MAX_LINES = 500


class JobLog(RichLog):
    """A RichLog of (time, text) lines, wrapped to the widget's width.

    RichLog wraps a line once, when it is written; this one keeps its lines and writes them again
    when its width changes (a wide terminal lays the log out beside the curve), so a line is never
    cut off at the old width.
    """

    def __init__(self, *, id: str | None = None) -> None:
        # min_width: RichLog renders at least 78 columns wide by default, wider than a narrow log.
        super().__init__(id=id, max_lines=MAX_LINES, wrap=True, min_width=20)
        self._entries: list[tuple[str, str]] = []
        self._width = 0

    def add(self, entries: Iterable[tuple[str, str]]) -> None:
        """Append lines: (time since submission, text)."""
        for entry in entries:
            self._entries.append(entry)
            self._write(entry)
        del self._entries[:-MAX_LINES]

    def _write(self, entry: tuple[str, str]) -> None:
        # A grid row per line: a long line wraps under its own text, not under the time.
        row = Table.grid(padding=(0, 1))
        row.add_column(width=7, justify="right", style="dim")
        row.add_column()
        row.add_row(*entry)
        self.write(row, expand=True)

    def on_resize(self, event: Resize) -> None:
        # RichLog's own handler (which writes what came before the size was known) runs as well.
        width = event.size.width
        if width and self._width and width != self._width:
            # After the refresh: by then the content region (what lines wrap to) has its new width.
            self.call_after_refresh(self._rewrap)
        self._width = width or self._width

    def _rewrap(self) -> None:
        self.clear()
        for entry in self._entries:
            self._write(entry)
