"""lorad_client: finding the daemon, staying light, describing events, and talking gRPC."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path

import grpc
import pytest

from lorad.paths import DEFAULT_PORT, discovery_path, token_path
from lorad_api.v1 import jobs_pb2, system_pb2, system_pb2_grpc, training_pb2, training_pb2_grpc
from lorad_client import DaemonTarget, DaemonUnavailable, LoradClient, LoradRpcError, find_daemon
from lorad_client.errors import DaemonNotVerified
from lorad_client.format import describe_event, format_bytes, format_duration, job_state_name
from lorad_client.identity import identity_proof


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    # The developer's own daemon settings must not leak into these tests.
    monkeypatch.delenv("LORAD_ADDRESS", raising=False)
    monkeypatch.delenv("LORAD_TOKEN", raising=False)


def _write_discovery(home: Path, pid: int, addresses: list[str]) -> None:
    home.mkdir(parents=True, exist_ok=True)
    info = {"pid": pid, "addresses": addresses, "token_required": True, "version": "0.1.0", "started_at": 0}
    discovery_path(home).write_text(json.dumps(info))


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --- discovery -----------------------------------------------------------------------------------


def test_no_address_when_no_daemon_runs_for_the_home(tmp_path: Path) -> None:
    # No fallback to the default port: whatever listens there is not known to be this home's daemon.
    found = find_daemon(home=tmp_path)
    assert found.target == ""
    assert found.token is None
    assert f"no lorad daemon is running for LORAD_HOME={tmp_path}" in found.source
    assert "lorad serve" in found.source and str(DEFAULT_PORT) in found.source


def test_connect_says_no_daemon_runs_for_the_home(tmp_path: Path) -> None:
    token_path(tmp_path).write_text("a-token\n")
    with pytest.raises(DaemonUnavailable) as info:
        LoradClient.connect(home=tmp_path, timeout=0.5)
    assert f"LORAD_HOME={tmp_path}" in str(info.value) and "lorad serve" in str(info.value)


def test_precedence_explicit_then_env_then_discovery_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _write_discovery(tmp_path, os.getpid(), ["127.0.0.1:5001"])
    assert find_daemon(home=tmp_path).target == "127.0.0.1:5001"
    assert str(discovery_path(tmp_path)) in find_daemon(home=tmp_path).source

    monkeypatch.setenv("LORAD_ADDRESS", "127.0.0.1:5002")
    assert find_daemon(home=tmp_path).target == "127.0.0.1:5002"
    assert find_daemon(home=tmp_path).source == "$LORAD_ADDRESS"

    found = find_daemon(home=tmp_path, address="127.0.0.1:5003")
    assert (found.target, found.source) == ("127.0.0.1:5003", "the address argument")


def test_home_defaults_to_lorad_home_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LORAD_HOME", str(tmp_path))
    _write_discovery(tmp_path, os.getpid(), ["127.0.0.1:5004"])
    assert find_daemon().target == "127.0.0.1:5004"


def test_dead_daemons_discovery_file_is_ignored(tmp_path: Path) -> None:
    _write_discovery(tmp_path, _dead_pid(), ["127.0.0.1:5001"])
    assert find_daemon(home=tmp_path).target == ""


def test_malformed_discovery_file_is_ignored(tmp_path: Path) -> None:
    discovery_path(tmp_path).write_text("{not json")
    assert find_daemon(home=tmp_path).target == ""


def test_unix_address_preferred_when_its_socket_exists(tmp_path: Path) -> None:
    sock = tmp_path / "lorad.sock"
    _write_discovery(tmp_path, os.getpid(), ["127.0.0.1:5001", f"unix://{sock}"])
    # No socket file yet (e.g. another machine's home): fall back to TCP.
    assert find_daemon(home=tmp_path).target == "127.0.0.1:5001"
    sock.touch()
    assert find_daemon(home=tmp_path).target == f"unix://{sock}"


def test_address_shorthands(tmp_path: Path) -> None:
    assert find_daemon(home=tmp_path, address="/run/x/lorad.sock").target == "unix:///run/x/lorad.sock"
    assert find_daemon(home=tmp_path, address="5005").target == "127.0.0.1:5005"


def test_token_from_env_then_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    token_path(tmp_path).write_text("file-token\n")
    assert find_daemon(home=tmp_path).token == "file-token"
    monkeypatch.setenv("LORAD_TOKEN", "env-token")
    assert find_daemon(home=tmp_path).token == "env-token"


def test_unreadable_or_empty_token_file_means_no_token(tmp_path: Path) -> None:
    token_path(tmp_path).mkdir()  # reading a directory fails like an unreadable file
    assert find_daemon(home=tmp_path).token is None
    token_path(tmp_path).rmdir()
    token_path(tmp_path).write_text("  \n")
    assert find_daemon(home=tmp_path).token is None


# --- staying light -------------------------------------------------------------------------------


def test_import_does_not_load_ml_libraries() -> None:
    code = (
        "import sys, lorad_client, lorad_client.format\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'diffusers', 'transformers')))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]", f"import lorad_client loaded {result.stdout.strip()}"


# --- text helpers --------------------------------------------------------------------------------


def test_describe_event_covers_every_kind() -> None:
    kinds = jobs_pb2.JobEvent.DESCRIPTOR.oneofs_by_name["kind"].fields
    assert len(kinds) >= 13
    for field in kinds:
        event = jobs_pb2.JobEvent(job_id="j", seq=1)
        getattr(event, field.name).SetInParent()
        text = describe_event(event)
        if field.name == "step":
            assert text is None
        else:
            # A kind describe_event does not know gives None: add a describer in lorad_client/format.py.
            assert isinstance(text, str), f"describe_event has no text for JobEvent.{field.name}"


def test_describe_event_examples() -> None:
    loaded = jobs_pb2.JobEvent(model_loaded=jobs_pb2.ModelLoaded(source="/x", model_version="sd1", resident=True))
    assert describe_event(loaded) == "model loaded: /x (sd1, already resident)"
    saved = jobs_pb2.JobEvent(checkpoint_saved=jobs_pb2.CheckpointSaved(step=100, path="/out/step-100"))
    assert describe_event(saved) == "checkpoint saved at step 100: /out/step-100"
    failed = jobs_pb2.JobEvent(failed=jobs_pb2.JobFailed(error="out of memory", hint="lower batch_size"))
    assert describe_event(failed) == "failed: out of memory\n  hint: lower batch_size"
    assert describe_event(jobs_pb2.JobEvent()) is None


def test_format_helpers() -> None:
    assert job_state_name(jobs_pb2.JOB_STATE_QUEUED) == "queued"
    assert job_state_name(jobs_pb2.JOB_STATE_INTERRUPTED) == "interrupted"
    assert job_state_name(99) == "unknown(99)"
    assert [format_duration(s) for s in (12, 185, 3720, 93600)] == ["12s", "3m05s", "1h02m", "1d02h"]
    assert format_duration(float("inf")) == "?"
    assert [format_bytes(n) for n in (512, 1536, 3 * 1024**3)] == ["512 B", "1.5 KiB", "3.0 GiB"]


# --- talking to a daemon -------------------------------------------------------------------------


def test_connect_with_nothing_listening_raises_daemon_unavailable() -> None:
    port = _free_port()
    start = time.monotonic()
    with pytest.raises(DaemonUnavailable) as info:
        LoradClient.connect(f"127.0.0.1:{port}", timeout=0.5)
    assert time.monotonic() - start < 5
    message = str(info.value)
    assert f"127.0.0.1:{port}" in message
    assert "the address argument" in message
    assert "lorad serve" in message
    assert info.value.code == grpc.StatusCode.UNAVAILABLE


class _System(system_pb2_grpc.SystemServiceServicer):
    """A stand-in daemon that knows ``token`` (None: it cannot prove anything, like a stranger's server)."""

    def __init__(self, token: str | None = "s3cret") -> None:
        self.metadata: list[dict[str, str]] = []
        self.token = token

    def GetStatus(self, request: system_pb2.GetStatusRequest, context: grpc.ServicerContext):
        self.metadata.append(dict(context.invocation_metadata()))
        return system_pb2.GetStatusResponse(version="9.9.9", queue_length=2)

    def ProveIdentity(self, request: system_pb2.ProveIdentityRequest, context: grpc.ServicerContext):
        self.metadata.append(dict(context.invocation_metadata()))
        if self.token is None:
            context.abort(grpc.StatusCode.UNIMPLEMENTED, "no such method")
        return system_pb2.ProveIdentityResponse(proof=identity_proof(self.token, request.challenge))


class _Training(training_pb2_grpc.TrainingServiceServicer):
    def __init__(self) -> None:
        self.watch_ended = threading.Event()

    def GetJob(self, request: training_pb2.GetJobRequest, context: grpc.ServicerContext):
        context.abort(grpc.StatusCode.NOT_FOUND, f"no job {request.job_id!r}\nhint: `lorad jobs` lists them")

    def WatchJob(self, request: training_pb2.WatchJobRequest, context: grpc.ServicerContext):
        yield training_pb2.WatchJobResponse(job=jobs_pb2.Job(job_id=request.job_id, state=jobs_pb2.JOB_STATE_RUNNING))
        seq = request.after_seq
        try:
            while context.is_active():  # endless live events until the watcher leaves
                seq += 1
                yield training_pb2.WatchJobResponse(event=jobs_pb2.JobEvent(job_id=request.job_id, seq=seq))
                time.sleep(0.01)
        finally:
            self.watch_ended.set()


@pytest.fixture
def server() -> Iterator[tuple[int, _System, _Training]]:
    srv = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    system, training = _System(), _Training()
    system_pb2_grpc.add_SystemServiceServicer_to_server(system, srv)
    training_pb2_grpc.add_TrainingServiceServicer_to_server(training, srv)
    port = srv.add_insecure_port("127.0.0.1:0")
    srv.start()
    try:
        yield port, system, training
    finally:
        srv.stop(grace=None)


def test_round_trip_sends_bearer_token(server: tuple[int, _System, _Training]) -> None:
    port, system, _ = server
    with LoradClient.connect(f"127.0.0.1:{port}", token="s3cret", timeout=5) as client:
        status = client.status()
    assert (status.version, status.queue_length) == ("9.9.9", 2)
    assert system.metadata[-1].get("authorization") == "Bearer s3cret"


def test_discovered_token_is_sent(
    server: tuple[int, _System, _Training], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    port, system, _ = server
    system.token = "from-file"
    token_path(tmp_path).write_text("from-file\n")
    monkeypatch.setenv("LORAD_ADDRESS", f"127.0.0.1:{port}")
    with LoradClient.connect(home=tmp_path, timeout=5) as client:
        client.status()
    assert system.metadata[-1].get("authorization") == "Bearer from-file"


def test_no_token_sends_no_authorization(server: tuple[int, _System, _Training], tmp_path: Path) -> None:
    port, system, _ = server
    with LoradClient.connect(f"127.0.0.1:{port}", home=tmp_path, timeout=5) as client:
        client.status()
    assert "authorization" not in system.metadata[-1]


def test_server_errors_become_lorad_rpc_errors(server: tuple[int, _System, _Training]) -> None:
    port, _, _ = server
    with LoradClient.connect(f"127.0.0.1:{port}", timeout=5) as client, pytest.raises(LoradRpcError) as info:
        client.get_job("nope")
    assert info.value.code == grpc.StatusCode.NOT_FOUND
    assert str(info.value) == "no job 'nope'\nhint: `lorad jobs` lists them"
    assert not isinstance(info.value, DaemonUnavailable)


def test_watch_job_streams_and_cancels(server: tuple[int, _System, _Training]) -> None:
    port, _, training = server
    with LoradClient.connect(f"127.0.0.1:{port}", timeout=5) as client:
        watch = client.watch_job("j1", after_seq=5)
        first = next(watch)
        assert first.job.job_id == "j1" and first.job.state == jobs_pb2.JOB_STATE_RUNNING
        seqs = []
        for message in watch:
            seqs.append(message.event.seq)
            if len(seqs) == 3:
                watch.cancel()
        assert seqs[:3] == [6, 7, 8]
        assert list(watch) == []  # a cancelled watch stays ended
        assert training.watch_ended.wait(5), "the server never saw the watcher leave"


@pytest.mark.parametrize("knows", [None, "another-homes-token"], ids=["no-identity-rpc", "wrong-token"])
def test_a_server_that_cannot_prove_it_knows_the_token_never_receives_it(
    server: tuple[int, _System, _Training], knows: str | None
) -> None:
    port, system, _ = server
    system.token = knows
    with pytest.raises(DaemonNotVerified) as info:
        LoradClient.connect(f"127.0.0.1:{port}", token="s3cret", timeout=5)
    assert info.value.code == grpc.StatusCode.UNAUTHENTICATED
    assert f"127.0.0.1:{port}" in str(info.value) and "the token was not sent" in str(info.value)
    assert system.metadata, "the client never asked for a proof"
    assert all("s3cret" not in " ".join(m.values()) for m in system.metadata)
    # Built by hand (no connect()): the first call checks, and sends nothing on failure either.
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    client = LoradClient(channel, DaemonTarget(f"127.0.0.1:{port}", "s3cret", "test"), "s3cret")
    with client, pytest.raises(DaemonNotVerified):
        client.status()
    assert all("authorization" not in m for m in system.metadata)
