"""The registry of top-level screens the App opens with one key from anywhere.

Each ``Section`` names the gRPC service it needs; the App asks the daemon's health service which
services it offers when it connects and only enables the sections the daemon can serve. That is
how screens for optional services plug in (captions: ``lorad.v1.CaptionService``, watched folders:
``lorad.v1.WatchService``, hidden on a daemon that does not serve it): add the screen module and one
``Section`` line here. Such screens make their own calls (``lorad_tui.section_calls``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from textual.screen import Screen

from lorad_tui.screens.captions import CaptionsScreen
from lorad_tui.screens.submit import SubmitScreen
from lorad_tui.screens.watches import WatchesScreen
from lorad_tui.state import DaemonView

CAPTION_SERVICE = "lorad.v1.CaptionService"
WATCH_SERVICE = "lorad.v1.WatchService"


@dataclass(frozen=True)
class Section:
    """A top-level screen: ``key`` opens it, ``title`` labels the key in the footer and help,
    ``service`` is the fully qualified gRPC service it needs, ``make`` builds the screen given the
    folder relative paths resolve against (the TUI's working directory) and the App's DaemonView."""

    name: str
    key: str
    title: str
    description: str
    service: str
    make: Callable[[Path, DaemonView], Screen]


SECTIONS: tuple[Section, ...] = (
    Section(
        name="submit",
        key="s",
        title="Submit",
        description="pick a YAML config, check it and queue it",
        service="lorad.v1.TrainingService",
        make=lambda base_dir, view: SubmitScreen(base_dir),
    ),
    Section(
        name="captions",
        key="t",
        title="Captions",
        description="caption a folder, then review and edit its captions",
        service=CAPTION_SERVICE,
        make=lambda base_dir, view: CaptionsScreen(base_dir),
    ),
    Section(
        name="watches",
        key="w",
        title="Watches",
        description="watch folders that train themselves",
        service=WATCH_SERVICE,
        make=lambda base_dir, view: WatchesScreen(base_dir, view),
    ),
)


def section(name: str) -> Section:
    """The registered section called ``name`` (KeyError if none)."""
    for entry in SECTIONS:
        if entry.name == name:
            return entry
    raise KeyError(name)
