"""Nobody else in: another local Unix user cannot use the daemon, and clients never hand the token to
a server that has not proved it is their daemon.

The other user is real: a system account made with ``useradd`` (CI runs as root), and a client
process that drops to it with setuid/setgid before it touches the daemon. Its Python modules are
imported first (the interpreter may live in a folder only root can read), so every access check it
makes runs with the other user's credentials. Without root or ``useradd`` these tests skip, saying so.
"""

from __future__ import annotations

import json
import os
import pwd
import shutil
import socket
import stat
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from lorad.errors import LoradError
from lorad.paths import DEFAULT_PORT, discovery_path, jobs_db_path, token_path
from lorad.server.daemon import RunningDaemon, ensure_token, start_daemon
from lorad.server.settings import daemon_settings
from lorad_api.v1 import system_pb2, system_pb2_grpc
from lorad_client import DaemonNotVerified, DaemonUnavailable, LoradClient
from tests.support.daemons import run_daemon

PROBE_USER = "lorad-probe"
REPO = Path(__file__).resolve().parents[1]

# Imported while still root, then the process becomes the other user for good.
_PRELUDE = """
import json, os, sys, threading, time
from concurrent.futures import ThreadPoolExecutor
import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from lorad_api.v1 import system_pb2, system_pb2_grpc, training_pb2, training_pb2_grpc, watch_pb2, watch_pb2_grpc
from lorad_client import DaemonUnavailable, LoradClient, LoradRpcError
import lorad_client.identity, lorad_client.discovery
grpc.insecure_channel("127.0.0.1:1").close()  # load grpc's lazily imported modules now
uid, gid = int(os.environ["PROBE_UID"]), int(os.environ["PROBE_GID"])
os.setgroups([])
os.setgid(gid)
os.setuid(uid)
assert (os.getuid(), os.geteuid(), os.getgid()) == (uid, uid, gid)

def code_of(call):
    try:
        call()
    except grpc.RpcError as err:
        return err.code().name
    except LoradRpcError as err:
        return err.code.name
    except OSError as err:
        return type(err).__name__
    return "OK"
"""


@pytest.fixture(scope="session")
def other_user() -> tuple[int, int]:
    """(uid, gid) of a second, unprivileged local user; skips where one cannot be made."""
    if os.name != "posix" or os.geteuid() != 0:
        pytest.skip("needs root to create a second Unix user and switch to it (CI runs as root)")
    try:
        entry = pwd.getpwnam(PROBE_USER)
    except KeyError:
        if shutil.which("useradd") is None:
            pytest.skip("useradd is not installed: cannot create a second Unix user")
        made = subprocess.run(
            ["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", PROBE_USER],
            capture_output=True,
            text=True,
            check=False,
        )
        try:
            entry = pwd.getpwnam(PROBE_USER)  # another test worker may have made it meanwhile
        except KeyError:
            pytest.skip(f"useradd {PROBE_USER} failed: {made.stderr.strip() or made.returncode}")
    assert entry.pw_uid != 0
    return entry.pw_uid, entry.pw_gid


