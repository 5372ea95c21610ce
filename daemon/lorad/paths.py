"""Where lorad keeps its state: ``LORAD_HOME`` or the platform's per-user data folder."""

from __future__ import annotations

import os
from pathlib import Path


def lorad_home() -> Path:
    """The state directory (``$LORAD_HOME``, else e.g. ``~/.local/share/lorad`` on Linux)."""
    env = os.environ.get("LORAD_HOME")
    if env:
        return Path(env).expanduser().resolve()
    import platformdirs

    return Path(platformdirs.user_data_dir("lorad", appauthor=False))


def default_cache_dir() -> Path:
    """Where latents are cached when the config sets no ``cache_dir``."""
    return lorad_home() / "cache"


# The daemon's fixed default TCP port on 127.0.0.1 (clients find it without configuration).
DEFAULT_PORT = 47860


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


def jobs_db_path(home: Path | None = None) -> Path:
    """The SQLite job store."""
    return (home or lorad_home()) / "jobs.sqlite3"
