"""Which job starts where: `devices` as users write it, first in first out, resident models first."""

from __future__ import annotations

from pathlib import Path

import pytest

from lorad.config import parse_config
from lorad.config.schema import DeviceRequest
from lorad.errors import ConfigError
from lorad.jobs.scheduling import Slot, Waiting, assign, want_for
from tests.support.datasets import make_dataset

GPUS_AND_CPU = [Slot(0, "cuda:0"), Slot(1, "cuda:1"), Slot(2, "cuda:2"), Slot(3, "cpu")]
TWO_CPUS = [Slot(0, "cpu"), Slot(1, "cpu")]


def devices(value: object, tmp_path: Path, **extra: object) -> DeviceRequest:
    data = make_dataset(tmp_path / "d", count=1)
    raw = {"train_data_dir": str(data), "base_model": "m", "output_dir": str(tmp_path / "o"), "devices": value}
    return parse_config(raw | extra, base_dir=tmp_path).devices


def test_devices_are_written_as_auto_a_count_or_a_list(tmp_path: Path) -> None:
    assert devices("auto", tmp_path).is_auto and devices("auto", tmp_path).ranks == 1
    assert devices(2, tmp_path) == DeviceRequest(count=2)
    assert devices([0, 2], tmp_path) == DeviceRequest(names=("0", "2"))
    assert devices("cuda:1", tmp_path) == DeviceRequest(names=("cuda:1",))
    assert devices(["cpu", "cpu"], tmp_path).ranks == 2
    assert devices([0, 2], tmp_path).to_yaml() == [0, 2]


@pytest.mark.parametrize(
    ("value", "says"),
    [
        (0, "ask for 1 to 64 devices"),
        (["cpu", "cuda:0"], "mixes device kinds"),
        ([1, 1], "names one device twice"),
        ("gpu", "write auto, a count such as 2"),
        (True, "write auto, a count such as 2"),
    ],
)
def test_bad_devices_are_refused_naming_the_key(value: object, says: str, tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as err:
        devices(value, tmp_path)
    assert "`devices`" in str(err.value) and says in str(err.value)


def test_naming_devices_twice_over_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="use one of them"):
        devices(["cuda:0", "cuda:1"], tmp_path, device="cuda:0")


def test_what_a_job_may_use() -> None:
    auto = want_for(DeviceRequest(), "auto", GPUS_AND_CPU)
    assert auto.any_of == (0, 1, 2) and auto.count == 1  # the GPUs, not the CPU worker
    assert want_for(DeviceRequest(), "cpu", GPUS_AND_CPU).any_of == (3,)
    assert want_for(DeviceRequest(), "cuda:1", GPUS_AND_CPU).named == (1,)
    assert want_for(DeviceRequest(count=3), "auto", GPUS_AND_CPU).count == 3
    named = want_for(DeviceRequest(names=("cuda:2", "cuda:0")), "auto", GPUS_AND_CPU)
    assert named.named == (2, 0)  # rank 0 on cuda:2, as written
    two_cpus = want_for(DeviceRequest(names=("cpu", "cpu")), "auto", TWO_CPUS)
    assert two_cpus.any_of == (0, 1) and two_cpus.count == 2


@pytest.mark.parametrize(
    ("request_", "device", "says"),
    [
        (DeviceRequest(count=4), "auto", "asks for 4 cuda devices; this daemon has 3 cuda workers"),
        (DeviceRequest(count=2), "cpu", "`--cpu-workers N`"),
        (DeviceRequest(names=("cuda:7",)), "auto", "names cuda:7"),
        (DeviceRequest(names=("9",)), "auto", "names worker 9"),
        (DeviceRequest(names=("3", "0")), "auto", "mixes device kinds"),
    ],
)
def test_what_the_daemon_cannot_give_is_refused(request_: DeviceRequest, device: str, says: str) -> None:
    with pytest.raises(ConfigError, match="devices") as err:
        want_for(request_, device, GPUS_AND_CPU)
    assert says in str(err.value)


def test_an_in_process_daemon_refuses_jobs_on_several_devices() -> None:
    with pytest.raises(ConfigError, match="without --in-process"):
        want_for(DeviceRequest(count=2), "cpu", TWO_CPUS, max_ranks=1)


AUTO = DeviceRequest()


def job(job_id: str, request: DeviceRequest = AUTO, device: str = "auto", base: str = "") -> Waiting:
    return Waiting(job_id, want_for(request, device, GPUS_AND_CPU), base)


def test_a_job_goes_where_its_base_model_is_resident() -> None:
    residents = {0: {"/m/sd15"}, 2: {"/m/sdxl"}}
    starts = assign([job("a", base="/m/sdxl"), job("b", base="/m/sd15")], free={0, 1, 2}, residents=residents)
    assert starts == [("a", (2,)), ("b", (0,))]
    # Taken: the next best free one.
    assert assign([job("c", base="/m/sdxl")], free={0, 1}, residents=residents) == [("c", (0,))]


def test_two_jobs_start_at_once_on_two_devices() -> None:
    assert assign([job("a"), job("b")], free={0, 1, 2, 3}, residents={}) == [("a", (0,)), ("b", (1,))]


def test_a_job_on_two_devices_waits_for_two_and_is_never_overtaken() -> None:
    queue = [job("big", DeviceRequest(count=2)), job("small"), job("cpu", device="cpu")]
    # One GPU free: the two-device job waits, the one-device job behind it waits too (it would take the GPU
    # the big one needs next), a CPU job that needs nothing of it starts.
    assert assign(queue, free={1, 3}, residents={}) == [("cpu", (3,))]
    # Two free: the big one first, in order.
    assert assign(queue[:2], free={0, 1}, residents={}) == [("big", (0, 1))]


def test_a_job_naming_a_busy_gpu_does_not_hold_back_jobs_that_need_other_ones() -> None:
    queue = [job("pinned", DeviceRequest(names=("cuda:0",))), job("any")]
    assert assign(queue, free={1, 2}, residents={}) == [("any", (1,))]


def test_the_queue_is_served_in_order() -> None:
    queue = [job(name) for name in "abcd"]
    assert [job_id for job_id, _ in assign(queue, free={0, 1, 2}, residents={})] == ["a", "b", "c"]
