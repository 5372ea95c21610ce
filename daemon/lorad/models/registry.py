"""The resident model registry: base models stay loaded across training jobs.

The first job on a base model loads it; later jobs on the same :class:`ModelKey` reuse the loaded
object ("resident"). A model left idle longer than its keep-alive is unloaded by
:meth:`ModelRegistry.evict_expired` (the daemon calls it from a timer thread), and an optional
memory budget unloads least-recently-used idle models after each load.

The registry is generic over what a model is: it only calls the ``loader`` it was given, so tests
use small fakes and the daemon uses :class:`lorad.models.sd_components.SDComponents` for base models
and :mod:`lorad.captioning` captioners, told apart by :attr:`ModelKey.kind`.

Threading: every public method may be called from any thread. One lock guards the bookkeeping and
is never held while user code runs (``loader``, ``measure``, ``describe``) or while memory is
freed, so :meth:`ModelRegistry.list` answers while a model loads. Concurrent requests for a key
that is being loaded wait for that one load instead of starting another.

Importing this module never imports torch: the daemon imports it at start-up, and torch is only
needed once a model has been loaded (by which time the loader has imported it).
"""

from __future__ import annotations

import dataclasses
import gc
import hashlib
import json
import logging
import math
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from lorad.errors import LoradError
from lorad.models.construction import MODULE_CONSTRUCTION

log = logging.getLogger(__name__)

T = TypeVar("T")

DEFAULT_KEEP_ALIVE_SECONDS = 1800.0


class ModelInUse(LoradError):
    """The model cannot be unloaded now: a job is using it (or it is still being loaded)."""

    def __init__(self, message: str) -> None:
        super().__init__(message, hint="Wait for the job using it to finish, or cancel that job, then try again.")


class ModelNotResident(LoradError):
    """No resident model matches the id or base model given."""

    def __init__(self, message: str) -> None:
        super().__init__(message, hint="`lorad models` lists the resident models with their ids.")


