"""Minimal torch.distributed helpers that degrade to no-ops in a single process.

The loss and centering code must give identical results with and without a process group, so every
collective goes through these helpers instead of calling torch.distributed directly.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist


def is_dist() -> bool:
    """True when a default process group exists (e.g. under Lightning DDP or torchrun)."""
    return dist.is_available() and dist.is_initialized()


def world_size() -> int:
    """Number of processes in the default group; 1 without a process group."""
    return dist.get_world_size() if is_dist() else 1


def rank() -> int:
    """This process's rank in the default group; 0 without a process group."""
    return dist.get_rank() if is_dist() else 0


def all_reduce_sum_(t: torch.Tensor) -> torch.Tensor:
    """Sum ``t`` in place over all ranks; returns ``t`` (unchanged without a process group)."""
    if is_dist():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def all_reduce_max_(t: torch.Tensor) -> torch.Tensor:
    """Element-wise max of ``t`` in place over all ranks; returns ``t``."""
    if is_dist():
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t


def all_reduce_sum_async_(t: torch.Tensor) -> dist.Work | None:
    """Start an in-place sum over all ranks and return its handle (None without a process group).

    Used by moving-average centering, which overlaps the reduction with the rest of the step and
    waits for it only when the centre is next needed (as the reference does).
    """
    if is_dist():
        return dist.all_reduce(t, op=dist.ReduceOp.SUM, async_op=True)
    return None


def max_rank_difference(tensors: Sequence[torch.Tensor]) -> float:
    """How far these tensors differ between ranks: 0.0 when every rank holds the same values.

    Compares a float64 fingerprint per tensor (sum, sum of squares, a strided sample) instead of the
    tensors themselves, so checking a ViT-g teacher costs a few kilobytes of communication.
    """
    if not is_dist() or world_size() == 1 or not tensors:
        return 0.0
    prints = []
    for t in tensors:
        flat = t.detach().reshape(-1).double()
        stride = max(1, flat.numel() // 16)
        prints.append(torch.stack([flat.sum(), flat.square().sum(), flat[::stride].sum()]))
    high = torch.stack(prints)
    low = -high
    all_reduce_max_(high)
    all_reduce_max_(low)
    return float((high + low).abs().max())
