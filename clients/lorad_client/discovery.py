"""Finding the local lorad daemon: its gRPC address and access token, without any configuration.

Address, first match wins:

1. the ``address`` argument;
2. ``$LORAD_ADDRESS``;
3. the running daemon's discovery file (``lorad_client.paths.discovery_path(home)``, JSON with ``pid`` and
   ``addresses``), ignored when its pid is not alive; a ``unix:`` address whose socket exists is
   preferred over TCP;
4. nothing: ``target`` is empty, and ``source`` says no daemon runs for this home. There is no
   fallback to the default port: whatever listens there may be another home's daemon, or another
   user's program waiting for a token.

Token: ``$LORAD_TOKEN``, else the token file (``lorad_client.paths.token_path(home)``) if readable, else None.
Home: the ``home`` argument, else ``$LORAD_HOME``, else the platform default (``lorad_client.paths.lorad_home``).

Whatever the address, clients send the token only to a server that proves it knows it
(``lorad_client.identity.verify_daemon``).

Addresses are gRPC target strings. For convenience a bare absolute path is taken as a Unix socket
(``/x/lorad.sock`` → ``unix:///x/lorad.sock``) and a bare port number as ``127.0.0.1:<port>``.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lorad_client.paths import DEFAULT_PORT, discovery_path, lorad_home, token_path

ADDRESS_ENV = "LORAD_ADDRESS"
TOKEN_ENV = "LORAD_TOKEN"


@dataclass(frozen=True)
class DaemonTarget:
    """Where to reach the daemon.

    ``target`` is a gRPC target string ("unix:///abs/lorad.sock", "127.0.0.1:47860"), or "" when no
    daemon runs for the home; ``token`` the bearer token to send (once the server proved it knows
    it), or None; ``source`` says how the address was found, or why there is none (for messages).
    """

    target: str
    token: str | None
    source: str


def normalize_address(address: str) -> str:
    """A gRPC target for ``address``: absolute paths become ``unix://`` targets, bare ports loopback TCP."""
    address = address.strip()
    if address.isdigit():
        return f"127.0.0.1:{address}"
    if os.path.isabs(address) and not address.startswith("unix:"):
        return f"unix://{Path(address).as_posix()}"
    return address


def resolve_home(home: Path | str | None = None) -> Path:
    """The daemon's state directory: ``home``, else ``$LORAD_HOME``, else the platform default."""
    # lorad_home() itself honours $LORAD_HOME before the platform default.
    return Path(home).expanduser() if home is not None else lorad_home()


def find_daemon(home: Path | None = None, address: str | None = None) -> DaemonTarget:
    """Where the daemon listens and which token to send (see the module docstring for the order).

    Never raises for a missing or malformed discovery/token file: it falls back to the next source.
    Does not check that anything listens at the address (``LoradClient.connect`` does).
    """
    home_dir = resolve_home(home)
    token = read_token(home_dir)
    if address:
        return DaemonTarget(normalize_address(address), token, "the address argument")
    env_address = os.environ.get(ADDRESS_ENV, "").strip()
    if env_address:
        return DaemonTarget(normalize_address(env_address), token, f"${ADDRESS_ENV}")
    found = _from_discovery_file(discovery_path(home_dir))
    if found is not None:
        return DaemonTarget(found[0], token, found[1])
    return DaemonTarget("", token, no_daemon_message(home_dir))


def no_daemon_message(home: Path) -> str:
    """Why there is no address for ``home``: no live daemon wrote its discovery file."""
    return (
        f"no lorad daemon is running for LORAD_HOME={home} ({discovery_path(home).name} there is missing or names "
        f"a process that has ended); start one with `lorad serve`, or name a daemon's address with `--address` "
        f"or ${ADDRESS_ENV} (a daemon on port {DEFAULT_PORT} of another LORAD_HOME is not used by itself)"
    )


def read_token(home: Path) -> str | None:
    """``$LORAD_TOKEN``, else the stripped contents of the token file in ``home``, else None."""
    env_token = os.environ.get(TOKEN_ENV, "").strip()
    if env_token:
        return env_token
    try:
        token = token_path(home).read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError):
        return None
    return token or None


def pid_alive(pid: int) -> bool:
    """True when a process with this pid exists (it may belong to another user)."""
    if pid <= 0:
        return False
    if os.name == "nt":
        # On Windows os.kill(pid, 0) sends CTRL_C_EVENT (signal 0) or terminates the process:
        # never probe that way. A stale file there just costs one failed connection attempt.
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    except OSError:
        return False
    return True


def _from_discovery_file(path: Path) -> tuple[str, str] | None:
    """(target, source) from a live daemon's discovery file, or None if absent, stale or malformed."""
    try:
        info: Any = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        return None
    if not isinstance(info, dict):
        return None
    pid, addresses = info.get("pid"), info.get("addresses")
    if not isinstance(pid, int) or not pid_alive(pid):
        return None
    if not isinstance(addresses, list):
        return None
    candidates = [a.strip() for a in addresses if isinstance(a, str) and a.strip()]
    target = _pick_address(candidates)
    if target is None:
        return None
    return target, f"{path} (pid {pid})"


def _pick_address(addresses: list[str]) -> str | None:
    """A Unix socket whose file exists (no TCP stack, file-permission protected), else the first TCP one."""
    unix = [a for a in addresses if a.startswith("unix:")]
    tcp = [a for a in addresses if not a.startswith("unix:")]
    for address in unix:
        if _unix_socket_path(address).exists():
            return address
    if tcp:
        return tcp[0]
    return unix[0] if unix else None


def _unix_socket_path(address: str) -> Path:
    """The filesystem path of a gRPC ``unix:`` target (``unix:///abs``, ``unix:/abs`` or ``unix:rel``)."""
    rest = address[len("unix:") :]
    if rest.startswith("//"):
        rest = rest[2:]  # unix://<abs path>: the authority part is empty
    return Path(rest)
