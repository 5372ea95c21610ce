"""Block swap: keep some transformer blocks' frozen weights in CPU memory, each moved to the device just before it runs.

``blocks_to_swap: N`` (kohya's name) keeps the last N blocks (in execution order) in CPU memory
(pinned on CUDA). A forward pre-hook puts a block's frozen weights on the device and starts
copying the next swapped block's weights on a side CUDA stream, so the copy overlaps this
block's compute; a forward hook puts the resting copy back. Frozen parameters and buffers move
(an fp8_base layer's per-channel scales are buffers: :mod:`lorad.models.fp8`); LoRA weights
(trainable, small) stay where the optimizer has them.

Why swap Parameter objects and never ``.data``: autograd saves the weight *objects* a block used
for its backward. Giving each run its own device Parameter keeps whatever autograd saved valid
(on the device it ran on) after the block's resting copy is back in place; the device copy is
freed when autograd lets go of it. Without activation checkpointing that is only after the
backward pass, so the memory saving needs checkpointing, which recomputes (and re-fetches) one
block at a time in backward; the pre-hook notices backward order and prefetches backwards.

On the CPU the "device" copy is a fresh copy too, so the same code path runs and tests can check
that results are bit-identical to running without swap.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn


class BlockSwap:
    """Swaps ``count`` of ``blocks`` (the last ones) between CPU memory and ``device``.

    Create it after the adapter is attached (so its frozen/trainable split is final) and call
    :meth:`remove` after the job: every block's weights are then back on ``device`` with the
    values they had (bit-identical), and the hooks are gone.
    """

    def __init__(self, blocks: Sequence[nn.Module], count: int, device: torch.device | str) -> None:
        if not 0 <= count <= len(blocks):
            raise ValueError(f"blocks_to_swap must be between 0 and {len(blocks)}, not {count}")
        self.device = torch.device(device)
        self.blocks = list(blocks)
        self.swapped = list(range(len(blocks) - count, len(blocks)))
        self._cuda = self.device.type == "cuda"
        self._copy_stream = torch.cuda.Stream(self.device) if self._cuda else None
        # block index -> [(owner module, parameter or buffer name, resting CPU tensor)]
        self._resting: dict[int, list[tuple[nn.Module, str, torch.Tensor]]] = {}
        # block index -> (device tensors in _resting order, CUDA event marking the end of their copy)
        self._prefetched: dict[int, tuple[list[torch.Tensor], torch.cuda.Event | None]] = {}
        self._last: int | None = None
        self._active: set[int] = set()  # blocks whose device copies are in place
        self._handles = []
        for index in self.swapped:
            self._resting[index] = self._move_to_cpu(self.blocks[index])
            block = self.blocks[index]
            self._handles.append(block.register_forward_pre_hook(self._pre_hook(index)))
            self._handles.append(block.register_forward_hook(self._post_hook(index)))

    def _move_to_cpu(self, block: nn.Module) -> list[tuple[nn.Module, str, torch.Tensor]]:
        resting = []
        for owner in block.modules():
            frozen = [(n, p.detach()) for n, p in owner.named_parameters(recurse=False) if not p.requires_grad]
            for name, tensor in frozen + list(owner.named_buffers(recurse=False)):
                cpu = _copy_to(tensor, torch.device("cpu"))
                if self._cuda:
                    cpu = _pinned(cpu)
                rest = _put(owner, name, cpu)
                resting.append((owner, name, rest))
        return resting

    def _copy_in(self, index: int) -> tuple[list[torch.Tensor], torch.cuda.Event | None]:
        """Start copying block ``index``'s weights to the device (on the side stream on CUDA)."""
        if not self._cuda:
            return [_copy_to(rest.detach(), self.device) for _, _, rest in self._resting[index]], None
        with torch.cuda.stream(self._copy_stream):
            tensors = [_copy_to(rest.detach(), self.device, non_blocking=True) for _, _, rest in self._resting[index]]
            event = torch.cuda.Event()
            event.record(self._copy_stream)
        return tensors, event

    def _neighbour(self, index: int) -> int | None:
        """The swapped block expected to run next: later ones in forward, earlier ones in backward recompute.

        Backward recomputation runs the blocks in reverse, starting with the one forward ran last;
        :meth:`settle` (after backward) resets the direction for the next forward.
        """
        backward = self._last is not None and index <= self._last
        position = self.swapped.index(index) + (-1 if backward else 1)
        return self.swapped[position] if 0 <= position < len(self.swapped) else None

    def _pre_hook(self, index: int):
        def hook(module: nn.Module, args: object) -> None:
            self._rest_all()  # a block whose forward hook did not run (see settle) is put to rest here
            tensors, event = self._prefetched.pop(index, None) or self._copy_in(index)
            if event is not None:
                current = torch.cuda.current_stream(self.device)
                current.wait_event(event)
                for tensor in tensors:
                    # The side stream allocated these; tell the allocator the compute stream uses them.
                    tensor.record_stream(current)
            for (owner, name, _), tensor in zip(self._resting[index], tensors, strict=True):
                _put(owner, name, tensor)
            self._active.add(index)
            following = self._neighbour(index)
            self._last = index
            if following is not None and following not in self._prefetched:
                self._prefetched[following] = self._copy_in(following)

        return hook

    def _post_hook(self, index: int):
        def hook(module: nn.Module, args: object, output: object) -> None:
            self._rest(index)

        return hook

    def _rest(self, index: int) -> None:
        for owner, name, rest in self._resting[index]:
            _put(owner, name, rest)
        self._active.discard(index)

    def settle(self) -> None:
        """Put every block back to rest and reset the direction; call once after each ``backward()``.

        A block's forward hook does not always run: activation checkpointing stops recomputing a
        block in backward as soon as it has what backward needs. Such a block keeps its device
        copy until the next block runs (or this call); autograd holds its own references, so
        putting a block to rest never takes a weight from a pending backward.
        """
        self._rest_all()
        self._last = None

    def _rest_all(self) -> None:
        for index in list(self._active):
            self._rest(index)

    def place(self, root: nn.Module, device: torch.device | str) -> None:
        """Move ``root`` (the model holding the blocks) to ``device``, except the swapped blocks,
        whose weights stay at rest in CPU memory (``root.to()`` would move those too)."""
        swapped = {id(self.blocks[i]) for i in self.swapped}

        def move(module: nn.Module) -> None:
            for child in module.children():
                if id(child) in swapped:
                    continue
                if any(id(m) in swapped for m in child.modules()):
                    move(child)
                else:
                    child.to(device)
            for param in module.parameters(recurse=False):
                param.data = param.data.to(device)
            for name, buffer in list(module.named_buffers(recurse=False)):
                module._buffers[name] = buffer.to(device)

        move(root)

    def remove(self) -> None:
        """Put every swapped block back on the device (same values) and drop the hooks."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self.settle()
        self._prefetched.clear()
        for entries in self._resting.values():
            for owner, name, rest in entries:
                _put(owner, name, _copy_to(rest.detach(), self.device))
        self._resting.clear()
        if self._cuda:
            torch.cuda.current_stream(self.device).wait_stream(self._copy_stream)


def _put(owner: nn.Module, name: str, tensor: torch.Tensor) -> torch.Tensor:
    """Make ``tensor`` ``owner``'s parameter (frozen) or buffer ``name``, whichever it is; returns what was set."""
    if name in owner._buffers:
        owner._buffers[name] = tensor
        return tensor
    param = tensor if isinstance(tensor, nn.Parameter) else nn.Parameter(tensor, requires_grad=False)
    owner._parameters[name] = param
    return param


def _plain(tensor: torch.Tensor) -> bool:
    """A plain tensor, not a quantized subclass (torchao's Int8Tensor, NF4Tensor, ...)."""
    return type(tensor) in (torch.Tensor, nn.Parameter)


def _pinned(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` in pinned memory, which lets its copy to the GPU run asynchronously. A quantized
    subclass that cannot be pinned stays in pageable memory: its copy is then synchronous (slower,
    still correct)."""
    try:
        return tensor.pin_memory()
    except (RuntimeError, NotImplementedError, TypeError):
        return tensor


def _copy_to(tensor: torch.Tensor, device: torch.device, *, non_blocking: bool = False) -> torch.Tensor:
    """``tensor`` on ``device`` in storage of its own. Quantized subclasses implement ``.to`` without
    ``copy=``; on the same device they are shared instead of copied (frozen weights are never written)."""
    moved = tensor.to(device, non_blocking=non_blocking)
    return moved.clone() if moved is tensor and _plain(tensor) else moved


def flux_blocks(transformer: nn.Module) -> list[nn.Module]:
    """A FLUX transformer's blocks in execution order: double blocks, then single blocks."""
    return [*transformer.transformer_blocks, *transformer.single_transformer_blocks]
