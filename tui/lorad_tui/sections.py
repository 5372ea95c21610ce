"""The registry of top-level screens the App opens with one key from anywhere.

Each ``Section`` names the gRPC service it needs; the App asks the daemon's health service which
services it offers when it connects and only enables the sections the daemon can serve. That is
how screens for services still to come (captions: ``lorad.v1.CaptionService``, watched folders:
``lorad.v1.WatchService``) plug in: add the screen module and one ``Section`` line here — no
change to the App. Only screens for services that exist today are registered.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from textual.screen import Screen

from lorad_tui.screens.submit import SubmitScreen


@dataclass(frozen=True)
class Section:
    """A top-level screen: ``key`` opens it, ``title`` labels the key in the footer and help,
    ``service`` is the fully qualified gRPC service it needs, ``make`` builds the screen given the
    folder relative paths resolve against (the TUI's working directory)."""

    name: str
    key: str
    title: str
    description: str
    service: str
    make: Callable[[Path], Screen]


SECTIONS: tuple[Section, ...] = (
    Section(name="submit", key="s", title="Submit", description="pick a YAML config, check it and queue it",
            service="lorad.v1.TrainingService", make=lambda base_dir: SubmitScreen(base_dir)),
)


def section(name: str) -> Section:
    """The registered section called ``name`` (KeyError if none)."""
    for entry in SECTIONS:
        if entry.name == name:
            return entry
    raise KeyError(name)