@dataclass(frozen=True)
class ModelKey:
    """Everything that makes two loaded models interchangeable.

    Two jobs share a resident model exactly when their keys are equal, so every field that changes
    what the loader produces belongs here. ``base_model`` should already be resolved (an absolute
    path or a hub id): ``./sd15`` and ``/models/sd15`` would otherwise be two models. ``dtype`` is
    a torch dtype name ("float32", "bfloat16", "float16"); ``device`` a torch device ("cpu",
    "cuda:0", ...). ``kind`` says what the model is for: a model family's name ("sd", "llm", ...: a
    base model to train on), or a captioner kind ("blip", "wd14", "clip"; ``base_model`` is then the
    captioner's model folder); the daemon's loader dispatches on it. ``options`` hold a family's own
    settings that change what its loader produces.
    """

    base_model: str
    device: str
    dtype: str
    model_config_dir: str = ""
    tokenizer_path: str = ""
    prediction_type: str = "auto"
    kind: str = "sd"
    # Whether the loader may read pickle weights: True only for a model that has no others (see
    # lorad.config.pickle_policy.needs_pickle), so one safetensors model is one key either way.
    allow_pickle: bool = False
    options: tuple[tuple[str, str], ...] = ()

    def option(self, name: str, default: str = "") -> str:
        """A family's own load setting (``options`` holds them as sorted name/value pairs, e.g. a Flux
        model's separate VAE file)."""
        return dict(self.options).get(name, default)

    @property
    def model_id(self) -> str:
        """First 12 hex digits of SHA-256 over all fields: short, and equal exactly for equal keys.

        Stable within a lorad version (not persisted anywhere, so adding a field later is harmless).
        """
        # JSON with field names is unambiguous: no choice of field values makes two keys hash alike.
        payload = json.dumps(dataclasses.asdict(self), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(payload.encode("utf-8")).hexdigest()[:12]


@dataclass(frozen=True)
class ResidentInfo:
    """A snapshot of one resident model, as :meth:`ModelRegistry.list` reports it.

    - ``source``/``model_version``: from the registry's ``describe`` (``source`` falls back to
      ``key.base_model`` when describe gives none).
    - ``memory_bytes``: measured once, right after loading.
    - ``loaded_at``/``last_used_at``: wall-clock times (``time.time()`` by default).
    - ``keep_alive_seconds_left``: seconds until :meth:`ModelRegistry.evict_expired` unloads it if
      nobody uses it; while ``in_use`` the countdown has not started, so this is the whole
      keep-alive. ``math.inf`` for a model kept forever.
    """

    model_id: str
    key: ModelKey
    source: str
    model_version: str
    memory_bytes: int
    loaded_at: float
    last_used_at: float
    keep_alive_seconds_left: float
    in_use: bool


@dataclass(frozen=True)
class Acquired(Generic[T]):
    """What :meth:`ModelRegistry.use` gives a job.

    ``resident`` is True when the model was already loaded when the job asked; ``load_seconds`` is
    how long this request waited for a load (its own, or a concurrent request's for the same key),
    0.0 when resident.
    """

    model: T
    resident: bool
    load_seconds: float
    model_id: str


class _Entry:
    """Bookkeeping of one resident model; mutated only under the registry lock.

    Deliberately mutable and private: use counts and timestamps change on every use, and callers
    only ever see frozen :class:`ResidentInfo` snapshots.
    """

    __slots__ = (
        "in_use",
        "keep_alive",
        "key",
        "last_used",
        "last_used_wall",
        "loaded_at_wall",
        "memory_bytes",
        "model",
        "model_version",
        "recency",
        "source",
    )

    def __init__(
        self,
        key: ModelKey,
        model: Any,
        *,
        source: str,
        model_version: str,
        memory_bytes: int,
        keep_alive: float,
        now: float,
        now_wall: float,
        recency: int,
    ) -> None:
        self.key = key
        self.model: Any = model
        self.source = source
        self.model_version = model_version
        self.memory_bytes = memory_bytes
        self.keep_alive = keep_alive
        self.loaded_at_wall = now_wall
        self.last_used = now
        self.last_used_wall = now_wall
        self.recency = recency
        self.in_use = 0


class _Loading:
    """A load in progress: concurrent requests for the same key wait on ``done`` instead of loading.

    ``claims`` counts the ``use()`` requests (the loading one included) that will hold the model
    once it is there; they become the entry's ``in_use`` at the moment it is installed, so no
    eviction can slip in between the load finishing and the waiters taking the model.
    """

    __slots__ = ("claims", "done", "entry", "error", "key", "model")

    def __init__(self, key: ModelKey) -> None:
        self.key = key
        self.done = threading.Event()
        self.claims = 0
        self.entry: _Entry | None = None
        # The model itself, for the waiters: the entry may be unloaded (close()) before they wake.
        self.model: Any = None
        self.error: BaseException | None = None


def measure_tensor_bytes(model: object) -> int:
    """Bytes of tensor memory held by ``model``: the default ``measure`` of :class:`ModelRegistry`.

    Counts the parameters and buffers of ``model`` itself if it is a ``torch.nn.Module``, else of
    every ``nn.Module`` attribute (for :class:`~lorad.models.sd_components.SDComponents`: unet, vae,
    text_encoder), plus plain tensor attributes. Each underlying storage is counted once, whole, so
    tied weights are not counted twice. Meta tensors hold no memory and count 0.
    """
    torch = sys.modules.get("torch")
    if torch is None:
        # Nothing can hold a tensor if torch was never imported; and measuring must not import it.
        return 0
    if isinstance(model, torch.nn.Module):
        candidates: list[object] = [model]
    else:
        candidates = list(_attribute_values(model))
    seen: set[tuple[str, int]] = set()
    total = 0
    for candidate in candidates:
        if isinstance(candidate, torch.nn.Module):
            tensors = [*candidate.parameters(), *candidate.buffers()]
        elif isinstance(candidate, torch.Tensor):
            tensors = [candidate]
        else:
            continue
        for tensor in tensors:
            if tensor.device.type == "meta" or tensor.is_sparse:
                continue
            storage = tensor.untyped_storage()
            ident = (str(tensor.device), storage.data_ptr())
            if ident in seen:
                continue
            seen.add(ident)
            total += storage.nbytes()
    return total


def _attribute_values(obj: object) -> Iterator[object]:
    """Instance attribute values of ``obj``, whether it keeps them in ``__dict__`` or ``__slots__``."""
    if hasattr(obj, "__dict__"):
        yield from vars(obj).values()
    for cls in type(obj).__mro__:
        for name in getattr(cls, "__slots__", ()):
            if name not in ("__dict__", "__weakref__") and hasattr(obj, name):
                yield getattr(obj, name)


def describe_by_attributes(model: object) -> tuple[str, str]:
    """``(source, model_version)`` from the attributes of those names, "" where absent.

    The default ``describe`` of :class:`ModelRegistry`; fits :class:`SDComponents`.
    """
    return str(getattr(model, "source", "") or ""), str(getattr(model, "model_version", "") or "")


def free_memory() -> None:
    """Return memory of objects that just lost their last reference: collect cycles, empty caches.

    Call it after dropping references, never while holding a lock (a full collection can take a
    noticeable time with large models).
    """
    # nn.Modules routinely sit in reference cycles (hooks, parent links), so refcounting alone
    # does not free them.
    gc.collect()
    torch = sys.modules.get("torch")
    # Only a process that has initialised CUDA has cached blocks to give back; asking otherwise
    # would create a CUDA context (hundreds of MB) in a process that may train on the CPU.
    if torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.empty_cache()


def _check_keep_alive(keep_alive: float | None) -> None:
    if keep_alive is not None and (math.isnan(keep_alive) or keep_alive < 0):
        raise ValueError(f"keep_alive must be >= 0 seconds (math.inf: never unload), not {keep_alive!r}")


class ModelRegistry(Generic[T]):
    """Keeps loaded base models resident across jobs; thread-safe.

    - ``loader(key)`` loads a model; it runs without the registry lock held, and one load at a time
      in the process (``MODULE_CONSTRUCTION``: the libraries' fast loading patches torch globally).
      Its exceptions propagate to the caller and leave nothing behind.
    - ``default_keep_alive``: seconds an idle model stays loaded (``math.inf``: until unloaded).
    - ``memory_budget_bytes``: after each load, while the measured total exceeds it, the
      least-recently-used model that is not in use (and is not the one just loaded) is unloaded.
      If that cannot bring the total under the budget, the load still succeeds and a warning is
      logged: a job is never failed for the budget's sake. The budget is checked only after loads,
      so the total may stay above it until the next load or keep-alive expiry. It counts all
      devices together; use one registry per device for per-device budgets.
    - ``measure(model)``: bytes the model holds (default :func:`measure_tensor_bytes`), called once
      per load.
    - ``describe(model)``: ``(source, model_version)`` (default :func:`describe_by_attributes`).
    - ``clock``: monotonic seconds for keep-alive and timings; ``wall_clock``: the times reported.

    Unloading drops every reference the registry holds, then collects garbage and empties the CUDA
    cache. Memory is actually returned only if nobody else still references the model, so callers
    must not keep ``Acquired.model`` beyond their ``use()`` block.
    """

    def __init__(
        self,
        loader: Callable[[ModelKey], T],
        *,
        default_keep_alive: float = DEFAULT_KEEP_ALIVE_SECONDS,
        memory_budget_bytes: int | None = None,
        measure: Callable[[T], int] = measure_tensor_bytes,
        describe: Callable[[T], tuple[str, str]] = describe_by_attributes,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        _check_keep_alive(default_keep_alive)
        if memory_budget_bytes is not None and memory_budget_bytes < 0:
            raise ValueError(f"memory_budget_bytes must be >= 0 or None, not {memory_budget_bytes!r}")
        self._loader = loader
        self._default_keep_alive = default_keep_alive
        self._budget = memory_budget_bytes
        self._measure = measure
        self._describe = describe
        self._clock = clock
        self._wall_clock = wall_clock
        self._lock = threading.Lock()
        self._entries: dict[str, _Entry] = {}
        self._loading: dict[str, _Loading] = {}
        # A counter, not the clock, orders recency: an injected or coarse clock can tie.
        self._recency = 0
        self._closed = False

    # ----------------------------------------------------------------------------------- public

    @contextmanager
    def use(self, key: ModelKey, *, keep_alive: float | None = None) -> Iterator[Acquired[T]]:
        """Hold the model for ``key`` during the block, loading it first if it is not resident.

        While the block runs the model is in use: it is never evicted and :meth:`unload` refuses
        it. When the block ends its last use is now and its keep-alive countdown restarts.
        ``keep_alive`` (seconds) replaces the model's keep-alive from now on.

        Concurrent calls for a key being loaded wait for that load; if it fails, they all raise
        its exception. Raises RuntimeError after :meth:`close`. Do not keep the yielded object
        (or its model) after the block: the name bound by ``with ... as`` outlives the block.
        """
        _check_keep_alive(keep_alive)
        entry, model, resident, seconds = self._acquire(key, keep_alive, claim=True)
        try:
            yield Acquired(model=model, resident=resident, load_seconds=seconds, model_id=key.model_id)
        finally:
            self._release(entry, keep_alive)

    def load(self, key: ModelKey, *, keep_alive: float | None = None) -> tuple[ResidentInfo, bool]:
        """Make ``key`` resident without using it (a preload); True when it already was.

        Counts as a use: the keep-alive countdown restarts now, and ``keep_alive`` (seconds)
        replaces the model's keep-alive from now on. Loader errors propagate; RuntimeError after
        :meth:`close`.
        """
        _check_keep_alive(keep_alive)
        entry, _, resident, _ = self._acquire(key, keep_alive, claim=False)
        with self._lock:
            return self._info(entry, self._clock()), resident

    def unload(self, model: str) -> int:
        """Unload resident models whose id or ``base_model`` equals ``model``; return bytes freed.

        A base model loaded under several keys (devices, dtypes) unloads them all, or none: raises
        :class:`ModelInUse` if any of them is in use or still loading, :class:`ModelNotResident`
        if nothing matches. The bytes are those measured at load time.
        """
        with self._lock:
            matches = [e for mid, e in self._entries.items() if model in (mid, e.key.base_model)]
            busy = [e for e in matches if e.in_use]
            loading = [mid for mid, p in self._loading.items() if model in (mid, p.key.base_model)]
            if busy:
                raise ModelInUse(f"model {model!r} ({busy[0].key.model_id}) is in use by a job")
            if loading:
                raise ModelInUse(f"model {model!r} ({loading[0]}) is still being loaded")
            if not matches:
                raise ModelNotResident(f"no resident model has id or base model {model!r}")
            freed = self._remove(matches, reason="unloaded on request")
        free_memory()
        return freed

    def list(self) -> list[ResidentInfo]:
        """Snapshots of all resident models, most recently used first (models still loading are
        not listed)."""
        with self._lock:
            now = self._clock()
            entries = sorted(self._entries.values(), key=lambda e: e.recency, reverse=True)
            return [self._info(e, now) for e in entries]

    def evict_expired(self) -> list[str]:
        """Unload every idle model whose keep-alive has run out; return their ids.

        A model expires when ``now >= last use + keep_alive`` (keep-alive 0: at the first call
        after its use). Models in use never expire.
        """
        with self._lock:
            now = self._clock()
            expired = [e for e in self._entries.values() if not e.in_use and now >= e.last_used + e.keep_alive]
            self._remove(expired, reason="keep-alive expired")
        if expired:
            free_memory()
        return [e.key.model_id for e in expired]

    def close(self) -> None:
        """Unload every resident model and refuse further loads (daemon shutdown).

        Jobs still inside a ``use()`` block keep their model until the block ends; a load still
        running completes for its callers but is not kept. Calling it twice is harmless.
        """
        with self._lock:
            self._closed = True
            self._remove(list(self._entries.values()), reason="registry closed")
        free_memory()

    # ---------------------------------------------------------------------------------- private

    def _acquire(self, key: ModelKey, keep_alive: float | None, *, claim: bool) -> tuple[_Entry, Any, bool, float]:
        """The entry for ``key``, loading it if needed; with ``claim`` it is counted as in use.

        Returns (entry, model, was resident, seconds waited for a load). The model is returned
        separately because the entry may be unloaded (close()) as soon as the lock is released.
        """
        model_id = key.model_id
        with self._lock:
            if self._closed:
                raise RuntimeError("the model registry is closed")
            entry = self._entries.get(model_id)
            if entry is not None:
                self._touch(entry, keep_alive)
                if claim:
                    entry.in_use += 1
                return entry, entry.model, True, 0.0
            pending = self._loading.get(model_id)
            if pending is None:
                pending = _Loading(key)
                self._loading[model_id] = pending
                loads_here = True
            else:
                loads_here = False
            if claim:
                pending.claims += 1
        start = self._clock()
        if loads_here:
            entry = self._load(key, pending, keep_alive)
        else:
            entry = self._wait(key, pending, keep_alive, claim=claim)
        return entry, pending.model, False, self._clock() - start

    def _load(self, key: ModelKey, pending: _Loading, keep_alive: float | None) -> _Entry:
        """Run the loader for ``key`` (lock not held), install the result, enforce the budget."""
        model_id = key.model_id
        try:
            with MODULE_CONSTRUCTION:  # one load at a time in the process: see lorad.models.construction
                model = self._loader(key)
            memory_bytes = int(self._measure(model))
            source, model_version = self._describe(model)
        except BaseException as error:
            with self._lock:
                del self._loading[model_id]
                pending.error = error
            pending.done.set()
            log.warning("loading %s (%s) failed: %s", key.base_model, model_id, error)
            raise
        victims: list[_Entry] = []
        with self._lock:
            del self._loading[model_id]
            self._recency += 1
            entry = _Entry(
                key,
                model,
                source=source or key.base_model,
                model_version=model_version,
                memory_bytes=memory_bytes,
                keep_alive=self._default_keep_alive if keep_alive is None else keep_alive,
                now=self._clock(),
                now_wall=self._wall_clock(),
                recency=self._recency,
            )
            entry.in_use = pending.claims
            pending.entry = entry
            pending.model = model
            if not self._closed:
                self._entries[model_id] = entry
                victims = self._over_budget(entry)
                self._remove(victims, reason="memory budget")
        # The waiters' claims are already counted in entry.in_use, so waking them late is safe.
        pending.done.set()
        log.info("loaded %s (%s): %d bytes", key.base_model, model_id, memory_bytes)
        if victims:
            free_memory()
        return entry

    def _wait(self, key: ModelKey, pending: _Loading, keep_alive: float | None, *, claim: bool) -> _Entry:
        """Wait for another thread's load of ``key``; re-raise its error, or return its entry."""
        try:
            pending.done.wait()
        except BaseException:
            # Interrupted while waiting (KeyboardInterrupt in the main thread): hand back the claim
            # so the model does not stay "in use" forever.
            if claim:
                with self._lock:
                    if pending.entry is not None:
                        pending.entry.in_use -= 1
                    else:
                        pending.claims -= 1
            raise
        if pending.error is not None:
            raise pending.error
        entry = pending.entry
        assert entry is not None  # done is set only after an entry or an error is recorded
        with self._lock:
            # The claim was counted at install time; only recency and keep-alive remain to record.
            if self._entries.get(key.model_id) is entry:
                self._touch(entry, keep_alive)
        return entry

    def _release(self, entry: _Entry, keep_alive: float | None) -> None:
        """End one use of ``entry``: its keep-alive countdown starts now."""
        with self._lock:
            entry.in_use -= 1
            # An entry unloaded meanwhile (close()) needs no bookkeeping, and must not be revived.
            if self._entries.get(entry.key.model_id) is entry:
                self._touch(entry, keep_alive)

    def _touch(self, entry: _Entry, keep_alive: float | None) -> None:
        """Record a use now (lock held)."""
        self._recency += 1
        entry.recency = self._recency
        entry.last_used = self._clock()
        entry.last_used_wall = self._wall_clock()
        if keep_alive is not None:
            entry.keep_alive = keep_alive

    def _over_budget(self, loaded: _Entry) -> list[_Entry]:
        """Idle entries to unload, least recently used first, to fit the budget (lock held)."""
        if self._budget is None:
            return []
        total = sum(e.memory_bytes for e in self._entries.values())
        candidates = sorted(
            (e for e in self._entries.values() if e is not loaded and not e.in_use),
            key=lambda e: e.recency,
        )
        victims = []
        for candidate in candidates:
            if total <= self._budget:
                break
            victims.append(candidate)
            total -= candidate.memory_bytes
        if total > self._budget:
            log.warning(
                "resident models use %d bytes, over the budget of %d: the rest are in use or just loaded",
                total,
                self._budget,
            )
        return victims

    def _remove(self, entries: list[_Entry], *, reason: str) -> int:
        """Forget ``entries`` and drop the registry's references to their models (lock held).

        The caller runs :func:`free_memory` after releasing the lock. Returns the bytes measured.
        """
        freed = 0
        for entry in entries:
            del self._entries[entry.key.model_id]
            # A job still inside use() keeps its own reference; the registry keeps none.
            entry.model = None
            freed += entry.memory_bytes
            log.info(
                "unloaded %s (%s, %d bytes): %s", entry.key.base_model, entry.key.model_id, entry.memory_bytes, reason
            )
        return freed

    def _info(self, entry: _Entry, now: float) -> ResidentInfo:
        """A frozen snapshot of ``entry`` (lock held)."""
        # In use, the countdown has not started: it restarts from the full keep-alive at release.
        left = entry.keep_alive if entry.in_use else max(0.0, entry.last_used + entry.keep_alive - now)
        return ResidentInfo(
            model_id=entry.key.model_id,
            key=entry.key,
            source=entry.source,
            model_version=entry.model_version,
            memory_bytes=entry.memory_bytes,
            loaded_at=entry.loaded_at_wall,
            last_used_at=entry.last_used_wall,
            keep_alive_seconds_left=left,
            in_use=entry.in_use > 0,
        )
