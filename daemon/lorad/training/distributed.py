"""Data parallelism for the one loop: a run's ranks, each on its own device, joined by torch.distributed.

Every rank holds the whole base model and the same adapter. An optimizer step's micro-batches come from
the same deterministic epoch plan on every rank, planned at the *global* micro-batch size (per-device
batch × ranks); each rank trains its own rows of every micro-batch (the family's ``split``: the pieces
that out-of-memory recovery uses, which draw the whole micro-batch's random numbers and keep their
rows), weighted by its share of the micro-batch's loss. After the step's backward passes one
all-reduce sums the adapter's gradients (and the step's loss and stop votes) over the ranks, so every
rank applies the same update to the same weights: the run is the one-device run with the global batch,
up to the order of floating-point sums.

Why not DistributedDataParallel: a family's ``loss`` calls its modules directly (a UNet and a text
encoder, possibly compiled), so a DDP wrapper would have to be threaded into every family; DDP's
construction broadcasts the whole module (the frozen base, gigabytes) and hooks the resident model;
and LoRA gradients are a few megabytes, so overlapping their all-reduce with the backward pass (what
DDP's buckets buy) saves little against one flat all-reduce per optimizer step, which also needs no
``no_sync`` for accumulation. See README "Several GPUs".

Rank 0 is the reporting rank: it alone touches ``output_dir`` (lock, checkpoints, outputs, the summary)
and sends events. What only it reads (the data scan, with captioning; the resume checkpoint) is
broadcast to the others (:meth:`Ranks.share`), so every rank trains on exactly the same data even when
a watched folder changes meanwhile.
"""

from __future__ import annotations

import copyreg
import datetime
import io
import os
import pickle
import socket
import types
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

import torch

from lorad.errors import ConfigError, ConfigProblem, LoradError

if TYPE_CHECKING:
    from lorad.training.family import FamilyRun

T = TypeVar("T")

# How long a collective (or the rendezvous) waits for a missing rank before it fails. Rank 0 alone
# evaluates, samples and writes checkpoints while the others wait at the next all-reduce, so this is long.
COLLECTIVE_TIMEOUT = datetime.timedelta(minutes=30)
# The environment torchrun (or a Slurm script) sets for each rank.
RANK_VARIABLES = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


class OtherRankFailed(LoradError):
    """What the other ranks raise when rank 0 failed on something only it does (the data scan, opening
    ``output_dir``); rank 0's own error is the one that counts."""


@dataclass(frozen=True)
class Ranks:
    """This process's place in a run: ``rank`` of ``world`` (one device each). ``Ranks()`` is the
    single-device run, where every method is free and does nothing."""

    world: int = 1
    rank: int = 0
    # The process-local device rank of this rank (torchrun's LOCAL_RANK): which GPU of its machine.
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        """Whether this rank reports: events, checkpoints, outputs."""
        return self.rank == 0

    def check_family(self, run: FamilyRun, family: str) -> None:
        """ConfigError when the run cannot give each rank its rows of a micro-batch."""
        if self.world > 1 and not hasattr(run, "split"):
            raise ConfigError(
                [
                    ConfigProblem(
                        "devices",
                        f"the `{family}` model family cannot split a micro-batch between devices",
                        "train it on one device (`devices: 1`)",
                    )
                ]
            )

    def shard(self, run: FamilyRun, micro_batch: Any, per_device: int) -> tuple[Any, float] | None:
        """This rank's rows of a planned (global) micro-batch and their share of its loss; None when
        the micro-batch is too small to reach this rank (its gradients count as zero)."""
        if self.world == 1:
            return micro_batch, 1.0
        pieces = run.split(micro_batch, per_device)
        return pieces[self.rank] if self.rank < len(pieces) else None

    def reduce(self, params: Sequence[torch.Tensor], values: torch.Tensor) -> torch.Tensor:
        """Sum ``params``' gradients and the 1-D ``values`` over all ranks, in place, in one all-reduce;
        return the summed values. Queued on the device: the host does not wait for it (NCCL).

        A rank whose shard was empty adds zeros. A parameter that no rank has a gradient for gets a zero
        gradient rather than none (knowing that would cost a host read every step); an adapter's
        parameters all take part in every forward pass, so this does not arise in practice."""
        if self.world == 1:
            return values
        import torch.distributed as dist

        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        flat = torch.cat([*(g.detach().reshape(-1).to(values.device, torch.float32) for g in grads), values.float()])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        sizes = [p.numel() for p in params]
        offset = sum(sizes)
        for p, chunk in zip(params, flat[:offset].split(sizes), strict=True):
            summed = chunk.view_as(p).to(p.dtype)
            if p.grad is None:
                p.grad = summed.clone()
            else:
                p.grad.copy_(summed)
        return flat[offset:].to(values.dtype)

    def broadcast_(self, tensors: Sequence[torch.Tensor]) -> None:
        """Give every rank rank 0's values of ``tensors`` (in place)."""
        if self.world == 1:
            return
        import torch.distributed as dist

        with torch.no_grad():
            for tensor in tensors:
                dist.broadcast(tensor.data, src=0)

    def share(self, compute: Callable[[], T]) -> T:
        """``compute()`` on rank 0, its result handed to every rank (pickled). An exception on rank 0
        is raised there and, as :class:`OtherRankFailed`, on the others: no rank is left waiting."""
        if self.world == 1:
            return compute()
        import torch.distributed as dist

        box: list[Any] = [None]
        error: BaseException | None = None
        if self.is_main:
            try:
                box[0] = _dumps(("ok", compute()))
            except BaseException as err:  # every rank must hear of it, then it is raised here
                error = err
                box[0] = _dumps(("error", f"{err}", getattr(err, "hint", "")))
        dist.broadcast_object_list(box, src=0)
        if error is not None:
            raise error
        answer = pickle.loads(box[0])
        if answer[0] == "error":
            raise OtherRankFailed(f"rank 0 failed: {answer[1]}", answer[2])
        return answer[1]


