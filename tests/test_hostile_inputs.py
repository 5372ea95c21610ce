"""Hostile input never takes the daemon down: every bad request gets a clear status naming what is
wrong (never INTERNAL), memory stays bounded, and open streams never starve other calls.

The daemon here is a real `lorad serve` process, so its memory is its own to measure (from
/proc/<pid>/status: VmRSS now, VmHWM the peak). Requests are sent raw, with the token, so nothing in
the client can clean them up first.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from google.protobuf import struct_pb2

from lorad.paths import discovery_path, jobs_db_path, token_path
from lorad_api.v1 import (
    caption_pb2,
    caption_pb2_grpc,
    jobs_pb2,
    models_pb2,
    models_pb2_grpc,
    system_pb2,
    system_pb2_grpc,
    training_pb2,
    training_pb2_grpc,
    watch_pb2,
    watch_pb2_grpc,
)
from lorad_client import LoradClient
from tests.support.daemons import run_daemon
from tests.support.datasets import make_dataset

# The "billion laughs": 9 levels of 9 aliases, about 390 million strings once expanded.
YAML_BOMB = (
    'a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]\n'
    + "".join(f"{chr(98 + i)}: &{chr(98 + i)} [" + ",".join([f"*{chr(97 + i)}"] * 9) + "]\n" for i in range(8))
    + "batch_size: *i\n"
)
# What answering the bomb (and everything else here) may add to the daemon's resident memory.
MEMORY_BOUND_BYTES = 128 * 1024**2


@dataclass
class Served:
    """A `lorad serve` process and raw stubs that send its token."""

    process: subprocess.Popen
    home: Path
    tcp: str
    channel: grpc.Channel
    metadata: tuple[tuple[str, str], ...]
    peak: int = 0  # the highest VmHWM seen before a reset_peak()

    def status(self, field: str) -> int:
        """A memory figure of the daemon process in bytes (VmRSS, VmHWM) from /proc."""
        for line in Path(f"/proc/{self.process.pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
        raise AssertionError(f"no {field} in /proc/{self.process.pid}/status")

    def reset_peak(self) -> bool:
        """Start a new VmHWM measurement (Linux: write 5 to clear_refs); False where it cannot.
        The peak so far is kept in ``peak``, so the module's true peak is still known."""
        self.peak = max(self.peak, self.status("VmHWM"))
        try:
            Path(f"/proc/{self.process.pid}/clear_refs").write_text("5")
        except OSError:
            return False
        return True

    def call(self, stub_method: Callable, request: object, timeout: float = 30) -> object:
        return stub_method(request, metadata=self.metadata, timeout=timeout)


