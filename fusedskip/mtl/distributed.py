"""torch.distributed helpers for the MTL methods: averaging gradients and broadcasting small state.

Under DistributedDataParallel every rank sees a slice of the global batch and DDP averages
parameter gradients. Gradient-manipulation methods need the per-task gradients of the *global*
batch: since the Gram of averaged gradients is not the average of per-rank Grams, the per-task
gradients are all-reduced (averaged) first and the Gram is formed from the averages. The T x T
Gram is then broadcast from the group's first rank so that every rank computes bit-identical
weights (and identical method state: GradVac's EMA, PCGrad's generator) whatever the
collective's rounding.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.distributed as dist
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

__all__ = ["resolve_process_group", "all_reduce_mean", "broadcast_from_first"]

def resolve_process_group(distributed: Optional[bool], process_group=None):
    """Decide whether to synchronise: returns ``(active, group)``.

    ``distributed=None`` (auto) synchronises when torch.distributed is initialised and the group
    has more than one rank; ``False`` never does (e.g. a single-process reference inside a
    distributed job); ``True`` requires an initialised process group.
    """
    if distributed is False:
        return False, None
    if not (dist.is_available() and dist.is_initialized()):
        if distributed:
            raise RuntimeError("distributed=True but torch.distributed is not initialised")
        return False, None
    group = process_group if process_group is not None else dist.group.WORLD
    if dist.get_world_size(group) == 1:
        return False, group
    return True, group


def _first_rank(group) -> int:
    if group is None or group is dist.group.WORLD:
        return 0
    return dist.get_process_group_ranks(group)[0]


def all_reduce_mean(tensors: Sequence[torch.Tensor], group, bucket_bytes: int = 25 * 2**20) -> list[torch.Tensor]:
    """Average ``tensors`` over the ranks of ``group``; returns new tensors (inputs untouched).

    Tensors are packed into flat buckets of at most ``bucket_bytes`` per (device, dtype), so
    only one bucket's worth of extra memory exists at a time beyond the outputs. Uses SUM then
    divides by the world size (gloo has no AVG).
    """
    world = dist.get_world_size(group)
    out: list[Optional[torch.Tensor]] = [None] * len(tensors)
    by_kind: dict = {}
    for i, t in enumerate(tensors):
        by_kind.setdefault((t.device, t.dtype), []).append(i)
    for (_device, _dtype), idxs in by_kind.items():
        bucket: list[int] = []
        size = 0

        def flush():
            if not bucket:
                return
            flat = _flatten_dense_tensors([tensors[i].contiguous() for i in bucket])
            dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=group)
            flat.div_(world)
            for i, t in zip(bucket, _unflatten_dense_tensors(flat, [tensors[i] for i in bucket])):
                out[i] = t

        for i in idxs:
            nbytes = tensors[i].numel() * tensors[i].element_size()
            if bucket and size + nbytes > bucket_bytes:
                flush()
                bucket, size = [], 0
            bucket.append(i)
            size += nbytes
        flush()
    return out  # type: ignore[return-value]


def broadcast_from_first(tensor: torch.Tensor, group) -> torch.Tensor:
    """Broadcast ``tensor`` in place from the first rank of ``group``; returns it."""
    dist.broadcast(tensor, src=_first_rank(group), group=group)
    return tensor
