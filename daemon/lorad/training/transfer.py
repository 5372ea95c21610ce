"""Host → device copies that do not make the host wait.

A copy from ordinary (pageable) host memory to a GPU is synchronous: the host waits until the
device has taken the bytes, which is until everything queued before it has run. From page-locked
(pinned) memory with ``non_blocking=True`` the copy is queued like a kernel and the host moves on.
torch's pinned-memory allocator keeps each block until the copies that read it have finished, so a
pinned tensor may be dropped right after its copy is queued.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def to_device(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``tensor`` on ``device``; a host tensor goes to a GPU through pinned memory without blocking."""
    if device.type != "cuda" or tensor.device.type != "cpu":
        return tensor.to(device)
    return tensor.pin_memory().to(device, non_blocking=True)


def stack_to_device(tensors: Sequence[torch.Tensor], device: torch.device) -> torch.Tensor:
    """``torch.stack(tensors)`` on ``device``; host tensors are stacked straight into pinned memory
    (one copy fewer than stacking, then pinning) and sent without blocking."""
    if device.type != "cuda" or tensors[0].device.type != "cpu":
        return torch.stack(list(tensors)).to(device)
    first = tensors[0]
    out = torch.empty((len(tensors), *first.shape), dtype=first.dtype, pin_memory=True)
    torch.stack(list(tensors), out=out)
    return out.to(device, non_blocking=True)
