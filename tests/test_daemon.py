"""The daemon over real gRPC: a real server on a free port, the real store, the tiny model."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from pathlib import Path

import grpc
import pytest

from lorad.server.daemon import RunningDaemon
from lorad_api.v1 import jobs_pb2, system_pb2, system_pb2_grpc
from lorad_client import LoradClient, LoradRpcError
from tests.support.daemons import config_yaml, kinds, run_daemon, watch_all, worker_registry
from tests.support.datasets import tiny_train_values


@pytest.mark.slow
@pytest.mark.in_process  # looks at the resident model itself
def test_submit_stream_finish_then_second_job_is_resident(
    client: LoradClient, daemon: RunningDaemon, tiny_sd: Path, dataset: Path, tmp_path: Path
) -> None:
    job = client.submit_training(config_yaml(tiny_sd, dataset, tmp_path / "first"), base_dir=tmp_path)
    assert job.state == jobs_pb2.JOB_STATE_QUEUED and job.name == "first"
    _, events = watch_all(client, job.job_id)
    seen = kinds(events)
    assert seen[:2] == ["queued", "started"] and seen[-1] == "finished"
    assert {"data_report", "model_loaded", "latents_cached", "training_started", "step"} <= set(seen)
    loaded = next(e.model_loaded for e in events if e.HasField("model_loaded"))
    assert not loaded.resident
    finished = client.get_job(job.job_id)
    assert finished.state == jobs_pb2.JOB_STATE_SUCCEEDED
    assert Path(finished.outputs["kohya"]).is_file() and Path(finished.outputs["diffusers"]).is_file()
    assert [e.seq for e in events] == list(range(1, len(events) + 1))

    # The resident base model is bit-identical after a job.
    from lorad.models.sd_components import state_dict_digest

    (info,) = worker_registry(daemon).list()
    with worker_registry(daemon).use(info.key) as held:
        before = state_dict_digest(held.model.unet.state_dict())

    second = client.submit_training(config_yaml(tiny_sd, dataset, tmp_path / "second", lora_rank=2), base_dir=tmp_path)
    _, events = watch_all(client, second.job_id)
    loaded = next(e.model_loaded for e in events if e.HasField("model_loaded"))
    assert loaded.resident and loaded.seconds == 0
    assert next(e.latents_cached for e in events if e.HasField("latents_cached")).encoded == 0
    with worker_registry(daemon).use(info.key) as held:
        assert state_dict_digest(held.model.unet.state_dict()) == before
        assert not any("lora" in name for name, _ in held.model.unet.named_modules())
    assert [m.model_id for m in client.list_models()] == [info.model_id]


@pytest.mark.slow
def test_late_watcher_gets_full_history(client: LoradClient, tiny_sd: Path, dataset: Path, tmp_path: Path) -> None:
    job = client.submit_training(config_yaml(tiny_sd, dataset, tmp_path / "o"), base_dir=tmp_path)
    _, live = watch_all(client, job.job_id)
    first, replay = watch_all(client, job.job_id)
    assert first.state == jobs_pb2.JOB_STATE_SUCCEEDED
    assert [e.SerializeToString() for e in replay] == [e.SerializeToString() for e in live]
    _, tail = watch_all(client, job.job_id, after_seq=len(live) - 2)
    assert [e.seq for e in tail] == [len(live) - 1, len(live)]


@pytest.mark.slow
def test_cancel_running_and_queued(client: LoradClient, tiny_sd: Path, dataset: Path, tmp_path: Path) -> None:
    long_run = config_yaml(tiny_sd, dataset, tmp_path / "long", max_train_steps=100_000, save_steps=1000)
    running = client.submit_training(long_run, base_dir=tmp_path)
    queued = client.submit_training(config_yaml(tiny_sd, dataset, tmp_path / "next"), base_dir=tmp_path)
    assert queued.queue_position in (1, 2)
    for message in client.watch_job(running.job_id):  # wait until it really trains
        if message.WhichOneof("item") == "event" and message.event.HasField("step"):
            break
    assert client.cancel_job(queued.job_id).state == jobs_pb2.JOB_STATE_CANCELLED
    client.cancel_job(running.job_id)
    _, events = watch_all(client, running.job_id)
    assert kinds(events)[-1] == "cancelled"
    checkpoint = Path(events[-1].cancelled.checkpoint)
    assert checkpoint.is_dir() and (checkpoint / "lora.safetensors").is_file()
    job = client.get_job(running.job_id)
    assert job.state == jobs_pb2.JOB_STATE_CANCELLED and job.progress.step < 100_000
    assert kinds(watch_all(client, queued.job_id)[1]) == ["queued", "cancelled"]
    with pytest.raises(LoradRpcError) as err:
        client.cancel_job(queued.job_id)
    assert err.value.code == grpc.StatusCode.FAILED_PRECONDITION


def test_bad_config_and_unknown_job(client: LoradClient, tiny_sd: Path, dataset: Path, tmp_path: Path) -> None:
    text = config_yaml(tiny_sd, dataset, tmp_path / "o") + "lora_rnak: 4\nbatch_size: lots\n"
    with pytest.raises(LoradRpcError) as err:
        client.submit_training(text, base_dir=tmp_path)
    assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert "did you mean `lora_rank`" in str(err.value) and "`batch_size`" in str(err.value)
    assert client.list_jobs() == []
    with pytest.raises(LoradRpcError) as err:
        client.get_job("nosuchjob0")
    assert err.value.code == grpc.StatusCode.NOT_FOUND


@pytest.mark.slow
def test_structured_fields_submit(client: LoradClient, tiny_sd: Path, dataset: Path, tmp_path: Path) -> None:
    values = tiny_train_values(tiny_sd, dataset, tmp_path / "fields")
    job = client.submit_training_fields(
        {k: str(v) if isinstance(v, Path) else v for k, v in values.items()}, base_dir=tmp_path
    )
    assert kinds(watch_all(client, job.job_id)[1])[-1] == "finished"


@pytest.mark.slow
def test_ten_watchers_receive_every_event(client: LoradClient, tiny_sd: Path, dataset: Path, tmp_path: Path) -> None:
    job = client.submit_training(config_yaml(tiny_sd, dataset, tmp_path / "o", epochs=2), base_dir=tmp_path)
    results: list[list[int]] = [[] for _ in range(10)]

    def watch(slot: int) -> None:
        results[slot] = [e.seq for e in watch_all(client, job.job_id)[1]]

    threads = [threading.Thread(target=watch, args=(i,)) for i in range(10)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=300)
    expected = list(range(1, client_last_seq(client, job.job_id) + 1))
    assert all(r == expected for r in results)


def client_last_seq(client: LoradClient, job_id: str) -> int:
    return watch_all(client, job_id)[1][-1].seq


def test_token_required(short_dir: Path, tmp_path: Path) -> None:
    running = run_daemon(short_dir)
    try:
        tcp = running.addresses[1]
        empty_home = tmp_path / "no-token-here"
        empty_home.mkdir()
        with LoradClient.connect(tcp, home=empty_home) as anonymous:
            with pytest.raises(LoradRpcError) as err:
                anonymous.list_jobs()
            assert err.value.code == grpc.StatusCode.UNAUTHENTICATED
            assert anonymous.health() == "SERVING"  # probes work without the token
        with pytest.raises(LoradRpcError) as err:  # the daemon cannot prove it knows "wrong": nothing is sent
            LoradClient.connect(tcp, home=empty_home, token="wrong")
        assert err.value.code == grpc.StatusCode.UNAUTHENTICATED and "the token was not sent" in str(err.value)
        with grpc.insecure_channel(tcp) as channel, pytest.raises(grpc.RpcError) as raw:
            system_pb2_grpc.SystemServiceStub(channel).GetStatus(
                system_pb2.GetStatusRequest(), metadata=(("authorization", "Bearer wrong"),), timeout=10
            )
        assert raw.value.code() == grpc.StatusCode.UNAUTHENTICATED
        with LoradClient.connect(tcp, home=short_dir) as local:  # reads the token file like a local client
            assert local.status().token_required
        assert (short_dir / "token").stat().st_mode & 0o777 == 0o600
        assert (short_dir / "lorad.sock").stat().st_mode & 0o777 == 0o600
    finally:
        running.stop(grace=0)


def test_reflection_lists_services(daemon: RunningDaemon) -> None:
    from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

    token = (daemon.settings.home / "token").read_text().strip()
    call_credentials = grpc.metadata_call_credentials(
        lambda context, callback: callback((("authorization", f"Bearer {token}"),), None)
    )
    credentials = grpc.composite_channel_credentials(grpc.local_channel_credentials(), call_credentials)
    with grpc.secure_channel(daemon.addresses[1], credentials) as channel:
        services = set(ProtoReflectionDescriptorDatabase(channel).get_services())
    assert {
        "lorad.v1.TrainingService",
        "lorad.v1.ModelService",
        "lorad.v1.SystemService",
        "grpc.health.v1.Health",
    } <= services


def test_a_second_daemon_on_the_same_home_is_refused(daemon: RunningDaemon) -> None:
    env = os.environ | {"LORAD_HOME": str(daemon.settings.home)}
    second = subprocess.run(
        [sys.executable, "-m", "lorad.cli", "serve", "--listen", "127.0.0.1:0"],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert second.returncode == 1
    assert f"pid {os.getpid()}) is already running" in second.stderr
    assert (daemon.settings.home / "lorad.sock").exists()  # the first daemon's socket is untouched


def test_status_and_models(client: LoradClient, daemon: RunningDaemon, tiny_sd: Path) -> None:
    status = client.status()
    assert status.addresses[0].startswith("unix://") and status.queue_length == 0
    assert any(d.name == "cpu" for d in status.devices)
    reply = client.load_model(str(tiny_sd), base_dir="/", device="cpu")
    assert not reply.already_resident and reply.model.memory_bytes > 0
    assert client.load_model(str(tiny_sd), base_dir="/", device="cpu").already_resident
    assert client.unload_model(reply.model.model_id) == reply.model.memory_bytes
    with pytest.raises(LoradRpcError) as err:
        client.unload_model(reply.model.model_id)
    assert err.value.code == grpc.StatusCode.NOT_FOUND


def start_serve_process(home: Path) -> subprocess.Popen[str]:
    env = os.environ | {"LORAD_HOME": str(home), "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "lorad.cli", "serve", "--listen", "127.0.0.1:0", "--listen", f"unix:{home}/lorad.sock"],
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    assert proc.stderr is not None
    for line in proc.stderr:
        if "lorad daemon ready" in line:
            return proc
    raise AssertionError(f"daemon did not start (exit {proc.wait()})")


@pytest.mark.slow
def test_sigkilled_daemon_resumes_job_from_checkpoint(
    short_dir: Path, tiny_sd: Path, dataset: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from safetensors.torch import load_file

    monkeypatch.delenv("LORAD_ADDRESS")  # clients find the daemon through its discovery file

    first = start_serve_process(short_dir)
    try:
        with LoradClient.connect(home=short_dir) as client:
            quick = client.submit_training(config_yaml(tiny_sd, dataset, tmp_path / "quick"), base_dir=tmp_path)
            job = client.submit_training(
                config_yaml(
                    tiny_sd, dataset, tmp_path / "long", max_train_steps=60, save_steps=5, lr_scheduler="cosine"
                ),
                base_dir=tmp_path,
            )
            for message in client.watch_job(job.job_id):
                if message.WhichOneof("item") == "event" and message.event.HasField("checkpoint_saved"):
                    break
    finally:
        first.kill()  # SIGKILL: no chance to checkpoint or clean up
        first.wait()

    second = start_serve_process(short_dir)
    try:
        with LoradClient.connect(home=short_dir) as client:
            assert client.get_job(quick.job_id).state == jobs_pb2.JOB_STATE_SUCCEEDED
            _, events = watch_all(client, job.job_id)
            seen = kinds(events)
            assert "interrupted" in seen and seen[-1] == "finished"
            restarted = [e.started for e in events if e.HasField("started")]
            assert [s.attempt for s in restarted] == [1, 2]
            assert "checkpoints/step-" in restarted[1].resumed_from
            resumed = [e.training_started for e in events if e.HasField("training_started")][-1]
            assert resumed.start_step >= 5
            done = client.get_job(job.job_id)
            assert done.state == jobs_pb2.JOB_STATE_SUCCEEDED and done.progress.step == 60
            lora = load_file(done.outputs["kohya"])
            assert lora and all(k.startswith("lora_unet_") for k in lora)
    finally:
        second.terminate()
        assert second.wait(timeout=120) == 0
