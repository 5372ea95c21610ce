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
