"""Where lorad keeps its state: ``LORAD_HOME`` or the platform's per-user data folder.

What clients need to find the daemon (home, socket, token, discovery file, default port) is defined
once in :mod:`lorad_client.paths` and re-exported here; the daemon adds its own files.
"""

from __future__ import annotations

from pathlib import Path

from lorad_client.paths import DEFAULT_PORT, discovery_path, lorad_home, socket_path, token_path

__all__ = [
    "DEFAULT_PORT",
    "default_cache_dir",
    "discovery_path",
    "jobs_db_path",
    "lorad_home",
    "socket_path",
    "token_path",
]


def default_cache_dir() -> Path:
    """Where latents are cached when the config sets no ``cache_dir``."""
    return lorad_home() / "cache"


def jobs_db_path(home: Path | None = None) -> Path:
    """The SQLite job store."""
    return (home or lorad_home()) / "jobs.sqlite3"
