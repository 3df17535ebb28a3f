"""Tensor-parallel layers with Megatron's names, plus layout-independent initialisation.

* ``ColumnParallelLinear``: W [out, in] split along out; input replicated (or gathered from sequence
  shards), output split along the last dim.
* ``RowParallelLinear``: W split along in; input split along the last dim, partial outputs all-reduced
  (or reduce-scattered into sequence shards).
* ``VocabParallelEmbedding``: the (padded) vocabulary split across ranks; out-of-shard ids contribute zero
  and the partial embeddings are all-reduced.

Initialisation does not depend on the layout: every parameter carries an ``init_key`` (a stable name such
as ``trunk.3.attn.qkv``) and ``initialize_parameters`` draws the *full* master tensor from a generator
seeded by (seed, key) and copies this rank's shard. So TP=k from seed s has, shard by shard, the weights
of TP=1 from seed s, whatever the pipeline split.
"""
from __future__ import annotations

import math
import zlib
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from megatron_mtp.parallel import mappings, state


def _mark(param: nn.Parameter, *, init_key: str, std: Optional[float], partition_dim: int = -1,
          chunks: int = 1, tensor_parallel: bool = False, sequence_parallel: bool = False,
          logical_size: Optional[int] = None) -> None:
    param.init_key = init_key
    param.init_std = std  # None = ones (norm weights)
    param.partition_dim = partition_dim  # dim split across TP; -1 = replicated
    param.partition_chunks = chunks  # the split dim holds this many blocks, each split separately
    # A padded vocabulary: only the first logical_size rows of the split dim are real. The padding grows
    # with tp, so init draws the real rows alone and zeroes the rest (see initialize_parameters).
    param.logical_size = logical_size
    # DeepSpeed's grad-norm code counts a parameter once per TP group unless it is marked model-parallel.
    param.tensor_model_parallel = tensor_parallel
    param.model_parallel = tensor_parallel
    # Replicated parameters that see only this rank's sequence shard need their grads summed over TP.
    param.sequence_parallel = sequence_parallel


