"""Daemon settings: where it listens, model keep-alive and memory budget.

Every listener requires the token (see ``lorad.server.daemon``), so nothing here turns it off.
"""

from __future__ import annotations

import ipaddress
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from lorad.errors import LoradError
from lorad.paths import DEFAULT_PORT, lorad_home, socket_path

# The longest keep-alive a daemon or a request may ask for: 30 days.
MAX_KEEP_ALIVE_SECONDS = 30 * 86_400.0
# The most CPU workers a daemon runs (each is a process holding its own models).
MAX_CPU_WORKERS = 64


@dataclass(frozen=True)
class DaemonSettings:
    """How a `lorad serve` process runs. Built by :func:`daemon_settings`."""

    home: Path
    tcp_addresses: tuple[str, ...]  # "host:port" each
    unix_socket: Path | None  # None: no Unix socket
    default_keep_alive: float = 1800.0  # seconds a model stays resident after its last use
    memory_budget_bytes: int | None = None  # per device: resident models beyond this are evicted LRU
    resume_interrupted: bool = True  # re-queue jobs a dead daemon was running
    # Workers on the CPU (besides one per GPU): they train jobs that ask for the CPU, and every job on a
    # machine without a GPU; two or more let CPU jobs run side by side or one job train on several.
    cpu_workers: int = 1
    # Run jobs in threads of the daemon process instead of worker processes (no crash isolation; one device
    # per job): for debugging with a debugger or profiler attached to one process.
    in_process: bool = False
    # Start every worker when the daemon starts (`lorad serve`), rather than with its first job.
    start_workers: bool = False
    log_level: int = 20  # logging.INFO, for the workers' own logs

    @property
    def grpc_targets(self) -> list[str]:
        """Addresses as gRPC client targets, the Unix socket first (clients prefer it)."""
        targets = [f"unix://{self.unix_socket}"] if self.unix_socket else []
        return targets + list(self.tcp_addresses)


def split_host_port(address: str) -> tuple[str, int]:
    """ "127.0.0.1:47860" / "[::1]:47860" / "localhost:1" → (host, port); a bad address is a LoradError."""
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit() or not host or int(port) > 65535:
        raise LoradError(
            f"`--listen`: {address!r} is not HOST:PORT",
            "use e.g. 127.0.0.1:47860, [::1]:47860, 0.0.0.0:47860 or unix:/path/lorad.sock",
        )
    return host.strip("[]"), int(port)


def is_loopback(host: str) -> bool:
    """True for localhost and loopback IPs (127.0.0.0/8, ::1)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a host name: it may resolve to anything, so treat it as remote


def daemon_settings(
    listen: Sequence[str] = (),
    *,
    home: Path | None = None,
    default_keep_alive: float = 1800.0,
    memory_budget_gb: float | None = None,
    resume_interrupted: bool = True,
    cpu_workers: int = 1,
    in_process: bool = False,
    start_workers: bool = False,
    log_level: int = 20,
) -> DaemonSettings:
    """Settings from CLI options and the environment.

    ``listen`` (or ``LORAD_ADDRESS``, comma-separated) replaces the default 127.0.0.1 port; an
    entry ``unix:/path`` sets the socket. Without any, the daemon listens on 127.0.0.1 and the
    state directory's socket. A keep-alive or budget that is negative, NaN or infinite is a LoradError.
    """
    if not (math.isfinite(default_keep_alive) and 0 <= default_keep_alive <= MAX_KEEP_ALIVE_SECONDS):
        raise LoradError(
            f"`--keep-alive`: got {default_keep_alive!r}",
            f"use seconds from 0 to {MAX_KEEP_ALIVE_SECONDS:g} (30 days)",
        )
    if memory_budget_gb is not None and not (math.isfinite(memory_budget_gb) and 0 < memory_budget_gb <= 1e6):
        raise LoradError(f"`--memory-budget`: got {memory_budget_gb!r}", "use a positive number of GB, e.g. 24")
    if not 0 <= cpu_workers <= MAX_CPU_WORKERS:
        raise LoradError(f"`--cpu-workers`: got {cpu_workers!r}", f"use 0 to {MAX_CPU_WORKERS}")
    home = home or lorad_home()
    entries = list(listen) or [a.strip() for a in os.environ.get("LORAD_ADDRESS", "").split(",") if a.strip()]
    tcp: list[str] = []
    unix: Path | None = socket_path(home)
    if entries:
        unix = None
        for entry in entries:
            if entry.startswith("unix:"):
                unix = Path(entry.removeprefix("unix:").removeprefix("//")).expanduser().resolve()
            else:
                host, port = split_host_port(entry)
                tcp.append(f"[{host}]:{port}" if ":" in host else f"{host}:{port}")
    else:
        tcp.append(f"127.0.0.1:{DEFAULT_PORT}")
    budget = int(memory_budget_gb * 1024**3) if memory_budget_gb else None
    return DaemonSettings(
        home=home,
        tcp_addresses=tuple(tcp),
        unix_socket=unix,
        default_keep_alive=default_keep_alive,
        memory_budget_bytes=budget,
        resume_interrupted=resume_interrupted,
        cpu_workers=cpu_workers,
        in_process=in_process,
        start_workers=start_workers,
        log_level=log_level,
    )
