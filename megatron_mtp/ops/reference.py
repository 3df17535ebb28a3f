"""Reference implementations: full logits, plain PyTorch, written for clarity rather than memory or speed.

* ``vocab_parallel_cross_entropy(logits_local, target, tp_group, ignore_index)``: Megatron-style cross-entropy on
  vocabulary-sharded logits [..., V_local] without gathering the vocabulary: local max -> all-reduce MAX; local
  sum-exp and target logit -> all-reduce SUM; loss and gradient formed locally. Returns per-token losses
  (float32, or float64 for float64 logits; 0 at ignored targets); reduce them yourself.
* ``reference_linear_cross_entropy(...)``: the same contract as ``linear_cross_entropy`` (including the
  d(hidden) all-reduce / sequence-parallel reduce-scatter) built from a full local-logits GEMM and the function
  above. Tests compare the fused op with it and with ``F.cross_entropy`` in float64.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from ._comm import (CopyToTensorParallelRegion, GatherFromSequenceParallelRegion, all_gather_rows, group_rank,
                    group_size)

__all__ = ["vocab_parallel_cross_entropy", "reference_linear_cross_entropy"]


class _VocabParallelCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits_local: torch.Tensor, target: torch.Tensor, group, ignore_index: int):
        world = group_size(group)
        logits = logits_local.to(torch.float64 if logits_local.dtype == torch.float64 else torch.float32)
        vocab_local = logits.shape[-1]
        vocab_start = group_rank(group) * vocab_local

        row_max = logits.max(dim=-1).values
        if world > 1:
            dist.all_reduce(row_max, op=dist.ReduceOp.MAX, group=group)
        shifted = logits - row_max.unsqueeze(-1)
        exp = shifted.exp()
        sum_exp = exp.sum(dim=-1)

        col = target - vocab_start
        in_shard = (col >= 0) & (col < vocab_local)
        col = torch.where(in_shard, col, torch.zeros_like(col))
        # torch.where, not "* in_shard": a shard made only of padded rows has -inf logits, and -inf * 0 is NaN.
        gathered = shifted.gather(-1, col.unsqueeze(-1)).squeeze(-1)
        target_shifted = torch.where(in_shard, gathered, torch.zeros_like(gathered))
        if world > 1:
            packed = torch.stack([sum_exp, target_shifted])
            dist.all_reduce(packed, op=dist.ReduceOp.SUM, group=group)
            sum_exp, target_shifted = packed[0], packed[1]

        valid = target != ignore_index
        loss = torch.where(valid, sum_exp.log() - target_shifted, torch.zeros_like(sum_exp))
        ctx.save_for_backward(exp / sum_exp.unsqueeze(-1), col, in_shard & valid, valid)
        ctx.input_dtype = logits_local.dtype
        return loss

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor):
        softmax, col, owns_target, valid = ctx.saved_tensors
        grad = softmax.clone()
        onehot = torch.zeros_like(grad).scatter_(-1, col.unsqueeze(-1), owns_target.unsqueeze(-1).to(grad.dtype))
        grad -= onehot
        grad *= (grad_loss.to(grad.dtype) * valid).unsqueeze(-1)
        return grad.to(ctx.input_dtype), None, None, None


def vocab_parallel_cross_entropy(logits_local: torch.Tensor, target: torch.Tensor, tp_group=None,
                                 ignore_index: int = -100) -> torch.Tensor:
    """Per-token cross-entropy of vocabulary-sharded logits [..., V_local] against GLOBAL ids ``target`` [...].

    Rank r of ``tp_group`` holds global vocabulary columns [r*V_local, (r+1)*V_local). Differentiable with respect
    to ``logits_local``; no gradient communication is needed (each rank's gradient is its own columns').
    """
    if logits_local.shape[:-1] != target.shape:
        raise ValueError(f"vocab_parallel_cross_entropy: logits {tuple(logits_local.shape)} and target "
                         f"{tuple(target.shape)} disagree on the token dimensions")
    return _VocabParallelCrossEntropy.apply(logits_local, target.long(), tp_group, int(ignore_index))


def reference_linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, target: torch.Tensor, *,
                                   tp_group=None, ignore_index: int = -100, reduction: str = "mean",
                                   sequence_parallel: bool = False) -> torch.Tensor:
    """Full-logits twin of ``linear_cross_entropy`` (same arguments and communication contract)."""
    d = hidden.shape[-1]
    h = hidden.reshape(-1, d)
    tgt = target.reshape(-1).long()
    world = group_size(tp_group)
    if world > 1 and sequence_parallel:
        local_rows = h.shape[0]
        h = GatherFromSequenceParallelRegion.apply(h, tp_group)
        if tgt.numel() == local_rows:
            tgt = all_gather_rows(tgt, tp_group)
    elif world > 1:
        h = CopyToTensorParallelRegion.apply(h, tp_group)
    logits = h @ weight.t()
    losses = vocab_parallel_cross_entropy(logits, tgt, tp_group, ignore_index)
    if reduction == "sum":
        return losses.sum()
    if reduction == "mean":
        return losses.sum() / (tgt != ignore_index).sum().clamp(min=1)
    if reduction == "none":
        return losses if (world > 1 and sequence_parallel) else losses.view(hidden.shape[:-1])
    raise ValueError(f"reference_linear_cross_entropy: unknown reduction {reduction!r}")
