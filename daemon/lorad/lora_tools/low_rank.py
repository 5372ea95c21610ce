"""The SVD arithmetic behind resize, merge-to-rank and extract.

A LoRA module's update is ``scale * up @ down`` (``up``: out x r, ``down``: r x in, conv kernels
flattened to r x in*k*k). Its SVD never needs the full out x in matrix: with ``up = Qu Ru`` and
``down.T = Qd Rd`` (thin QR), ``up @ down = Qu (Ru Rd.T) Qd.T`` and only the small r x r core is
decomposed. Dense differences (extract) use a full thin SVD.

Rank choice follows kohya's ``resize_lora.py``: a fixed rank, or dynamic: ``sv_ratio`` (keep singular
values above the largest / N), ``sv_fro`` (keep the smallest rank whose Frobenius norm reaches the
fraction) and ``sv_cumulative`` (the smallest rank whose sum of singular values reaches the fraction).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

DYNAMIC_METHODS = ("sv_ratio", "sv_fro", "sv_cumulative")


@dataclass(frozen=True)
class Factors:
    """``U @ diag(S) @ Vh`` of one update, singular values in descending order."""

    u: torch.Tensor  # out x k
    s: torch.Tensor  # k
    vh: torch.Tensor  # k x in


def svd_of_product(up: torch.Tensor, down: torch.Tensor) -> Factors:
    """The exact thin SVD of ``up @ down`` (2-D, fp32 or fp64) through the QR of each factor."""
    qu, ru = torch.linalg.qr(up)
    qd, rd = torch.linalg.qr(down.T)
    core_u, s, core_vh = torch.linalg.svd(ru @ rd.T, full_matrices=False)
    return Factors(qu @ core_u, s, core_vh @ qd.T)


def svd_of_matrix(matrix: torch.Tensor) -> Factors:
    """The thin SVD of a dense 2-D matrix."""
    if matrix.shape[0] < matrix.shape[1]:
        # A wide matrix (a feed-forward down projection, 1280 x 5120 in SD1.5) through its transpose: the
        # same factors, and LAPACK's divide and conquer takes about 2.5x less time on the tall form.
        u, s, vh = torch.linalg.svd(matrix.T, full_matrices=False)
        return Factors(vh.T, s, u.T)
    u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
    return Factors(u, s, vh)


def choose_rank(s: torch.Tensor, *, rank: int | None, method: str | None = None, target: float | None = None) -> int:
    """How many singular values to keep: ``rank`` caps it; ``method``/``target`` pick it dynamically.

    Dynamic choices are at least 1 and, as in kohya, at most ``len(s) - 1`` unless that is 0.
    Zero singular values are never kept (a rank-deficient update keeps only its true rank, but at least 1).
    """
    available = len(s)
    keep = available if rank is None else min(rank, available)
    if method is not None:
        assert target is not None
        if method == "sv_ratio":
            chosen = int(torch.sum(s > s[0] / target).item())
        elif method == "sv_fro":
            squares = s.double().pow(2)
            cumulative = torch.cumsum(squares, 0) / squares.sum().clamp_min(1e-300)
            chosen = int(torch.searchsorted(cumulative, torch.tensor(target**2, dtype=cumulative.dtype))) + 1
        elif method == "sv_cumulative":
            cumulative = torch.cumsum(s.double(), 0) / s.double().sum().clamp_min(1e-300)
            chosen = int(torch.searchsorted(cumulative, torch.tensor(target, dtype=cumulative.dtype))) + 1
        else:
            raise ValueError(f"unknown dynamic method {method!r}")
        chosen = max(1, min(chosen, available - 1 if available > 1 else 1))
        keep = min(keep, chosen)
    nonzero = int(torch.sum(s > 0).item())
    return max(1, min(keep, nonzero or 1))


def energy_kept(s: torch.Tensor, k: int) -> float:
    """The fraction of the Frobenius norm (sqrt of the squared singular values' share) the first k keep."""
    total = float(s.double().pow(2).sum())
    return 1.0 if total == 0 else float(s[:k].double().pow(2).sum() / total) ** 0.5


def split_factors(f: Factors, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(up, down) of rank ``k`` with ``up @ down`` = the rank-k truncation; the singular values are
    shared as sqrt(S) on each side so neither factor's magnitude dwarfs the other's in fp16."""
    root = f.s[:k].sqrt()
    return f.u[:, :k] * root, root[:, None] * f.vh[:k]