def shard_of(master: torch.Tensor, param: nn.Parameter, tp: int, rank: int) -> torch.Tensor:
    """This rank's slice of a full (TP=1) tensor, following the parameter's partition marks."""
    dim = getattr(param, "partition_dim", -1)
    if dim < 0 or tp == 1:
        return master
    chunks = getattr(param, "partition_chunks", 1)
    size = master.size(dim)
    blocks = master.split(size // chunks, dim=dim)
    return torch.cat([b.chunk(tp, dim=dim)[rank] for b in blocks], dim=dim)


def unshard(shards: list, param: nn.Parameter) -> torch.Tensor:
    """Inverse of ``shard_of``: the full tensor from every rank's shard, in TP-rank order."""
    dim = getattr(param, "partition_dim", -1)
    if dim < 0 or len(shards) == 1:
        return shards[0]
    chunks = getattr(param, "partition_chunks", 1)
    per_rank = [s.split(s.size(dim) // chunks, dim=dim) for s in shards]
    return torch.cat([torch.cat([blocks[c] for blocks in per_rank], dim=dim) for c in range(chunks)], dim=dim)


def full_shape(param: nn.Parameter, tp: int) -> tuple:
    shape = list(param.shape)
    dim = getattr(param, "partition_dim", -1)
    if dim >= 0:
        shape[dim] *= tp
    return tuple(shape)


def seed_for(seed: int, key: str) -> int:
    return (seed * 1_000_003 + zlib.crc32(key.encode())) % (2**63)


@torch.no_grad()
def initialize_parameters(model: nn.Module, seed: int) -> None:
    """Draw every marked parameter's full tensor on the CPU, deterministically, and keep our shard."""
    tp, rank = state.tp_size(), state.tp_rank()
    for param in model.parameters():
        key = getattr(param, "init_key", None)
        if key is None:
            continue
        std = param.init_std
        if std is None:
            param.fill_(1.0)
            continue
        param.copy_(shard_of(_master(param, seed, tp), param, tp, rank).to(param.dtype))


def _master(param: nn.Parameter, seed: int, tp: int) -> torch.Tensor:
    """The full (TP=1) tensor of a parameter: real rows from its own generator, vocabulary padding zero.

    Drawing only the logical rows keeps the real weights independent of tp, whose padding differs; zero
    padding rows never change (no token uses them and the loss masks them), so resharding is exact."""
    shape = full_shape(param, tp)
    logical = getattr(param, "logical_size", None)
    dim = getattr(param, "partition_dim", -1)
    real = list(shape)
    if logical is not None and dim >= 0:
        real[dim] = logical
    gen = torch.Generator().manual_seed(seed_for(seed, param.init_key))
    values = torch.empty(real, dtype=torch.float32).normal_(0.0, param.init_std, generator=gen)
    if tuple(real) == shape:
        return values
    master = torch.zeros(shape, dtype=torch.float32)
    master.narrow(dim, 0, logical).copy_(values)
    return master


class ColumnParallelLinear(nn.Module):
    """y = x Wᵀ with W split along the output features; ``chunks`` > 1 splits each block separately
    (e.g. SwiGLU's fused [gate; up] so every rank holds matching gate and up slices)."""

    def __init__(self, in_features: int, out_features: int, *, init_key: str, init_std: float,
                 chunks: int = 1, gather_output: bool = False, sequence_parallel: bool = False,
                 dtype=None):
        super().__init__()
        tp = state.tp_size()
        if out_features % (tp * chunks):
            raise ValueError(f"{init_key}: {out_features} output features do not split into {tp} TP shards.")
        self.in_features, self.out_features = in_features, out_features
        self.gather_output = gather_output
        self.sequence_parallel = sequence_parallel and tp > 1
        self.weight = nn.Parameter(torch.empty(out_features // tp, in_features, dtype=dtype))
        _mark(self.weight, init_key=init_key, std=init_std, partition_dim=0, chunks=chunks, tensor_parallel=tp > 1)
        # The GEMM y = x Wᵀ; ``ops.fp8.apply_fp8`` swaps in its FP8 version (train.fp8). A swappable callable
        # rather than a flag, because this layer sits below ops and may not import it.
        self.gemm = F.linear

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.sequence_parallel:
            x = mappings.gather_from_sequence_region(x)
        else:
            x = mappings.copy_to_tp_region(x)
        y = self.gemm(x, self.weight)
        return mappings.gather_from_tp_region(y) if self.gather_output else y


class RowParallelLinear(nn.Module):
    """y = x Wᵀ with W split along the input features; partial sums are all-reduced (or reduce-scattered
    along the sequence under sequence parallelism)."""

    def __init__(self, in_features: int, out_features: int, *, init_key: str, init_std: float,
                 input_is_parallel: bool = True, sequence_parallel: bool = False, dtype=None):
        super().__init__()
        tp = state.tp_size()
        if in_features % tp:
            raise ValueError(f"{init_key}: {in_features} input features do not split into {tp} TP shards.")
        self.in_features, self.out_features = in_features, out_features
        self.input_is_parallel = input_is_parallel
        self.sequence_parallel = sequence_parallel and tp > 1
        self.weight = nn.Parameter(torch.empty(out_features, in_features // tp, dtype=dtype))
        _mark(self.weight, init_key=init_key, std=init_std, partition_dim=1, tensor_parallel=tp > 1)
        self.gemm = F.linear  # as in ColumnParallelLinear: ops.fp8.apply_fp8 swaps in the FP8 GEMM

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.input_is_parallel:
            x = mappings.scatter_to_tp_region(x)
        y = self.gemm(x, self.weight)
        if self.sequence_parallel:
            return mappings.reduce_scatter_to_sequence_region(y)
        return mappings.reduce_from_tp_region(y)


class VocabParallelEmbedding(nn.Module):
    """Embedding whose (padded) vocabulary rows are split across TP ranks."""

    def __init__(self, padded_vocab_size: int, dim: int, *, init_key: str, init_std: float,
                 sequence_parallel: bool = False, vocab_size: Optional[int] = None, dtype=None):
        super().__init__()
        tp, rank = state.tp_size(), state.tp_rank()
        if padded_vocab_size % tp:
            raise ValueError(f"padded vocabulary {padded_vocab_size} does not split into {tp} TP shards.")
        self.padded_vocab_size = padded_vocab_size
        self.rows = padded_vocab_size // tp
        self.vocab_start = rank * self.rows
        self.sequence_parallel = sequence_parallel and tp > 1
        self.tp = tp
        self.weight = nn.Parameter(torch.empty(self.rows, dim, dtype=dtype))
        _mark(self.weight, init_key=init_key, std=init_std, partition_dim=0, tensor_parallel=tp > 1,
              logical_size=vocab_size)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        if self.tp == 1:
            return F.embedding(tokens, self.weight)
        local = tokens - self.vocab_start
        outside = (local < 0) | (local >= self.rows)
        out = F.embedding(local.masked_fill(outside, 0), self.weight)
        out = out.masked_fill(outside.unsqueeze(-1), 0.0)
        if self.sequence_parallel:
            return mappings.reduce_scatter_to_sequence_region(out)
        return mappings.reduce_from_tp_region(out)


class RMSNorm(nn.Module):
    """Root-mean-square norm computed in fp32 (Llama). Its weight is replicated across TP; under sequence
    parallelism each rank sees one sequence shard, so the weight is marked for a TP all-reduce of grads."""

    def __init__(self, dim: int, eps: float, *, init_key: str, sequence_parallel: bool = False, dtype=None):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim, dtype=dtype))
        _mark(self.weight, init_key=init_key, std=None,
              sequence_parallel=sequence_parallel and state.tp_size() > 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return xf.type_as(x) * self.weight


def scaled_init_std(std: float, num_layers: int) -> float:
    """Megatron/GPT-2: residual output projections start smaller, std / sqrt(2 * num_layers)."""
    return std / math.sqrt(2.0 * num_layers)
