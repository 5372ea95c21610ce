"""Where a local lorad daemon keeps what clients need to find it: ``LORAD_HOME`` (or the platform's
per-user data folder), its Unix socket, token and discovery file, and the default TCP port.

The daemon uses these same functions (``lorad.paths`` re-exports them), so client and daemon cannot
disagree. Only the standard library is needed: platformdirs is used when installed, and the same
folder is computed by hand where it is not (the AUTOMATIC1111 venv, which gets this module vendored).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

# The daemon's fixed default TCP port on 127.0.0.1 (clients find it without configuration).
DEFAULT_PORT = 47860


def lorad_home() -> Path:
    """The state directory (``$LORAD_HOME``, else e.g. ``~/.local/share/lorad`` on Linux)."""
    env = os.environ.get("LORAD_HOME")
    if env:
        return Path(env).expanduser().resolve()
    try:
        import platformdirs
    except ImportError:
        return _user_data_dir() / "lorad"
    return Path(platformdirs.user_data_dir("lorad", appauthor=False))


def _user_data_dir() -> Path:
    """platformdirs' user data folder, for an environment without platformdirs."""
    if sys.platform == "win32":
        return Path(os.environ.get("LOCALAPPDATA") or Path.home() / "AppData" / "Local")
    if sys.platform == "darwin":
        return Path.home() / "Library" / "Application Support"
    return Path(os.environ.get("XDG_DATA_HOME", "").strip() or Path.home() / ".local" / "share")


def socket_path(home: Path | None = None) -> Path:
    """The daemon's Unix socket (mode 0600) in the state directory."""
    return (home or lorad_home()) / "lorad.sock"


def token_path(home: Path | None = None) -> Path:
    """The access token file (mode 0600), made on the daemon's first start."""
    return (home or lorad_home()) / "token"


def discovery_path(home: Path | None = None) -> Path:
    """JSON written by a running daemon: {"pid", "addresses", "token_required", "version",
    "started_at"}; removed on a clean stop. Clients read it to find the daemon."""
    return (home or lorad_home()) / "daemon.json"
