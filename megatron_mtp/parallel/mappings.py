"""Autograd-aware collectives for tensor and sequence parallelism (Megatron's "mappings").

Each function is the identity on a single process (or TP=1), so layers call them unconditionally.
Forward / backward pairs:
  copy_to_tp_region            identity   / all-reduce
  reduce_from_tp_region        all-reduce / identity
  scatter_to_tp_region         split last dim / all-gather last dim
  gather_from_tp_region        all-gather last dim / split last dim
  scatter_to_sequence_region   split seq dim  / all-gather seq dim
  gather_from_sequence_region  all-gather seq dim / reduce-scatter seq dim
  reduce_scatter_to_sequence_region  reduce-scatter seq dim / all-gather seq dim
Activations are laid out [batch, seq, hidden]; the sequence dimension is 1.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from megatron_mtp.parallel import state

SEQ_DIM = 1


def _world(group) -> int:
    return 1 if group is None else dist.get_world_size(group)


def _all_reduce(x: torch.Tensor, group) -> torch.Tensor:
    if _world(group) == 1:
        return x
    x = x.contiguous()
    dist.all_reduce(x, group=group)
    return x


def _split(x: torch.Tensor, dim: int, group) -> torch.Tensor:
    world = _world(group)
    if world == 1:
        return x
    if x.size(dim) % world:
        raise ValueError(f"dimension {dim} of size {x.size(dim)} is not divisible by the TP size {world}.")
    return x.chunk(world, dim=dim)[dist.get_rank(group)].contiguous()


# Single-tensor collectives (one call, one buffer; renamed *_single in recent torch). NCCL has them on every
# torch we support; gloo only on recent ones, so gloo falls back to list collectives once they fail.
_ALL_GATHER_TENSOR = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_REDUCE_SCATTER_TENSOR = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
_WITHOUT_TENSOR_COLLECTIVES: set = set()  # backends seen to lack them


def _tensor_collective(fn, out, x, group) -> bool:
    backend = dist.get_backend(group)
    if backend in _WITHOUT_TENSOR_COLLECTIVES:
        return False
    try:
        fn(out, x, group=group)
    except (RuntimeError, NotImplementedError):
        if backend == dist.Backend.NCCL:
            raise
        _WITHOUT_TENSOR_COLLECTIVES.add(backend)  # rejected before any traffic, on every rank alike
        return False
    return True


def _gather(x: torch.Tensor, dim: int, group) -> torch.Tensor:
    world = _world(group)
    if world == 1:
        return x
    x = x.contiguous()
    # Gathered rank-major along dim 0 ([world * n, ...]); then one copy puts the blocks along dim.
    out = torch.empty((world * x.size(0),) + tuple(x.shape[1:]), dtype=x.dtype, device=x.device)
    if not _tensor_collective(_ALL_GATHER_TENSOR, out, x, group):
        dist.all_gather(list(out.chunk(world)), x, group=group)
    if dim == 0:
        return out
    return torch.cat(out.chunk(world), dim=dim)


def _reduce_scatter(x: torch.Tensor, dim: int, group) -> torch.Tensor:
    world = _world(group)
    if world == 1:
        return x
    if x.size(dim) % world:
        raise ValueError(f"dimension {dim} of size {x.size(dim)} is not divisible by the TP size {world}.")
    # Blocks along dim laid rank-major along dim 0 (one copy), so rank r receives the sum of blocks r.
    blocks = x.contiguous() if dim == 0 else torch.cat(x.chunk(world, dim=dim), dim=0)
    out = torch.empty((blocks.size(0) // world,) + tuple(blocks.shape[1:]), dtype=x.dtype, device=x.device)
    if _tensor_collective(_REDUCE_SCATTER_TENSOR, out, blocks, group):
        return out
    # Old gloo has no reduce-scatter: all-reduce, then keep our block (same result, more traffic).
    return _split(_all_reduce(x.clone(), group), dim, group)


class _CopyToTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x

    @staticmethod
    def backward(ctx, g):
        return _all_reduce(g.clone() if _world(ctx.group) > 1 else g, ctx.group), None


class _ReduceFromTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        return _all_reduce(x.clone() if _world(group) > 1 else x, group)

    @staticmethod
    def backward(ctx, g):
        return g, None


class _ScatterToTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _split(x, -1, group)

    @staticmethod
    def backward(ctx, g):
        return _gather(g, -1, ctx.group), None


class _GatherFromTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _gather(x, -1, group)

    @staticmethod
    def backward(ctx, g):
        return _split(g, -1, ctx.group), None


class _ScatterToSequence(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _split(x, SEQ_DIM, group)

    @staticmethod
    def backward(ctx, g):
        return _gather(g, SEQ_DIM, ctx.group), None


class _GatherFromSequence(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _gather(x, SEQ_DIM, group)

    @staticmethod
    def backward(ctx, g):
        return _reduce_scatter(g, SEQ_DIM, ctx.group), None


class _ReduceScatterToSequence(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _reduce_scatter(x, SEQ_DIM, group)

    @staticmethod
    def backward(ctx, g):
        return _gather(g, SEQ_DIM, ctx.group), None


def _group(group):
    return state.tp_group() if group is None else group


# The public mappings run eagerly under torch.compile (train.compile compiles each TransformerLayer): every call is
# a graph break, and its autograd Function an ordinary autograd node with eager collectives in both directions.
# Traced by dynamo instead, the collectives lost gradients over NCCL (TP with sequence parallelism; gloo on CPU is
# unaffected): the measurement is in docs/benchmarks.md.
_eager = torch.compiler.disable


def _single_rank(group) -> bool:
    """One tensor-parallel rank: every mapping is the identity. Decided here, outside the ``compiler.disable``d
    calls, so that a compiled layer at TP = 1 is one graph (each disabled call would split it, costing the
    fusions across the GEMMs and a trip through eager mode per projection)."""
    return group is None and state.tp_size() == 1


@_eager
def _copy_to_tp_region(x, group):
    return _CopyToTP.apply(x, _group(group))


def copy_to_tp_region(x, group=None):
    return x if _single_rank(group) else _copy_to_tp_region(x, group)


@_eager
def _reduce_from_tp_region(x, group):
    return _ReduceFromTP.apply(x, _group(group))


def reduce_from_tp_region(x, group=None):
    return x if _single_rank(group) else _reduce_from_tp_region(x, group)


@_eager
def _scatter_to_tp_region(x, group):
    return _ScatterToTP.apply(x, _group(group))


def scatter_to_tp_region(x, group=None):
    return x if _single_rank(group) else _scatter_to_tp_region(x, group)


@_eager
def _gather_from_tp_region(x, group):
    return _GatherFromTP.apply(x, _group(group))


def gather_from_tp_region(x, group=None):
    return x if _single_rank(group) else _gather_from_tp_region(x, group)


@_eager
def _scatter_to_sequence_region(x, group):
    return _ScatterToSequence.apply(x, _group(group))


def scatter_to_sequence_region(x, group=None):
    return x if _single_rank(group) else _scatter_to_sequence_region(x, group)


@_eager
def _gather_from_sequence_region(x, group):
    return _GatherFromSequence.apply(x, _group(group))


def gather_from_sequence_region(x, group=None):
    return x if _single_rank(group) else _gather_from_sequence_region(x, group)


@_eager
def _reduce_scatter_to_sequence_region(x, group):
    return _ReduceScatterToSequence.apply(x, _group(group))


def reduce_scatter_to_sequence_region(x, group=None):
    return x if _single_rank(group) else _reduce_scatter_to_sequence_region(x, group)
