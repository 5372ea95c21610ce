"""Helpers for the TUI tests (no tests here): wait for a condition, read the screen as text, pick a
file in the tree with the keyboard."""

from __future__ import annotations

import io
import time
from collections.abc import Callable
from pathlib import Path

from rich.console import Console
from textual.app import App
from textual.pilot import Pilot
from textual.widgets import DirectoryTree


async def wait_until(pilot: Pilot, predicate: Callable[[], object], what: str, timeout: float = 30.0) -> None:
    """Let the app run until ``predicate()`` is true; fail naming ``what`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(
                f"timed out after {timeout:g}s waiting for {what}\n--- screen ---\n{screen_text(pilot.app)}"
            )
        await pilot.pause(0.05)


def screen_text(app: App[object]) -> str:
    """What the terminal shows now, as plain text (the same cells a user sees, colours dropped)."""
    width, height = app.size
    console = Console(
        width=width,
        height=height,
        file=io.StringIO(),
        force_terminal=True,
        record=True,
        legacy_windows=False,
        color_system="truecolor",
    )
    # The compositor's full frame is exactly what the driver would write to the terminal.
    console.print(app.screen._compositor.render_update(full=True, screen_stack=app._background_screens))
    return console.export_text()


async def pick_in_tree(pilot: Pilot, tree: DirectoryTree, relative: Path) -> None:
    """Select ``relative`` (under the tree's root) with the keyboard, as a user would: move the cursor
    down to each part of the path and press enter (which opens a folder or picks the file)."""
    await wait_until(pilot, lambda: tree.root.data is not None and tree.root.data.loaded, "the tree to load")
    for part in relative.parts:
        for _ in range(200):
            node = tree.cursor_node
            if node is not None and node.data is not None and node.data.path.name == part:
                break
            await pilot.press("down")
        else:
            raise AssertionError(f"{part} not found in the file tree\n{screen_text(pilot.app)}")
        await pilot.press("enter")
        if node.data.path.is_dir():
            # Its entries load in a worker: moving on before they are there would skip past them.
            await wait_until(pilot, lambda opened=node: opened.is_expanded and opened.data.loaded, f"{part}/ to open")
