"""Where the local daemon keeps its state, for finding it and its token (what ``lorad.paths`` says,
without importing the daemon package or needing platformdirs inside the WebUI's venv)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

# Must equal lorad.paths.DEFAULT_PORT (tests/test_webui_glue.py checks).
DEFAULT_PORT = 47860


def lorad_home() -> Path:
    """``$LORAD_HOME``, else the per-user data folder platformdirs gives lorad (``~/.local/share/lorad``)."""
    env = os.environ.get("LORAD_HOME")
    if env:
        return Path(env).expanduser().resolve()
    try:
        import platformdirs
    except ImportError:
        return _user_data_dir() / "lorad"
    return Path(platformdirs.user_data_dir("lorad", appauthor=False))


def _user_data_dir() -> Path:
    """platformdirs' user data folder, for a venv that lacks platformdirs."""
    if sys.platform == "win32":
        return Path(os.environ.get("LOCALAPPDATA") or Path.home() / "AppData" / "Local")
    if sys.platform == "darwin":
        return Path.home() / "Library" / "Application Support"
    return Path(os.environ.get("XDG_DATA_HOME", "").strip() or Path.home() / ".local" / "share")


def token_path(home: Path | None = None) -> Path:
    """The daemon's access token file."""
    return (home or lorad_home()) / "token"


def discovery_path(home: Path | None = None) -> Path:
    """The JSON file a running daemon writes with its pid and addresses."""
    return (home or lorad_home()) / "daemon.json"
