"""Which queued job starts on which devices: first in, first out, resident models first.

A job's ``devices`` (with ``device``) becomes a :class:`Want`: the workers it may use and how many.
:func:`assign` walks the queue oldest first. A job starts when enough of its workers are free; it
prefers workers where its base model is already resident. A job that cannot start yet reserves every
worker it could use: no later job takes them, so a job waiting for two devices is never overtaken by
one-device jobs that keep one of them busy (it never starves), while later jobs that need other
workers (the CPU, another GPU the waiting job did not name) still start.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass

from lorad.config.schema import DeviceRequest
from lorad.errors import ConfigError, ConfigProblem


@dataclass(frozen=True)
class Slot:
    """A worker as the scheduler sees it: its index and device ("cuda:1", "cpu", "mps")."""

    index: int
    device: str

    @property
    def kind(self) -> str:
        return self.device.partition(":")[0]


@dataclass(frozen=True)
class Want:
    """The workers a job runs on: every one of ``named`` (in order: rank 0 first), and ``count`` more of
    ``any_of``."""

    named: tuple[int, ...] = ()
    any_of: tuple[int, ...] = ()
    count: int = 0

    @property
    def ranks(self) -> int:
        return len(self.named) + self.count

    @property
    def candidates(self) -> set[int]:
        return set(self.named) | set(self.any_of)

    def choose(self, free: Collection[int], prefer: Callable[[int], bool]) -> tuple[int, ...] | None:
        """Workers from ``free`` that satisfy the want (those ``prefer`` likes first, then by index), in
        rank order; None when there are not enough."""
        if not set(self.named) <= set(free):
            return None
        others = sorted((i for i in self.any_of if i in free and i not in self.named), key=lambda i: (not prefer(i), i))
        if len(others) < self.count:
            return None
        chosen = list(self.named) + others[: self.count]
        if not self.named:  # rank 0 (the one that reports and writes) on a preferred worker when there is one
            chosen.sort(key=lambda i: (not prefer(i), i))
        return tuple(chosen)


def default_kind(slots: Sequence[Slot]) -> str:
    """Where a job that names no device trains: the GPUs when the machine has any, else the CPU."""
    kinds = {slot.kind for slot in slots}
    return next((kind for kind in ("cuda", "mps") if kind in kinds), "cpu")


def want_for(request: DeviceRequest, device: str, slots: Sequence[Slot], *, max_ranks: int | None = None) -> Want:
    """The workers a job with ``devices: request`` and ``device: device`` may run on. ConfigError (naming
    the key) when this daemon's workers cannot ever satisfy it; ``max_ranks`` caps a job's devices."""

    def problem(key: str, message: str, fix: str) -> ConfigError:
        return ConfigError([ConfigProblem(key, message, fix)], "devices")

    have = ", ".join(f"{slot.index}: {slot.device}" for slot in slots) or "none"
    by_device = {slot.device: slot.index for slot in reversed(slots)}  # the first worker of a device
    device = device.strip().lower()
    if request.names:
        named: list[int] = []
        kinds: list[str] = []
        for name in request.names:
            if name.isdigit():
                if int(name) >= len(slots):
                    raise problem("devices", f"names worker {name}", f"this daemon's workers are {have}")
                named.append(int(name))
            elif ":" in name or name == "mps":
                if name not in by_device:
                    raise problem("devices", f"names {name}", f"this daemon's workers are {have}")
                named.append(by_device[name])
            else:
                kinds.append(name)
        if len({slots[i].kind for i in named} | set(kinds)) > 1:
            raise problem("devices", "mixes device kinds", "one job's devices must all be GPUs, or all the CPU")
        kind = kinds[0] if kinds else ""
        any_of = tuple(slot.index for slot in slots if slot.kind == kind and slot.index not in named)
        want = Want(named=tuple(named), any_of=any_of, count=len(kinds))
        if len(any_of) < want.count:
            raise problem(
                "devices", f"asks for {want.ranks} devices", f"this daemon's workers are {have} (`--cpu-workers N`)"
            )
    else:
        count = request.count or 1
        if device not in ("auto", "cpu", "cuda", "mps"):  # one named device
            if count > 1:
                raise problem(
                    "devices", f"asks for {count} devices but `device` names one ({device})", "remove `device`"
                )
            if device not in by_device:
                raise problem("device", f"{device} has no worker", f"this daemon's workers are {have}")
            want = Want(named=(by_device[device],))
        else:
            kind = default_kind(slots) if device == "auto" else device
            any_of = tuple(slot.index for slot in slots if slot.kind == kind)
            if len(any_of) < count:
                found = f"{len(any_of)} {kind} worker{'s' if len(any_of) != 1 else ''}"
                fix = "ask for fewer devices" + (
                    ", or start the daemon with `--cpu-workers N`" if kind == "cpu" else ""
                )
                raise problem("devices", f"asks for {count} {kind} devices; this daemon has {found}", fix)
            want = Want(any_of=any_of, count=count)
    if max_ranks is not None and want.ranks > max_ranks:
        raise problem(
            "devices",
            f"asks for {want.ranks} devices, and this daemon runs jobs in its own process (one device each)",
            "start the daemon without --in-process to train on several devices",
        )
    return want


@dataclass(frozen=True)
class Waiting:
    """A queued job: its id, what it wants, and its base model (to prefer workers holding it)."""

    job_id: str
    want: Want
    base_model: str = ""


def assign(
    queue: Sequence[Waiting], free: Collection[int], residents: Mapping[int, Collection[str]]
) -> list[tuple[str, tuple[int, ...]]]:
    """The jobs of ``queue`` (oldest first) that start now, each with its workers (rank 0 first), given the
    ``free`` workers and each worker's resident base models."""
    available = set(free)
    reserved: set[int] = set()
    starts: list[tuple[str, tuple[int, ...]]] = []
    for job in queue:
        chosen = job.want.choose(available - reserved, lambda i, base=job.base_model: base in residents.get(i, ()))
        if chosen is None:
            reserved |= job.want.candidates  # nobody after it takes what it waits for
            continue
        starts.append((job.job_id, chosen))
        available -= set(chosen)
    return starts
