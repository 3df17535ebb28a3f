"""The few tensor-parallel collectives the cross-entropy ops need, kept local so that ``megatron_mtp.ops`` depends
on nothing but torch (the parallel/ package builds its layers on top of these ops, not the other way round).

Every helper is a no-op for ``group=None`` or a group of one rank, so single-process code pays nothing.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.distributed as dist


def group_size(group) -> int:
    if group is None or not dist.is_available() or not dist.is_initialized():
        return 1
    return dist.get_world_size(group)


def group_rank(group) -> int:
    if group_size(group) == 1:
        return 0
    return dist.get_rank(group)


def make_stats_reducer(group) -> Callable[[torch.Tensor, torch.Tensor, torch.Tensor], None] | None:
    """In-place reducer of per-row (max, sum-exp, target logit) over the vocabulary shards of ``group``.

    Two small all-reduces: MAX of the row maxima, then one SUM of (sum-exp rescaled to the global max, target
    logit) packed together. Only the rank owning a row's target holds a non-zero target logit, so the SUM
    delivers it to all ranks.
    """
    if group_size(group) == 1:
        return None

    def reduce_stats(row_max: torch.Tensor, row_sumexp: torch.Tensor, target_logit: torch.Tensor) -> None:
        local_max = row_max.clone()
        dist.all_reduce(row_max, op=dist.ReduceOp.MAX, group=group)
        packed = torch.stack([row_sumexp * torch.exp(local_max - row_max), target_logit])
        dist.all_reduce(packed, op=dist.ReduceOp.SUM, group=group)
        row_sumexp.copy_(packed[0])
        target_logit.copy_(packed[1])

    return reduce_stats


def all_reduce_(tensor: torch.Tensor, group) -> torch.Tensor:
    if group_size(group) > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM, group=group)
    return tensor


def all_gather_rows(tensor: torch.Tensor, group) -> torch.Tensor:
    """Concatenation along dim 0 of every rank's ``tensor`` (same shape on all ranks), in rank order."""
    world = group_size(group)
    if world == 1:
        return tensor
    tensor = tensor.contiguous()
    out = torch.empty((world * tensor.shape[0],) + tuple(tensor.shape[1:]), dtype=tensor.dtype, device=tensor.device)
    try:
        dist.all_gather_into_tensor(out, tensor, group=group)
    except (RuntimeError, NotImplementedError, AttributeError):  # backends without the fused collective
        dist.all_gather(list(out.chunk(world)), tensor, group=group)
    return out


def reduce_scatter_rows(tensor: torch.Tensor, group) -> torch.Tensor:
    """Sum over ranks of ``tensor`` [world * n, ...], of which this rank keeps rows [rank * n, (rank + 1) * n)."""
    world = group_size(group)
    if world == 1:
        return tensor
    if tensor.shape[0] % world != 0:
        raise ValueError(f"reduce_scatter_rows: {tensor.shape[0]} rows do not split evenly over {world} ranks")
    tensor = tensor.contiguous()
    rows = tensor.shape[0] // world
    out = torch.empty((rows,) + tuple(tensor.shape[1:]), dtype=tensor.dtype, device=tensor.device)
    try:
        dist.reduce_scatter_tensor(out, tensor, op=dist.ReduceOp.SUM, group=group)
    except (RuntimeError, NotImplementedError, AttributeError):  # older gloo: all-reduce, keep our slice
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM, group=group)
        out.copy_(tensor[group_rank(group) * rows:(group_rank(group) + 1) * rows])
    return out


class CopyToTensorParallelRegion(torch.autograd.Function):
    """Identity forward; all-reduce of the gradient over ``group`` in backward (Megatron's "copy to TP region")."""

    @staticmethod
    def forward(ctx, tensor, group):
        ctx.group = group
        return tensor.view_as(tensor)

    @staticmethod
    def backward(ctx, grad):
        return all_reduce_(grad.clone(), ctx.group), None


class GatherFromSequenceParallelRegion(torch.autograd.Function):
    """All-gather along dim 0 forward; reduce-scatter of the gradient along dim 0 in backward."""

    @staticmethod
    def forward(ctx, tensor, group):
        ctx.group = group
        return all_gather_rows(tensor, group)

    @staticmethod
    def backward(ctx, grad):
        return reduce_scatter_rows(grad, ctx.group), None