@pytest.fixture(scope="module")
def served() -> Iterator[Served]:
    home = Path(tempfile.mkdtemp(prefix="lorad-h-"))
    env = os.environ | {"LORAD_HOME": str(home), "OMP_NUM_THREADS": "1"}
    env.pop("LORAD_ADDRESS", None)
    log = open(home / "daemon.log", "w")  # noqa: SIM115 - closed after the process ends
    process = subprocess.Popen(
        [sys.executable, "-m", "lorad.cli", "serve", "--listen", "127.0.0.1:0", "--listen", f"unix:{home}/lorad.sock"],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    deadline = time.monotonic() + 180
    addresses: list[str] = []
    while time.monotonic() < deadline and process.poll() is None:
        try:
            info = json.loads(discovery_path(home).read_text())
            if info.get("pid") == process.pid:
                addresses = info["addresses"]
                break
        except (OSError, ValueError):
            pass
        time.sleep(0.2)
    assert addresses, (home / "daemon.log").read_text()
    tcp = next(a for a in addresses if not a.startswith("unix:"))
    token = token_path(home).read_text().strip()
    channel = grpc.insecure_channel(tcp)
    running = Served(process, home, tcp, channel, (("authorization", f"Bearer {token}"),))
    try:
        yield running
    finally:
        peak = max(running.peak, running.status("VmHWM")) if process.poll() is None else 0
        report = os.environ.get("LORAD_MEMORY_REPORT")
        if report and peak:
            with open(report, "a") as out:
                out.write(f"test_hostile_inputs daemon VmHWM {peak / 1024**2:.0f} MiB\n")
        channel.close()
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        log.close()
        shutil.rmtree(home, ignore_errors=True)


def _code(call: Callable[[], object]) -> tuple[grpc.StatusCode, str]:
    try:
        call()
    except grpc.RpcError as err:
        return err.code(), err.details() or ""
    return grpc.StatusCode.OK, ""


def _struct(values: dict) -> struct_pb2.Struct:
    struct = struct_pb2.Struct()
    for key, value in values.items():
        struct.fields[key].number_value = value  # NaN/inf as the wire carries them (update() refuses)
    return struct


def _submit_yaml(served: Served, text: str, base_dir: str = "/tmp") -> Callable[[], object]:
    stub = training_pb2_grpc.TrainingServiceStub(served.channel)
    return lambda: served.call(
        stub.SubmitTraining, training_pb2.SubmitTrainingRequest(config_yaml=text, base_dir=base_dir)
    )


def test_a_yaml_bomb_is_refused_within_a_memory_bound(served: Served, tmp_path: Path) -> None:
    assert len(YAML_BOMB) < 1024
    before = served.status("VmRSS")
    measured = served.reset_peak()
    bomb_file = tmp_path / "bomb.yaml"
    bomb_file.write_text(YAML_BOMB)
    watch = watch_pb2_grpc.WatchServiceStub(served.channel)
    start = time.monotonic()
    answers = [
        _code(_submit_yaml(served, YAML_BOMB)),
        _code(
            lambda: served.call(
                watch.AddWatch,
                watch_pb2.AddWatchRequest(folder=str(tmp_path), config_path=str(bomb_file), base_dir="/"),
            )
        ),
        _code(_submit_yaml(served, "a: &a [*a, *a]\nbatch_size: *a\n")),  # an alias to itself
    ]
    assert time.monotonic() - start < 20
    for code, message in answers:
        assert code == grpc.StatusCode.INVALID_ARGUMENT, message
        assert "alias" in message and len(message) < 2000
    growth = (served.status("VmHWM") if measured else served.status("VmRSS")) - before
    assert growth < MEMORY_BOUND_BYTES, f"answering the bomb grew the daemon by {growth / 1024**2:.0f} MiB"


# (name, request builder, the key the error must name)
def _invalid_argument_cases(served: Served, tmp: Path) -> list[tuple[str, Callable[[], object], str]]:
    training = training_pb2_grpc.TrainingServiceStub(served.channel)
    models = models_pb2_grpc.ModelServiceStub(served.channel)
    caption = caption_pb2_grpc.CaptionServiceStub(served.channel)
    watch = watch_pb2_grpc.WatchServiceStub(served.channel)
    data = make_dataset(tmp / "data", count=2)
    base = f"train_data_dir: {data}\nbase_model: {tmp}/model.safetensors\noutput_dir: {tmp}/out\n"
    config_file = tmp / "template.yaml"
    config_file.write_text(base)
    long_name = "x" * 300
    long_path = "/" + "/".join(["abcdefgh"] * 600)

    def submit_fields(values: dict, **request: object) -> Callable[[], object]:
        fields = _struct({"batch_size": 1.0} | values)
        fields.fields["train_data_dir"].string_value = str(data)
        fields.fields["base_model"].string_value = f"{tmp}/model.safetensors"
        fields.fields["output_dir"].string_value = f"{tmp}/out"
        message = training_pb2.SubmitTrainingRequest(config_fields=fields, base_dir=str(tmp), **request)
        return lambda: served.call(training.SubmitTraining, message)

    def caption_call(**request: object) -> Callable[[], object]:
        message = caption_pb2.CaptionImagesRequest(**({"folder": str(data), "base_dir": "/"} | request))
        return lambda: list(caption.CaptionImages(message, metadata=served.metadata, timeout=30))

    def add_watch(folder: str, **policy: object) -> Callable[[], object]:
        message = watch_pb2.AddWatchRequest(
            folder=folder, config_path=str(config_file), base_dir="/", policy=watch_pb2.WatchPolicy(**policy)
        )
        return lambda: served.call(watch.AddWatch, message)

    return [
        ("NaN in YAML", _submit_yaml(served, base + "learning_rate: .nan\n"), "learning_rate"),
        ("inf in YAML", _submit_yaml(served, base + "noise_offset: .inf\n"), "noise_offset"),
        ("NaN in structured fields", submit_fields({"learning_rate": math.nan}), "learning_rate"),
        ("inf in structured fields", submit_fields({"epochs": math.inf}), "epochs"),
        ("-inf in structured fields", submit_fields({"adam_epsilon": -math.inf}), "adam_epsilon"),
        ("epochs past int32", _submit_yaml(served, base + "epochs: 3000000000\n"), "epochs"),
        ("seed of 2^63", _submit_yaml(served, base + f"seed: {2**63}\n"), "seed"),
        ("9999-digit number", _submit_yaml(served, base + "epochs: " + "9" * 9999 + "\n"), "a value"),
        (
            "caption beams 10000",
            _submit_yaml(served, base + "captioner: blip\ncaption_beams: 10000\n"),
            "caption_beams",
        ),
        ("repeats 10^12", _submit_yaml(served, base + "repeats: 1000000000000\n"), "repeats"),
        ("lora_alpha 1e300", _submit_yaml(served, base + "lora_alpha: 1e300\n"), "lora_alpha"),
        ("NUL in a config path", _submit_yaml(served, base + 'init_lora: "/tmp/a\\0b"\n'), "init_lora"),
        (
            "too-long base_model",
            _submit_yaml(served, base.replace(f"{tmp}/model.safetensors", long_path)),
            "base_model",
        ),
        ("too-long file name", _submit_yaml(served, base + f"cache_dir: /tmp/{long_name}\n"), "cache_dir"),
        ("NUL in base_dir", _submit_yaml(served, base, base_dir="/tmp/\0"), "base_dir"),
        ("too-long base_dir", _submit_yaml(served, base, base_dir=long_path), "base_dir"),
        ("NaN keep-alive", submit_fields({}, keep_alive_seconds=math.nan), "keep_alive_seconds"),
        ("negative keep-alive", submit_fields({}, keep_alive_seconds=-5.0), "keep_alive_seconds"),
        ("deep nesting", _submit_yaml(served, "a: " + "[" * 5000), "YAML"),
        ("oversized YAML", _submit_yaml(served, base + "# " + "x" * 300_000 + "\n"), "256 KB"),
        ("oversized fields", submit_fields({f"k{i:06d}": 1.0 for i in range(20_000)}), "config_fields"),
        (
            "ListJobs limit -1",
            lambda: served.call(training.ListJobs, training_pb2.ListJobsRequest(limit=-1)),
            "limit",
        ),
        (
            "ListJobs limit 2^31-1",
            lambda: served.call(training.ListJobs, training_pb2.ListJobsRequest(limit=2**31 - 1)),
            "limit",
        ),
        (
            "LoadModel NUL",
            lambda: served.call(models.LoadModel, models_pb2.LoadModelRequest(base_model="/a\0b", base_dir="/")),
            "base_model",
        ),
        (
            "LoadModel NaN keep-alive",
            lambda: served.call(
                models.LoadModel,
                models_pb2.LoadModelRequest(base_model="/nope", base_dir="/", keep_alive_seconds=math.nan),
            ),
            "keep_alive_seconds",
        ),
        ("CaptionImages 10000 beams", caption_call(options=caption_pb2.CaptionOptions(num_beams=10000)), "num_beams"),
        (
            "CaptionImages NaN threshold",
            caption_call(options=caption_pb2.CaptionOptions(general_threshold=math.nan)),
            "general_threshold",
        ),
        ("CaptionImages inf keep-alive", caption_call(keep_alive_seconds=math.inf), "keep_alive_seconds"),
        ("CaptionImages NUL folder", caption_call(folder="/tmp/\0x"), "folder"),
        ("CaptionImages .png sidecars", caption_call(caption_extension=".png"), "caption_extension"),
        (
            "ListCaptions /",
            lambda: served.call(caption.ListCaptions, caption_pb2.ListCaptionsRequest(folder="/", base_dir="/")),
            "/",
        ),
        (
            "ListCaptions NUL",
            lambda: served.call(caption.ListCaptions, caption_pb2.ListCaptionsRequest(folder="/\0", base_dir="/")),
            "folder",
        ),
        (
            "SetCaptions NUL path",
            lambda: served.call(
                caption.SetCaptions,
                caption_pb2.SetCaptionsRequest(
                    folder=str(data), base_dir="/", edits=[caption_pb2.CaptionEdit(path="a\0.png", caption="x")]
                ),
            ),
            "edits[0].path",
        ),
        ("AddWatch /", add_watch("/"), "folder"),
        ("AddWatch the daemon's home", add_watch(str(served.home.parent)), "folder"),
        ("AddWatch NaN quiet period", add_watch(str(data), quiet_seconds=math.nan), "quiet_seconds"),
        ("AddWatch inf quiet period", add_watch(str(data), quiet_seconds=math.inf), "quiet_seconds"),
        ("AddWatch NUL folder", add_watch("/tmp/\0"), "folder"),
        (
            "RemoveWatch NUL",
            lambda: served.call(watch.RemoveWatch, watch_pb2.RemoveWatchRequest(watch="a\0b", base_dir="/")),
            "watch",
        ),
    ]


def test_bad_values_are_invalid_argument_naming_the_key(served: Served, tmp_path: Path) -> None:
    before = served.status("VmRSS")
    measured = served.reset_peak()
    cases = _invalid_argument_cases(served, tmp_path)
    wrong = []
    for name, call, key in cases:
        code, message = _code(call)
        if code != grpc.StatusCode.INVALID_ARGUMENT or key not in message:
            wrong.append(f"{name}: {code.name} {message[:300]!r}")
    assert not wrong, "\n".join(wrong)
    with LoradClient.connect(served.tcp, home=served.home) as client:
        assert client.list_watches() == []  # nothing refused was stored
        assert client.list_jobs() == []
    growth = (served.status("VmHWM") if measured else served.status("VmRSS")) - before
    assert growth < MEMORY_BOUND_BYTES, f"{growth / 1024**2:.0f} MiB"


def test_a_long_list_of_problems_arrives_with_its_real_code(served: Served, tmp_path: Path) -> None:
    text = "".join(f"key{i}: 1\n" for i in range(20_000))  # 20,000 unknown keys, 3 required ones missing
    code, message = _code(_submit_yaml(served, text))
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert "20,003 problems" in message and "… and 19,983 more" in message
    assert len(message.encode()) < 8000


def test_list_jobs_answers_without_configs_and_get_job_keeps_them(served: Served, tmp_path: Path) -> None:
    data = make_dataset(tmp_path / "data", count=2)
    filler = "# " + "x" * 200 + "\n"
    text = f"train_data_dir: {data}\nbase_model: {tmp_path}/none.safetensors\noutput_dir: {tmp_path}/out\n"
    text += filler * 1000  # ~200 KB of comments: within the limit, and kept with the job
    training = training_pb2_grpc.TrainingServiceStub(served.channel)
    request = training_pb2.SubmitTrainingRequest(config_yaml=text, base_dir="/")
    jobs = [served.call(training.SubmitTraining, request).job for _ in range(3)]
    listed = served.call(training.ListJobs, training_pb2.ListJobsRequest()).jobs
    assert {job.job_id for job in jobs} <= {job.job_id for job in listed}
    assert all(job.config_yaml == "" for job in listed)
    assert served.call(training.GetJob, training_pb2.GetJobRequest(job_id=jobs[0].job_id)).job.config_yaml == text

    # A job that has ended: WatchJob past its last event ends after the history instead of waiting.
    deadline = time.monotonic() + 120
    final = (jobs_pb2.JOB_STATE_SUCCEEDED, jobs_pb2.JOB_STATE_FAILED, jobs_pb2.JOB_STATE_CANCELLED)
    while served.call(training.GetJob, training_pb2.GetJobRequest(job_id=jobs[-1].job_id)).job.state not in final:
        assert time.monotonic() < deadline
        time.sleep(0.2)
    request = training_pb2.WatchJobRequest(job_id=jobs[-1].job_id, after_seq=1_000_000)
    answers = list(training.WatchJob(request, metadata=served.metadata, timeout=15))
    assert [a.WhichOneof("item") for a in answers] == ["job"]


def test_unary_calls_answer_while_many_streams_are_open(served: Served) -> None:
    channels = [grpc.insecure_channel(served.tcp) for _ in range(10)]
    streams = []
    try:
        for index in range(100):
            stub = watch_pb2_grpc.WatchServiceStub(channels[index % 10])
            stream = stub.FollowWatches(watch_pb2.FollowWatchesRequest(), metadata=served.metadata, timeout=60)
            streams.append(stream)
            next(stream)  # the snapshot: the daemon is serving this stream now
        system = system_pb2_grpc.SystemServiceStub(served.channel)
        for _ in range(5):
            start = time.monotonic()
            served.call(system.GetStatus, system_pb2.GetStatusRequest(), timeout=5)
            assert time.monotonic() - start < 1.0
        # Past the bound, a stream is refused at once, and unary calls still answer.
        extra = []
        refused = 0
        for index in range(100):
            stub = watch_pb2_grpc.WatchServiceStub(channels[index % 10])
            stream = stub.FollowWatches(watch_pb2.FollowWatchesRequest(), metadata=served.metadata, timeout=60)
            extra.append(stream)
            try:
                next(stream)
            except grpc.RpcError as err:
                assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, err.details()
                assert "open streams" in (err.details() or "")
                refused += 1
        streams += extra
        assert refused == 8  # 192 streams at most: 100 + 92
        start = time.monotonic()
        served.call(system.GetStatus, system_pb2.GetStatusRequest(), timeout=5)
        assert time.monotonic() - start < 1.0
    finally:
        for stream in streams:
            stream.cancel()
        for channel in channels:
            channel.close()


def _template(tmp_path: Path, data: Path, name: str = "o") -> Path:
    """A watch's template config training on ``data`` into ``tmp_path/name`` (one template per watch:
    two watches writing the same versioned outputs are refused)."""
    template = tmp_path / f"template-{name}.yaml"
    template.write_text(
        f"train_data_dir: {data}\nbase_model: {tmp_path}/m.safetensors\noutput_dir: {tmp_path}/{name}\n"
    )
    return template


def test_a_broken_watch_row_never_stops_the_daemon_from_starting(short_dir: Path, tmp_path: Path) -> None:
    data = make_dataset(tmp_path / "data", count=2)
    other = make_dataset(tmp_path / "other", count=2)
    template, other_template = _template(tmp_path, data), _template(tmp_path, other, "p")
    first = run_daemon(short_dir)
    try:
        with LoradClient.connect(first.addresses[0], home=short_dir) as client:
            good = client.add_watch(str(data), str(template), base_dir="/")
            damaged = client.add_watch(str(other), str(other_template), base_dir="/")
    finally:
        first.stop(grace=0)
    # What older versions stored, or a damaged file holds: a policy that does not decode, the root folder.
    with sqlite3.connect(jobs_db_path(short_dir)) as db:
        db.execute("UPDATE watches SET policy = '{not json' WHERE watch_id = ?", (damaged.watch_id,))
        db.execute(
            "INSERT INTO watches (watch_id, folder, config_path, base_dir, policy, created_at, updated_at, "
            "last_job_id, version, queued_version, latest_output, published_path, known) "
            "VALUES ('rootwatch01', '/', ?, '/', ?, 0, 0, '', 0, 0, '', '', '{}')",
            (str(template), json.dumps({"quiet_seconds": 10.0})),
        )
    second = run_daemon(short_dir)  # starts, whatever the rows hold
    try:
        with LoradClient.connect(second.addresses[0], home=short_dir) as client:
            watches = {w.watch_id: w for w in client.list_watches()}
            assert set(watches) == {good.watch_id, damaged.watch_id, "rootwatch01"}
            assert watches[good.watch_id].state != watch_pb2.WATCH_STATE_ERROR
            for broken in (damaged.watch_id, "rootwatch01"):
                assert watches[broken].state == watch_pb2.WATCH_STATE_ERROR
                assert watches[broken].error and watches[broken].hint
                client.remove_watch(broken)  # removable in any state
            assert [w.watch_id for w in client.list_watches()] == [good.watch_id]
            assert client.add_watch(str(other), str(other_template), base_dir="/").folder == str(other)
            assert client.status().version  # and the daemon answers as usual
    finally:
        second.stop(grace=0)


def test_a_watched_folder_with_a_link_to_an_unreadable_folder(short_dir: Path, tmp_path: Path) -> None:
    unreadable = Path("/proc/1/fdinfo")  # even root gets EACCES for names in it
    try:
        (unreadable / "CACHEDIR.TAG").is_file()
        pytest.skip("no folder here refuses to be read (as this user)")
    except PermissionError:
        pass
    data = make_dataset(tmp_path / "data", count=2)
    (data / "linked").symlink_to(unreadable)
    template = _template(tmp_path, data)
    running = run_daemon(short_dir)
    try:
        with LoradClient.connect(running.addresses[0], home=short_dir) as client:
            watch = client.add_watch(str(data), str(template), base_dir="/")
            assert watch.images_seen == 2
            assert len(client.list_captions(str(data), base_dir="/").rows) == 2
    finally:
        running.stop(grace=0)
    again = run_daemon(short_dir)  # and it starts again with that watch
    try:
        with LoradClient.connect(again.addresses[0], home=short_dir) as client:
            assert [w.watch_id for w in client.list_watches()] == [watch.watch_id]
            client.remove_watch(watch.watch_id)
    finally:
        again.stop(grace=0)