SINGLE = Ranks()


def resume_batch_problem(saved: object, per_device: int, world: int) -> ConfigError | None:
    """Why a checkpoint cannot be resumed at this batch, or None. A checkpoint keeps the global micro-batch
    (batch_size × devices) it was trained with: a resume may use another number of devices when
    batch_size × devices stays the same (the run then goes on exactly as it would have)."""
    if not isinstance(saved, int) or saved == per_device * world:
        return None
    fits = [n for n in range(1, saved + 1) if saved % n == 0]
    fix = (
        f"train {saved} samples per micro-batch again: batch_size {saved // world} on {world} devices"
        if saved % world == 0
        else (f"resume on a number of devices that divides {saved} ({', '.join(map(str, fits))})")
    )
    return ConfigError(
        [
            ConfigProblem(
                "batch_size",
                f"the checkpoint was trained with {saved} samples per micro-batch (batch_size × devices); this run "
                f"has {per_device} × {world} = {per_device * world}",
                fix + ", or start a new run without resume_from",
            )
        ],
        "resume_from",
    )


def _dumps(value: Any) -> bytes:
    """``value`` pickled, read-only mappings (frozen reports use them) as the dicts they wrap."""
    buffer = io.BytesIO()
    pickler = pickle.Pickler(buffer, protocol=pickle.HIGHEST_PROTOCOL)
    pickler.dispatch_table = copyreg.dispatch_table | {types.MappingProxyType: lambda m: (read_only, (dict(m),))}
    pickler.dump(value)
    return buffer.getvalue()


def read_only(mapping: dict[Any, Any]) -> types.MappingProxyType:
    """A read-only view of ``mapping`` (how :func:`_dumps`'s pickles rebuild one)."""
    return types.MappingProxyType(mapping)


def backend_for(device: torch.device) -> str:
    """The collective library for a device type: NCCL between GPUs, gloo on the CPU."""
    return "nccl" if device.type == "cuda" else "gloo"


def loopback_interface() -> str | None:
    """The name of the loopback network interface ("lo" on Linux, "lo0" on macOS), or None."""
    try:
        names = [name for _, name in socket.if_nameindex()]
    except OSError:  # pragma: no cover - no interface table
        return None
    return next((name for name in names if name.startswith("lo")), None)


def join_local_group(*, rank: int, world: int, device: torch.device, store_path: str) -> Ranks:
    """Join a process group of ``world`` ranks on this machine, meeting through a FileStore at
    ``store_path`` (in the daemon's private state folder: nobody else can join or read it). Peers talk
    over the loopback interface only. Call :func:`leave_group` when the run is over."""
    import torch.distributed as dist

    interface = loopback_interface()
    if interface:
        # Gloo and NCCL's bootstrap otherwise bind the address the host name resolves to (often a LAN one).
        os.environ.setdefault("GLOO_SOCKET_IFNAME", interface)
        os.environ.setdefault("NCCL_SOCKET_IFNAME", interface)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    store = dist.FileStore(store_path, world)
    dist.init_process_group(backend_for(device), store=store, rank=rank, world_size=world, timeout=COLLECTIVE_TIMEOUT)
    return Ranks(world=world, rank=rank, local_rank=device.index or 0)


def leave_group() -> None:
    """Leave the process group this process joined, if any (safe to call twice)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def launched_by_torchrun(environ: dict[str, str] | None = None) -> bool:
    """Whether this process is one rank of a job started by torchrun (or srun with the same variables)."""
    env = os.environ if environ is None else environ
    return all(name in env for name in RANK_VARIABLES)


def join_launched_group(device_request: str) -> tuple[Ranks, torch.device]:
    """Join the process group torchrun (or Slurm) described in the environment (``env://``): RANK,
    WORLD_SIZE, MASTER_ADDR, MASTER_PORT and LOCAL_RANK. The rank's device is its machine's GPU
    LOCAL_RANK when the config's ``device`` allows CUDA and there is one, else the CPU."""
    import torch.distributed as dist

    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device_request in ("auto", "cuda") and torch.cuda.is_available():
        device = torch.device("cuda", local_rank % torch.cuda.device_count())
        torch.cuda.set_device(device)
    elif device_request.startswith("cuda"):
        device = torch.device(device_request)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    dist.init_process_group(backend_for(device), init_method="env://", timeout=COLLECTIVE_TIMEOUT)
    return Ranks(world=dist.get_world_size(), rank=dist.get_rank(), local_rank=local_rank), device
