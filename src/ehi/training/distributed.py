"""Multi-process training helpers on ``torch.distributed`` (gloo on CPU, nccl on GPU).

Work that is per row (encoding, embedding, mining) is split round-robin over the ranks
and gathered back in the original order; batches are split the same way, and in-batch
negatives are gathered from every rank with their gradients so that each rank sees the
same negatives a single process would.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import torch
import torch.distributed as dist


def rank_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def is_main() -> bool:
    return rank_world()[0] == 0


def barrier() -> None:
    if rank_world()[1] > 1:
        dist.barrier()


def shard_rows(n: int) -> np.ndarray:
    """This rank's rows of ``range(n)``: rank, rank + world, ..."""
    rank, world = rank_world()
    return np.arange(rank, n, world)


def gather_rows(local: list, n: int) -> list:
    """Inverse of ``shard_rows``: every rank gets all n rows back in their original order."""
    rank, world = rank_world()
    if world == 1:
        return local
    parts: list = [None] * world
    dist.all_gather_object(parts, local)
    out: list = [None] * n
    for r, part in enumerate(parts):
        out[r::world] = part
    return out


def map_rows(fn: Callable[[np.ndarray], np.ndarray], n: int) -> np.ndarray:
    """``fn(rows)`` over this rank's rows, gathered: an (n, ...) array on every rank."""
    rows = shard_rows(n)
    local = fn(rows) if len(rows) else None
    rank, world = rank_world()
    if world == 1:
        return local
    parts: list = [None] * world
    dist.all_gather_object(parts, local)
    first = next(p for p in parts if p is not None)
    out = np.empty((n, *first.shape[1:]), dtype=first.dtype)
    for r, part in enumerate(parts):
        if part is not None:
            out[r::world] = part
    return out


def all_gather_with_grad(x: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Concatenate every rank's rows of ``x`` (row counts may differ), keeping gradients
    flowing back to their owners; returns the result and where this rank's rows start."""
    rank, world = rank_world()
    if world == 1:
        return x, 0
    sizes = [torch.zeros(1, dtype=torch.long) for _ in range(world)]
    dist.all_gather(sizes, torch.tensor([x.shape[0]], dtype=torch.long))
    sizes = [int(s.item()) for s in sizes]
    pad = max(sizes) - x.shape[0]
    padded = torch.cat([x, x.new_zeros(pad, *x.shape[1:])]) if pad else x
    parts = _AllGather.apply(padded)
    return torch.cat([p[:s] for p, s in zip(parts, sizes)]), sum(sizes[:rank])


class _AllGather(torch.autograd.Function):
    """all_gather whose backward hands each rank the summed gradient of its own slice."""

    @staticmethod
    def forward(ctx, x):
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, x.contiguous())
        ctx.rank = dist.get_rank()
        return torch.stack(parts)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous()
        dist.all_reduce(grad)
        return grad[ctx.rank]


def all_gather_ids(x: np.ndarray) -> np.ndarray:
    rank, world = rank_world()
    if world == 1:
        return x
    parts: list = [None] * world
    dist.all_gather_object(parts, x)
    return np.concatenate(parts)
