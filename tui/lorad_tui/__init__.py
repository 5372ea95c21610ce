"""lorad_tui: the terminal dashboard of the lorad daemon (``lorad tui``).

It talks to the daemon only through ``lorad_client`` (gRPC) and validates configs with the pure
``lorad.config`` parser; it never imports torch or the training engine. ``run()`` starts it.
"""

from __future__ import annotations

from pathlib import Path

from lorad_tui.app import LoradApp

__all__ = ["LoradApp", "run"]


def run(address: str | None = None, home: Path | None = None) -> int:
    """Run the dashboard in this terminal until the user quits; returns the exit code (0)."""
    LoradApp(address=address, home=home).run()
    return 0
