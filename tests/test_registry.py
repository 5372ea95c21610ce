"""The resident model registry (lorad.models.registry): reuse, keep-alive, budget eviction, threading."""

from __future__ import annotations

import gc
import math
import subprocess
import sys
import threading
import time
import weakref
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from lorad.errors import LoradError
from lorad.models.registry import (
    ModelInUse,
    ModelKey,
    ModelNotResident,
    ModelRegistry,
    measure_tensor_bytes,
)

MB = 1 << 20
# Generous bound for waits on other threads; a healthy run never comes near it.
THREAD_TIMEOUT = 10.0


class FakeClock:
    """A clock that moves only when told to."""

    def __init__(self, start: float = 1000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


class FakeModel:
    """Stands for loaded SD components: one tensor of a known size, and the describe attributes."""

    def __init__(self, key: ModelKey, size: int) -> None:
        self.weights = torch.zeros(size, dtype=torch.uint8)
        self.source = f"/resolved/{key.base_model}"
        self.model_version = "sd1"


class FakeLoader:
    """Counts calls per base model; sizes come from ``sizes`` (1 MiB by default)."""

    def __init__(self, sizes: dict[str, int] | None = None) -> None:
        self.sizes = sizes or {}
        self.calls: list[str] = []
        self._lock = threading.Lock()

    def __call__(self, key: ModelKey) -> FakeModel:
        with self._lock:
            self.calls.append(key.base_model)
        return FakeModel(key, self.sizes.get(key.base_model, MB))


def key(base: str = "a", **fields: str) -> ModelKey:
    return ModelKey(base_model=base, device="cpu", dtype="float32", **fields)


def make_registry(
    loader: Callable[[ModelKey], FakeModel] | None = None, **kwargs: Any
) -> tuple[ModelRegistry[FakeModel], FakeClock, FakeLoader]:
    fake_loader = FakeLoader()
    clock = FakeClock()
    registry: ModelRegistry[FakeModel] = ModelRegistry(
        loader or fake_loader, clock=clock, wall_clock=FakeClock(1.7e9), **kwargs
    )
    return registry, clock, fake_loader


def wait_for_claims(registry: ModelRegistry[FakeModel], k: ModelKey, count: int) -> None:
    """Block until ``count`` use() requests are queued on the in-flight load of ``k``.

    White-box (reads the registry's private state): there is no public signal for "a request is
    waiting", and without it a test could pass through the resident path instead of the
    concurrent one. Polls real time because it waits on other threads, not on the registry clock.
    """
    tick = threading.Event()
    for _ in range(int(THREAD_TIMEOUT * 100)):
        with registry._lock:
            pending = registry._loading.get(k.model_id)
            if pending is not None and pending.claims >= count:
                return
        tick.wait(0.01)
    raise AssertionError(f"{count} requests never queued on the load of {k.base_model}")


def test_model_id_is_short_stable_and_covers_every_field() -> None:
    base = key("a")
    assert base.model_id == key("a").model_id
    assert len(base.model_id) == 12 and int(base.model_id, 16) >= 0
    variants = [
        key("b"),
        ModelKey("a", "cuda:0", "float32"),
        ModelKey("a", "cpu", "float16"),
        key("a", model_config_dir="/cfg"),
        key("a", tokenizer_path="/tok"),
        key("a", prediction_type="v_prediction"),
    ]
    assert len({base.model_id, *(v.model_id for v in variants)}) == 1 + len(variants)


def test_second_use_is_resident_and_does_not_call_the_loader() -> None:
    registry, _, loader = make_registry()
    with registry.use(key()) as first:
        assert not first.resident
        assert first.model_id == key().model_id
        model = first.model
    with registry.use(key()) as second:
        assert second.resident and second.load_seconds == 0.0
        assert second.model is model
    assert loader.calls == ["a"]


def test_load_preloads_and_reports_residency() -> None:
    registry, _, loader = make_registry()
    info, resident = registry.load(key())
    assert not resident
    assert (info.model_id, info.source, info.model_version) == (key().model_id, "/resolved/a", "sd1")
    assert info.memory_bytes == MB and not info.in_use and info.loaded_at == 1.7e9
    _, resident = registry.load(key())
    assert resident
    with registry.use(key()) as acquired:
        assert acquired.resident
    assert loader.calls == ["a"]


def test_concurrent_use_of_one_key_loads_once() -> None:
    gate = threading.Event()
    loader_entered = threading.Event()
    inner = FakeLoader()

    def slow_loader(k: ModelKey) -> FakeModel:
        loader_entered.set()
        # Held until the other three requests are queued behind this load.
        assert gate.wait(THREAD_TIMEOUT)
        return inner(k)

    registry, _, _ = make_registry(slow_loader)
    results: list[tuple[int, bool]] = []
    errors: list[BaseException] = []
    start = threading.Barrier(4)

    def job() -> None:
        try:
            start.wait()
            with registry.use(key()) as acquired:
                results.append((id(acquired.model), acquired.resident))
        except BaseException as error:
            errors.append(error)

    threads = [threading.Thread(target=job) for _ in range(4)]
    for thread in threads:
        thread.start()
    assert loader_entered.wait(THREAD_TIMEOUT)
    wait_for_claims(registry, key(), 4)
    gate.set()
    for thread in threads:
        thread.join(THREAD_TIMEOUT)
    assert not errors
    assert inner.calls == ["a"]
    assert len(results) == 4 and len({model for model, _ in results}) == 1
    # All four asked before the model was there, so none was resident.
    assert not any(resident for _, resident in results)
    assert [info.in_use for info in registry.list()] == [False]


def test_list_answers_while_one_loads_and_loads_run_one_at_a_time() -> None:
    """The registry lock is free during a load (list and unload answer), but a second key's load
    waits for the first: diffusers' fast loading patches torch for the whole process, so two loads
    at once could leave one model's weights on the meta device."""
    gate = threading.Event()
    entered = threading.Event()
    inner = FakeLoader()
    order: list[str] = []

    def loader(k: ModelKey) -> FakeModel:
        order.append(f"start {k.base_model}")
        if k.base_model == "slow":
            entered.set()
            assert gate.wait(THREAD_TIMEOUT)
        order.append(f"end {k.base_model}")
        return inner(k)

    registry, _, _ = make_registry(loader)
    slow = threading.Thread(target=registry.load, args=(key("slow"),))
    slow.start()
    try:
        assert entered.wait(THREAD_TIMEOUT)
        assert registry.list() == []  # would deadlock if the load held the registry lock
        with pytest.raises(ModelInUse, match="being loaded"):
            registry.unload("slow")
        answers: list[object] = []
        other = threading.Thread(target=lambda: answers.append(registry.load(key("fast"))))
        other.start()

        def fast_is_loading() -> bool:
            try:
                registry.unload("fast")
            except ModelInUse:
                return True
            except ModelNotResident:
                return False
            raise AssertionError("fast was loaded while slow still loads")

        deadline = time.monotonic() + THREAD_TIMEOUT
        while not fast_is_loading():  # the second load has begun (it is registered as loading) ...
            assert time.monotonic() < deadline, "the second load never began"
        assert order == ["start slow"]  # ... yet its loader waits for the first to finish
    finally:
        gate.set()
        slow.join(THREAD_TIMEOUT)
    other.join(THREAD_TIMEOUT)
    assert not other.is_alive() and answers[0][0].key == key("fast")
    assert order == ["start slow", "end slow", "start fast", "end fast"]  # fast waited for slow
    assert [i.key.base_model for i in registry.list()] == ["fast", "slow"]  # most recently used first


def test_keep_alive_default_expiry() -> None:
    registry, clock, loader = make_registry(default_keep_alive=60.0)
    with registry.use(key()):
        pass
    clock.advance(59.0)
    assert registry.evict_expired() == []
    assert registry.list()[0].keep_alive_seconds_left == pytest.approx(1.0)
    clock.advance(1.0)
    assert registry.evict_expired() == [key().model_id]
    assert registry.list() == []
    with registry.use(key()) as acquired:
        assert not acquired.resident
    assert loader.calls == ["a", "a"]


def test_keep_alive_restarts_after_each_use() -> None:
    registry, clock, _ = make_registry(default_keep_alive=60.0)
    registry.load(key())
    clock.advance(50.0)
    with registry.use(key()):
        clock.advance(100.0)  # a long job: the countdown does not run while in use
    clock.advance(59.0)
    assert registry.evict_expired() == []
    clock.advance(1.0)
    assert registry.evict_expired() == [key().model_id]


def test_per_request_keep_alive_overrides_the_default_from_then_on() -> None:
    registry, clock, _ = make_registry(default_keep_alive=60.0)
    with registry.use(key("short"), keep_alive=5.0):
        pass
    with registry.use(key("long"), keep_alive=math.inf):
        pass
    registry.load(key("zero"), keep_alive=0.0)
    registry.load(key("default"))
    assert registry.evict_expired() == [key("zero").model_id]
    clock.advance(5.0)
    assert registry.evict_expired() == [key("short").model_id]
    clock.advance(1e9)
    assert registry.evict_expired() == [key("default").model_id]
    assert [(i.key.base_model, i.keep_alive_seconds_left) for i in registry.list()] == [("long", math.inf)]


def test_a_later_use_without_keep_alive_keeps_the_overridden_value() -> None:
    registry, clock, _ = make_registry(default_keep_alive=60.0)
    registry.load(key(), keep_alive=600.0)
    with registry.use(key()):
        pass
    clock.advance(100.0)
    assert registry.evict_expired() == []
    assert registry.list()[0].keep_alive_seconds_left == pytest.approx(500.0)


def test_keep_alive_must_not_be_negative() -> None:
    registry, _, loader = make_registry()
    with pytest.raises(ValueError, match="keep_alive"):
        registry.load(key(), keep_alive=-1.0)
    with pytest.raises(ValueError, match="keep_alive"), registry.use(key(), keep_alive=math.nan):
        pass
    assert loader.calls == []


def test_models_in_use_are_never_evicted_or_unloadable() -> None:
    loader = FakeLoader({"a": 4 * MB, "b": 4 * MB})
    registry, clock, _ = make_registry(loader, default_keep_alive=1.0, memory_budget_bytes=5 * MB)
    with registry.use(key("a")):
        clock.advance(1e6)
        assert registry.evict_expired() == []
        with pytest.raises(ModelInUse) as raised:
            registry.unload(key("a").model_id)
        assert isinstance(raised.value, LoradError)
        assert "finish" in raised.value.hint and "cancel" in raised.value.hint
        with pytest.raises(ModelInUse):
            registry.unload("a")
        # Over budget, but the only other model is in use: both stay, the load still succeeds.
        _, resident = registry.load(key("b"))
        assert not resident
        info = {i.key.base_model: i for i in registry.list()}
        assert set(info) == {"a", "b"}
        assert info["a"].in_use and not info["b"].in_use
        assert info["a"].keep_alive_seconds_left == 1.0
    assert not registry.list()[0].in_use


def test_lru_eviction_under_a_memory_budget() -> None:
    loader = FakeLoader({"a": 3 * MB, "b": 3 * MB, "c": 3 * MB, "big": 8 * MB})
    registry, _, _ = make_registry(loader, memory_budget_bytes=7 * MB)
    registry.load(key("a"))
    registry.load(key("b"))
    with registry.use(key("a")):  # a is now more recently used than b
        pass
    registry.load(key("c"))  # 9 MiB > 7: b, the least recently used, goes
    assert [i.key.base_model for i in registry.list()] == ["c", "a"]
    with registry.use(key("a")):
        # 14 MiB: c, the only idle model, goes; a is in use and big was just loaded, so the
        # budget stays unmet at 11 MiB and the job goes on.
        with registry.use(key("big")) as acquired:
            assert not acquired.resident
        assert sorted(i.key.base_model for i in registry.list()) == ["a", "big"]
    assert loader.calls == ["a", "b", "c", "big"]


def test_budget_eviction_never_removes_the_model_just_loaded() -> None:
    loader = FakeLoader({"a": MB, "huge": 10 * MB})
    registry, _, _ = make_registry(loader, memory_budget_bytes=2 * MB)
    registry.load(key("a"))
    info, _ = registry.load(key("huge"))
    assert info.memory_bytes == 10 * MB
    assert [i.key.base_model for i in registry.list()] == ["huge"]


def test_unload_by_id_and_by_base_model() -> None:
    registry, _, _ = make_registry()
    registry.load(key("a"))
    registry.load(ModelKey("a", "cpu", "float16"))
    registry.load(key("b"))
    assert registry.unload(key("b").model_id) == MB
    assert [i.key.base_model for i in registry.list()] == ["a", "a"]
    # A base model resident under two keys unloads both.
    assert registry.unload("a") == 2 * MB
    assert registry.list() == []
    with pytest.raises(ModelNotResident) as raised:
        registry.unload("a")
    assert isinstance(raised.value, LoradError)
    assert "lorad models" in raised.value.hint


def test_loader_failure_leaves_nothing_behind_and_the_next_call_retries() -> None:
    attempts: list[str] = []

    def flaky(k: ModelKey) -> FakeModel:
        attempts.append(k.base_model)
        if len(attempts) == 1:
            raise OSError("disk on fire")
        return FakeModel(k, MB)

    registry, _, _ = make_registry(flaky)
    with pytest.raises(OSError, match="disk on fire"), registry.use(key()):
        pass
    assert registry.list() == []
    assert registry._loading == {}
    with pytest.raises(ModelNotResident):
        registry.unload("a")
    with registry.use(key()) as acquired:
        assert not acquired.resident
    assert attempts == ["a", "a"]


def test_concurrent_waiters_share_a_failed_load() -> None:
    gate = threading.Event()
    entered = threading.Event()
    attempts: list[str] = []

    def failing(k: ModelKey) -> FakeModel:
        attempts.append(k.base_model)
        entered.set()
        assert gate.wait(THREAD_TIMEOUT)
        raise OSError("corrupt checkpoint")

    registry, _, _ = make_registry(failing)
    errors: list[BaseException] = []

    def job() -> None:
        try:
            with registry.use(key()):
                pass
        except BaseException as error:
            errors.append(error)

    threads = [threading.Thread(target=job) for _ in range(3)]
    threads[0].start()
    assert entered.wait(THREAD_TIMEOUT)
    for thread in threads[1:]:
        thread.start()
    wait_for_claims(registry, key(), 3)
    gate.set()
    for thread in threads:
        thread.join(THREAD_TIMEOUT)
    assert attempts == ["a"]
    assert len(errors) == 3 and all(isinstance(e, OSError) for e in errors)
    assert registry.list() == [] and registry._loading == {}


def test_list_is_most_recently_used_first_with_keep_alive_left() -> None:
    registry, clock, _ = make_registry(default_keep_alive=100.0)
    for name in ("a", "b", "c"):
        registry.load(key(name))
        clock.advance(10.0)
    with registry.use(key("a")):
        listed = registry.list()
        assert [i.key.base_model for i in listed] == ["a", "c", "b"]
        assert [i.in_use for i in listed] == [True, False, False]
        assert [i.keep_alive_seconds_left for i in listed] == [100.0, 90.0, 80.0]
    clock.advance(30.0)
    listed = registry.list()
    assert [i.key.base_model for i in listed] == ["a", "c", "b"]
    assert [i.keep_alive_seconds_left for i in listed] == [70.0, 60.0, 50.0]
    clock.advance(1000.0)
    assert [i.keep_alive_seconds_left for i in registry.list()] == [0.0, 0.0, 0.0]


def test_close_unloads_everything_and_refuses_new_loads() -> None:
    registry, _, _ = make_registry()
    registry.load(key("a"))
    with registry.use(key("b")) as acquired:
        registry.close()
        assert registry.list() == []
        # The running job keeps its model until its block ends.
        assert acquired.model.weights.numel() == MB
    assert registry.list() == []
    with pytest.raises(RuntimeError, match="closed"):
        registry.load(key("a"))
    registry.close()


def test_default_measure_counts_modules_and_tensors_sharing_storage_once() -> None:
    class Parts:
        def __init__(self) -> None:
            self.first = torch.nn.Linear(4, 4)  # 16 + 4 float32
            self.second = torch.nn.Linear(4, 4)
            self.second.weight = self.first.weight  # tied: counted once
            self.second.register_buffer("steps", torch.zeros(3, dtype=torch.int64))
            self.extra = torch.zeros(10, dtype=torch.float16)
            self.meta = torch.nn.Linear(1000, 1000, device="meta")
            self.name = "not a tensor"

    assert measure_tensor_bytes(Parts()) == (16 + 4 + 4) * 4 + 3 * 8 + 10 * 2
    assert measure_tensor_bytes(torch.nn.Linear(2, 3)) == (6 + 3) * 4
    assert measure_tensor_bytes(object()) == 0


def test_importing_the_registry_does_not_import_torch() -> None:
    code = "import sys, lorad.models.registry; sys.exit(1 if 'torch' in sys.modules else 0)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr or "lorad.models.registry imported torch"


def _tensor_bytes(*modules: torch.nn.Module) -> int:
    tensors = {t.data_ptr(): t for m in modules for t in (*m.parameters(), *m.buffers())}
    return sum(t.numel() * t.element_size() for t in tensors.values())


def test_tiny_sd_is_measured_and_really_released(tiny_sd: Path) -> None:
    from lorad.models.sd_loader import load_sd_components

    registry = ModelRegistry(lambda k: load_sd_components(k.base_model))
    k = ModelKey(base_model=str(tiny_sd), device="cpu", dtype="float32")

    def run_job() -> tuple[weakref.ref[torch.nn.Module], int]:
        # In a function, so no frame of this test keeps the components alive afterwards.
        with registry.use(k) as acquired:
            parts = acquired.model
            return weakref.ref(parts.unet), _tensor_bytes(parts.unet, parts.vae, parts.text_encoder)

    unet_ref, expected = run_job()
    [info] = registry.list()
    assert info.memory_bytes == expected > 0
    assert info.model_version == "sd1" and Path(info.source) == tiny_sd.resolve()
    assert unet_ref() is not None
    assert registry.unload(str(tiny_sd)) == expected
    gc.collect()
    assert unet_ref() is None, "the registry (or the test) still references the unet"
    assert registry.list() == []