def run_as(user: tuple[int, int], code: str, *, timeout: float = 60) -> dict:
    """Run ``code`` in a new Python process as ``user``; it prints one JSON object, returned here."""
    env = os.environ | {"PROBE_UID": str(user[0]), "PROBE_GID": str(user[1]), "PYTHONDONTWRITEBYTECODE": "1"}
    env.pop("LORAD_TOKEN", None)
    result = subprocess.run(
        [sys.executable, "-c", _PRELUDE + textwrap.dedent(code)],
        capture_output=True,
        text=True,
        env=env,
        cwd="/",
        timeout=timeout,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.fixture
def private_daemon(short_dir: Path) -> Iterator[RunningDaemon]:
    # The daemon's folder may be entered by anyone: only the socket's own mode keeps others out.
    os.chmod(short_dir, 0o711)
    running = run_daemon(short_dir)
    yield running
    running.stop(grace=0)


def test_another_user_gets_unauthenticated_on_tcp(other_user: tuple[int, int], private_daemon: RunningDaemon) -> None:
    tcp = private_daemon.addresses[1]
    home = private_daemon.settings.home
    found = run_as(
        other_user,
        f"""
        channel = grpc.insecure_channel({tcp!r})
        system = system_pb2_grpc.SystemServiceStub(channel)
        training = training_pb2_grpc.TrainingServiceStub(channel)
        watch = watch_pb2_grpc.WatchServiceStub(channel)
        guessed = (("authorization", "Bearer " + "A" * 43),)
        out = {{
            "status": code_of(lambda: system.GetStatus(system_pb2.GetStatusRequest(), timeout=10)),
            "status_guessed_token": code_of(
                lambda: system.GetStatus(system_pb2.GetStatusRequest(), metadata=guessed, timeout=10)
            ),
            "list_jobs": code_of(lambda: training.ListJobs(training_pb2.ListJobsRequest(), timeout=10)),
            "submit": code_of(
                lambda: training.SubmitTraining(
                    training_pb2.SubmitTrainingRequest(config_yaml="x: 1", base_dir="/tmp"), timeout=10
                )
            ),
            "add_watch": code_of(
                lambda: watch.AddWatch(watch_pb2.AddWatchRequest(folder="/tmp", config_path="/etc/passwd"), timeout=10)
            ),
            "watch_job": code_of(
                lambda: list(training.WatchJob(training_pb2.WatchJobRequest(job_id="x"), timeout=10))
            ),
            "health": code_of(
                lambda: health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
            ),
            "read_token": code_of(lambda: open({str(home / "token")!r}).read()),
            "read_discovery": code_of(lambda: open({str(home / "daemon.json")!r}).read()),
        }}
        client = LoradClient.connect({tcp!r}, home={str(home)!r}, timeout=10)
        out["client_status"] = code_of(client.status)
        client.close()
        print(json.dumps(out))
        """,
    )
    assert found == {
        "status": "UNAUTHENTICATED",
        "status_guessed_token": "UNAUTHENTICATED",
        "list_jobs": "UNAUTHENTICATED",
        "submit": "UNAUTHENTICATED",
        "add_watch": "UNAUTHENTICATED",
        "watch_job": "UNAUTHENTICATED",
        "health": "OK",  # liveness probes need no token
        "read_token": "PermissionError",
        "read_discovery": "PermissionError",
        "client_status": "UNAUTHENTICATED",
    }
    # The owner's own client, reading the token file, is let in on the same TCP address.
    with LoradClient.connect(tcp, home=home) as owner:
        assert owner.status().token_required


def test_another_user_is_refused_on_the_socket(other_user: tuple[int, int], private_daemon: RunningDaemon) -> None:
    sock = private_daemon.settings.unix_socket
    assert sock is not None and stat.S_IMODE(sock.stat().st_mode) == 0o600
    found = run_as(
        other_user,
        f"""
        channel = grpc.insecure_channel("unix://{sock}")
        system = system_pb2_grpc.SystemServiceStub(channel)
        token = (("authorization", "Bearer " + "A" * 43),)
        print(json.dumps({{
            "status": code_of(lambda: system.GetStatus(system_pb2.GetStatusRequest(), metadata=token, timeout=10)),
            "prove": code_of(
                lambda: system.ProveIdentity(system_pb2.ProveIdentityRequest(challenge=b"x" * 32), timeout=10)
            ),
            "health": code_of(
                lambda: health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
            ),
        }}))
        """,
    )
    assert found == {"status": "UNAVAILABLE", "prove": "UNAVAILABLE", "health": "UNAVAILABLE"}


_FAKE_SERVER = """
seen = []
lock = threading.Lock()

class Record(grpc.GenericRpcHandler):
    def service(self, details):
        with lock:
            seen.append({"method": details.method, "metadata": [list(m) for m in details.invocation_metadata]})
        def answer(request, context):
            context.abort(grpc.StatusCode.UNIMPLEMENTED, "fake")
        return grpc.unary_unary_rpc_method_handler(answer)

server = grpc.server(ThreadPoolExecutor(4), handlers=[Record()])
port = server.add_insecure_port("127.0.0.1:" + os.environ["FAKE_PORT"])
if port == 0:
    print(json.dumps({"bound": False}), flush=True)
    sys.exit(0)
server.start()
print(json.dumps({"bound": True}), flush=True)
sys.stdin.readline()  # until the test is done
server.stop(0)
with lock:
    print(json.dumps({"seen": seen}), flush=True)
"""


def _start_fake(user: tuple[int, int], port: int) -> subprocess.Popen:
    env = os.environ | {"PROBE_UID": str(user[0]), "PROBE_GID": str(user[1]), "FAKE_PORT": str(port)}
    fake = subprocess.Popen(
        [sys.executable, "-c", _PRELUDE + _FAKE_SERVER],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        cwd="/",
    )
    assert fake.stdout is not None
    line = fake.stdout.readline()
    assert line, fake.communicate()[1]
    if not json.loads(line).get("bound"):
        fake.kill()
        fake.wait()
        pytest.skip(f"port {port} is in use on this machine: the fake listener cannot take it")
    return fake


def _stop_fake(fake: subprocess.Popen) -> list[dict]:
    out, err = fake.communicate("\n", timeout=30)
    assert fake.returncode == 0, err
    return json.loads(out.strip().splitlines()[-1])["seen"]


def test_a_fake_listener_on_the_default_port_receives_no_token(
    other_user: tuple[int, int], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    home = tmp_path / "home"
    token = ensure_token(home)  # a daemon ran here once; none runs now
    monkeypatch.delenv("LORAD_ADDRESS", raising=False)
    monkeypatch.delenv("LORAD_TOKEN", raising=False)
    fake = _start_fake(other_user, DEFAULT_PORT)
    try:
        with pytest.raises(DaemonUnavailable) as info:
            LoradClient.connect(home=home, timeout=2)
        assert f"no lorad daemon is running for LORAD_HOME={home}" in str(info.value)
        cli = subprocess.run(
            [sys.executable, "-m", "lorad.cli", "jobs"],
            capture_output=True,
            text=True,
            env=os.environ | {"LORAD_HOME": str(home)},
            timeout=120,
            check=False,
        )
        assert cli.returncode != 0 and "no lorad daemon is running" in cli.stderr
    finally:
        seen = _stop_fake(fake)
    assert not any(token in json.dumps(call) for call in seen), seen
    assert seen == []  # nothing was even asked: no discovery file, no fallback to the default port


def test_a_fake_listener_named_as_the_address_receives_no_token(
    other_user: tuple[int, int], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    home = tmp_path / "home"
    token = ensure_token(home)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    monkeypatch.setenv("LORAD_ADDRESS", f"127.0.0.1:{port}")
    fake = _start_fake(other_user, port)
    try:
        with pytest.raises(DaemonNotVerified) as info:
            LoradClient.connect(home=home, timeout=5)
        assert "the token was not sent" in str(info.value)
        sys.path.insert(0, str(REPO / "clients" / "sd-webui-lorad"))
        from lorad_webui.connection import Daemon, DaemonError

        with Daemon.connect(home=home) as webui, pytest.raises(DaemonError) as webui_err:
            webui.version()
        assert "the token was not sent" in str(webui_err.value)
    finally:
        seen = _stop_fake(fake)
    assert [call["method"] for call in seen] == ["/lorad.v1.SystemService/ProveIdentity"] * 2
    assert not any(token in json.dumps(call) for call in seen), seen


def test_a_port_belongs_to_one_daemon(daemon: RunningDaemon, tmp_path: Path) -> None:
    port = daemon.addresses[1].rpartition(":")[2]
    second = daemon_settings([f"127.0.0.1:{port}"], home=tmp_path / "second-home")
    with pytest.raises(LoradError) as info:
        start_daemon(second)
    assert f"cannot listen on 127.0.0.1:{port}: the port is in use" in str(info.value)
    assert "--listen 127.0.0.1:PORT" in info.value.hint
    assert not discovery_path(tmp_path / "second-home").exists()
    # Every call still reaches the first daemon (with SO_REUSEPORT the kernel would split them).
    with LoradClient.connect(daemon.addresses[1], home=daemon.settings.home) as client:
        pids = {client.status().pid for _ in range(20)}
    assert pids == {os.getpid()}


def test_the_state_files_are_private(tmp_path: Path) -> None:
    home = tmp_path / "fresh-home"
    running = start_daemon(daemon_settings(["127.0.0.1:0", f"unix:{tmp_path}/s.sock"], home=home))
    try:
        assert stat.S_IMODE(home.stat().st_mode) == 0o700
        for path in (token_path(home), discovery_path(home), jobs_db_path(home), tmp_path / "s.sock"):
            assert stat.S_IMODE(path.stat().st_mode) == 0o600, path
    finally:
        running.stop(grace=0)
    token_path(home).chmod(0o644)  # loosened by hand: the next start makes it private again
    assert ensure_token(home) and stat.S_IMODE(token_path(home).stat().st_mode) == 0o600


def test_prove_identity_needs_a_real_challenge(daemon: RunningDaemon) -> None:
    with grpc.insecure_channel(daemon.addresses[1]) as channel:
        stub = system_pb2_grpc.SystemServiceStub(channel)
        for size in (0, 8, 65):
            with pytest.raises(grpc.RpcError) as err:
                stub.ProveIdentity(system_pb2.ProveIdentityRequest(challenge=b"x" * size), timeout=10)
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        start = time.monotonic()
        proof = stub.ProveIdentity(system_pb2.ProveIdentityRequest(challenge=b"y" * 32), timeout=10).proof
        assert len(proof) == 32 and time.monotonic() - start < 5
