"""`lorad serve`: the gRPC server process — listeners, token check, health, reflection, discovery.

Local and private by default: 127.0.0.1 plus a Unix socket (mode 0600) in the state directory.
A non-loopback address requires the token, which is generated on first start into the state
directory (mode 0600); local clients read it from there.
"""

from __future__ import annotations

import hmac
import json
import logging
import os
import secrets
import signal
import threading
import time
from collections.abc import Callable
from concurrent import futures
from dataclasses import dataclass
from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from lorad import __version__
from lorad.atomic import write_text_atomic
from lorad.errors import LoradError
from lorad.paths import discovery_path, token_path
from lorad.server.service import LoradService
from lorad.server.servicers import add_servicers
from lorad.server.settings import DaemonSettings

log = logging.getLogger("lorad.server.daemon")

# RPCs that answer without the token: liveness probes must work for monitoring tools.
OPEN_METHODS = frozenset({"/grpc.health.v1.Health/Check", "/grpc.health.v1.Health/Watch"})
# Each watcher of a job holds a thread for its stream; leave room for many.
MAX_RPC_THREADS = 64


def ensure_token(home: Path) -> str:
    """Read the daemon's token, creating it (mode 0600) on first use."""
    path = token_path(home)
    if path.is_file():
        return path.read_text().strip()
    home.mkdir(parents=True, exist_ok=True)
    token = secrets.token_urlsafe(32)
    old_umask = os.umask(0o177)
    try:
        write_text_atomic(path, token + "\n")
    finally:
        os.umask(old_umask)
    os.chmod(path, 0o600)
    return token


class TokenCheck(grpc.ServerInterceptor):
    """Rejects RPCs whose `authorization` metadata is not `Bearer <token>` with UNAUTHENTICATED."""

    def __init__(self, token: str) -> None:
        self._expected = f"Bearer {token}".encode()

        def deny(request: object, context: grpc.ServicerContext) -> None:
            context.abort(
                grpc.StatusCode.UNAUTHENTICATED,
                "missing or wrong token\nhint: send `authorization: Bearer <token>`; the token is in "
                "the daemon's state directory (`token` file), local lorad clients read it themselves",
            )

        self._deny = grpc.unary_unary_rpc_method_handler(deny)
        self._deny_stream = grpc.unary_stream_rpc_method_handler(deny)

    def intercept_service(self, continuation: Callable, handler_call_details: grpc.HandlerCallDetails):
        if handler_call_details.method in OPEN_METHODS:
            return continuation(handler_call_details)
        metadata = dict(handler_call_details.invocation_metadata or ())
        given = str(metadata.get("authorization", "")).encode()
        if hmac.compare_digest(given, self._expected):
            return continuation(handler_call_details)
        handler = continuation(handler_call_details)
        return self._deny_stream if handler is not None and handler.response_streaming else self._deny


def _live_daemon_pid(home: Path) -> int | None:
    """The pid recorded by another running daemon on this state directory, if it is alive."""
    try:
        pid = int(json.loads(discovery_path(home).read_text())["pid"])
        os.kill(pid, 0)
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return pid if pid != os.getpid() else None


@dataclass
class RunningDaemon:
    """A started daemon: its gRPC server and service; ``stop()`` shuts both down cleanly."""

    server: grpc.Server
    service: LoradService
    settings: DaemonSettings
    addresses: list[str]

    def stop(self, grace: float = 5.0) -> None:
        """Interrupt the running job at a checkpoint (it resumes on the next start) and exit."""
        self.server.stop(grace)
        self.service.stop()
        discovery = discovery_path(self.settings.home)
        try:
            if json.loads(discovery.read_text()).get("pid") == os.getpid():
                discovery.unlink()
        except (OSError, ValueError):
            pass
        if self.settings.unix_socket:
            self.settings.unix_socket.unlink(missing_ok=True)


def start_daemon(settings: DaemonSettings) -> RunningDaemon:
    """Bind every address, start the service and the server, and publish the discovery file.

    Raises LoradError when another daemon owns this state directory or an address is taken.
    """
    settings.home.mkdir(parents=True, exist_ok=True)
    other = _live_daemon_pid(settings.home)
    if other:
        raise LoradError(
            f"a lorad daemon (pid {other}) is already running on {settings.home}",
            "use it (`lorad status`), stop it, or set LORAD_HOME to another folder",
        )
    token = ensure_token(settings.home)
    interceptors = [TokenCheck(token)] if settings.require_token else []
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=MAX_RPC_THREADS, thread_name_prefix="lorad-rpc"),
        interceptors=interceptors,
        maximum_concurrent_rpcs=MAX_RPC_THREADS * 4,
    )
    service = LoradService(settings)
    names = add_servicers(server, service)
    health_servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection([*names, health.SERVICE_NAME, reflection.SERVICE_NAME], server)

    addresses: list[str] = []
    for address in settings.tcp_addresses:
        port = _bind(server, address)
        if port == 0:
            service.store.close()
            raise LoradError(
                f"cannot listen on {address}: the address is in use or not available here",
                "another program (or lorad daemon) holds it; pick one with `lorad serve --listen 127.0.0.1:PORT`",
            )
        addresses.append(f"{address.rpartition(':')[0]}:{port}")  # port 0 asks for any free port
    if settings.unix_socket:
        sock = settings.unix_socket
        sock.unlink(missing_ok=True)  # a stale socket from a daemon that died (no live pid above)
        old_umask = os.umask(0o177)  # the socket is created 0600: only this user may connect
        try:
            bound = _bind(server, f"unix://{sock}")
        finally:
            os.umask(old_umask)
        if bound == 0:
            raise LoradError(f"cannot create the socket {sock}", "check the state directory's permissions")
        addresses.insert(0, f"unix://{sock}")

    service.addresses = addresses
    service.start()
    server.start()
    if settings.unix_socket:
        os.chmod(settings.unix_socket, 0o600)
    for name in ["", *names]:
        health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    write_text_atomic(
        discovery_path(settings.home),
        json.dumps(
            {
                "pid": os.getpid(),
                "addresses": addresses,
                "token_required": settings.require_token,
                "version": __version__,
                "started_at": time.time(),
            },
            indent=2,
        ),
    )
    return RunningDaemon(server=server, service=service, settings=settings, addresses=addresses)


def _bind(server: grpc.Server, address: str) -> int:
    """add_insecure_port, normalising grpc's two ways of failing (0 or RuntimeError) to 0."""
    try:
        return server.add_insecure_port(address)
    except RuntimeError:
        return 0


def serve_forever(settings: DaemonSettings, *, ready: Callable[[RunningDaemon], None] | None = None) -> int:
    """Run until SIGINT/SIGTERM; a running job is checkpointed and resumes on the next start."""
    daemon = start_daemon(settings)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    if ready:
        ready(daemon)
    stop.wait()
    log.info("stopping: checkpointing the running job")
    daemon.stop()
    return 0
