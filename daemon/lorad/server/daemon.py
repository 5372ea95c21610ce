"""`lorad serve`: the gRPC server process — listeners, token check, health, reflection, discovery.

Local and private by default: 127.0.0.1 plus a Unix socket (mode 0600) in the state directory.
Every listener, loopback included, requires the token: on a shared machine any local user can
reach 127.0.0.1, so loopback is no trust boundary. The token is generated on first start into the
state directory (mode 0600, the folder 0700 when the daemon creates it); clients of the same user
read it from there, and send it only after the daemon proved it knows it (``ProveIdentity``).

Streams (WatchJob, FollowWatches, CaptionImages) hold an RPC thread each while open; at most
``MAX_STREAMS`` run at once (more are refused with RESOURCE_EXHAUSTED), which leaves threads for
unary calls however many streams clients keep open.
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
from collections.abc import Callable, Iterator
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

# RPCs that answer without the token: liveness probes must work for monitoring tools, and clients
# check the daemon's identity before they send the token.
OPEN_METHODS = frozenset(
    {
        "/grpc.health.v1.Health/Check",
        "/grpc.health.v1.Health/Watch",
        "/lorad.v1.SystemService/ProveIdentity",
    }
)
# Each open stream holds a thread; unary calls get the threads streams may not take.
MAX_RPC_THREADS = 256
MAX_STREAMS = 192
# Calls beyond the running ones wait this deep in gRPC's queue before RESOURCE_EXHAUSTED.
MAX_CONCURRENT_RPCS = MAX_RPC_THREADS * 2


def ensure_home(home: Path) -> None:
    """Create the state directory private to this user (0700) if it does not exist yet.

    An existing folder keeps its mode (the user chose it); what lorad puts in it is 0600 anyway.
    """
    old_umask = os.umask(0o077)
    try:
        home.mkdir(parents=True, exist_ok=True)
    finally:
        os.umask(old_umask)


def ensure_token(home: Path) -> str:
    """Read the daemon's token, creating it (mode 0600) on first use; a token file others could
    read is made 0600 again."""
    path = token_path(home)
    if path.is_file():
        if path.stat().st_mode & 0o077:
            os.chmod(path, 0o600)
        token = path.read_text().strip()
        if token:
            return token
    ensure_home(home)
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


class StreamLimit(grpc.ServerInterceptor):
    """Refuses a server stream with RESOURCE_EXHAUSTED while ``limit`` streams are open, so open
    streams can never take every RPC thread and starve unary calls."""

    def __init__(self, limit: int) -> None:
        self._slots = threading.BoundedSemaphore(limit)
        self._limit = limit

    def intercept_service(self, continuation: Callable, handler_call_details: grpc.HandlerCallDetails):
        handler = continuation(handler_call_details)
        if handler is None or not handler.response_streaming or handler.request_streaming:
            return handler
        stream, slots, limit = handler.unary_stream, self._slots, self._limit

        def limited(request: object, context: grpc.ServicerContext) -> Iterator[object]:
            if not slots.acquire(blocking=False):
                context.abort(
                    grpc.StatusCode.RESOURCE_EXHAUSTED,
                    f"the daemon already serves {limit} open streams (WatchJob, FollowWatches, CaptionImages)\n"
                    "hint: close streams you no longer read (end `lorad watch`/TUI sessions), then try again",
                )
            try:
                yield from stream(request, context)
            finally:
                slots.release()

        return grpc.unary_stream_rpc_method_handler(
            limited,
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )


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
    ensure_home(settings.home)
    other = _live_daemon_pid(settings.home)
    if other:
        raise LoradError(
            f"a lorad daemon (pid {other}) is already running on {settings.home}",
            "use it (`lorad status`), stop it, or set LORAD_HOME to another folder",
        )
    token = ensure_token(settings.home)
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=MAX_RPC_THREADS, thread_name_prefix="lorad-rpc"),
        interceptors=[TokenCheck(token), StreamLimit(MAX_STREAMS)],
        # A port belongs to one daemon: with SO_REUSEPORT (gRPC's default) a second daemon binds the
        # same port and the kernel splits connections between the two.
        options=[("grpc.so_reuseport", 0)],
        maximum_concurrent_rpcs=MAX_CONCURRENT_RPCS,
    )
    service = LoradService(settings)
    names = add_servicers(server, service, token=token)
    health_servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection([*names, health.SERVICE_NAME, reflection.SERVICE_NAME], server)

    addresses: list[str] = []
    for address in settings.tcp_addresses:
        port = _bind(server, address)
        if port == 0:
            service.close_stores()
            raise LoradError(
                f"cannot listen on {address}: the port is in use (by another program, or a lorad daemon of "
                "another LORAD_HOME) or the address is not available here",
                "choose another port with `lorad serve --listen 127.0.0.1:PORT` (or $LORAD_ADDRESS); clients "
                "find it by themselves through the state directory",
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
            service.close_stores()
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
                "token_required": True,
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
