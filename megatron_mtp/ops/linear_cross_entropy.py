"""Fused, chunked, vocab-parallel linear cross-entropy: ``loss = CE(hidden @ weight^T, target)`` without ever
holding the [tokens, vocab] logits.

The MTP loss calls it once per head::

    loss_i = linear_cross_entropy(normed_head_output.view(-1, d), unembedding_weight_local, targets.view(-1),
                                  tp_group=tp_group, reduction="sum")

Algorithm (docs/cross_entropy.md has the measurements behind the choices):

* Tokens are processed in chunks; per chunk the native kernel computes logits with one GEMM, the row
  statistics (max, sum-exp, target logit) in one fused pass, the softmax gradient in place, then the d(hidden)
  and d(weight) GEMMs (d(weight) accumulated in float32 across chunks).
* For ``reduction="sum"|"mean"`` the gradients are formed in the FORWARD (each logit is computed once: 6*T*d*V
  FLOPs for loss + both gradients) and the backward only scales them by ``grad_output``. For
  ``reduction="none"`` the per-token weights are unknown until backward, so the forward keeps only the per-row
  log-sum-exp and the backward recomputes the logits (8*T*d*V); ``recompute=True`` forces that mode.
* Tensor parallel (``tp_group``): ``weight`` is this rank's shard [V_local, d] of the padded vocabulary (rank r
  owns global ids [r*V_local, (r+1)*V_local)); ``target`` holds global ids. Per chunk, the row max is
  all-reduced (MAX) and the rescaled sum-exp and the target logit (non-zero only on the owning rank) are
  all-reduced (SUM) before that chunk's gradient is formed. The op reduces d(hidden) over the group ITSELF in
  backward: all-reduce, i.e. it behaves as if ``hidden`` entered through Megatron's "copy to tensor-parallel
  region", so callers must not wrap it in another copy/all-reduce. With ``sequence_parallel=True`` ``hidden``
  is this rank's sequence shard [T/tp, d]: it is all-gathered along dim 0 in forward and d(hidden) is
  reduce-scattered back in backward; ``target`` may be the full [T] or the local [T/tp] shard (then gathered).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from . import _chunked_torch
from ._comm import all_gather_rows, all_reduce_, group_rank, group_size, make_stats_reducer, reduce_scatter_rows
from ._extension import native_backend

__all__ = ["linear_cross_entropy", "default_chunk_size", "lean_chunk_size", "loss_memory_chunking"]

_REDUCTIONS = ("mean", "sum", "none")

# Logits-chunk budgets. On the GPU each extra chunk costs one more read+write of the float32 d(weight) accumulator
# (V_local x d x 4 bytes), a final float32 -> bf16 pass over d(weight) and smaller GEMMs; a single chunk needs no
# accumulator at all. In the H100 sweeps (docs/cross_entropy.md: chunks of 2048 to 16384 tokens at d = 4096,
# V in {32768, 131072}) the largest chunk was the fastest or tied at every shape -- at T = 16384, V = 131072 one
# 4 GiB chunk beat two of 2 GiB (+ the 1 GiB half-accumulator) by 1-2.5 %, enough to decide against
# torch.compile, which holds the same 4 GiB -- so the default is as many tokens as fit 4 GiB of logits: one chunk
# up to T x V_local = 2^31, and memory bounded by the budget whatever T is. mtp.loss_memory=lean (or a small
# chunk_size with fp32_weight_grad=False) is the low-memory setting. On the CPU a smaller chunk keeps the OpenMP
# row passes in cache.
_GPU_CHUNK_BYTES = 4 << 30
_CPU_CHUNK_BYTES = 32 << 20
_CHUNK_ROW_MULTIPLE = 128  # GEMM-friendly chunk heights


def default_chunk_size(num_tokens: int, vocab_local: int, element_size: int, device: torch.device) -> int:
    """Tokens per chunk: as many as fit the logits budget, balanced so that the last chunk is not a sliver."""
    if num_tokens <= 0:
        return 1
    gpu = device.type == "cuda"
    rows = max(1, (_GPU_CHUNK_BYTES if gpu else _CPU_CHUNK_BYTES) // max(1, vocab_local * element_size))
    if rows >= num_tokens:
        return num_tokens
    n_chunks = math.ceil(num_tokens / rows)
    rows = math.ceil(num_tokens / n_chunks)
    rows = math.ceil(rows / _CHUNK_ROW_MULTIPLE) * _CHUNK_ROW_MULTIPLE
    return min(num_tokens, rows)


def lean_chunk_size(num_tokens: int, vocab_local: int, dim: int) -> int:
    """Tokens per chunk for the lean setting: Liger-Kernel's budget of about T x d logits elements per chunk
    (the next power of two of T / ceil(V_local / d)). With ``fp32_weight_grad=False`` the op then holds exactly
    Liger's workspace (64-128 MiB at d = 4096, T = 8192-16384) and, on the H100, runs 4-17 % faster than Liger;
    the default chunking is 3-38 % faster still but holds up to 4 GiB of logits (docs/cross_entropy.md)."""
    if num_tokens <= 0:
        return 1
    rows = math.ceil(num_tokens / max(1, math.ceil(vocab_local / max(1, dim))))
    return min(num_tokens, 1 << (rows - 1).bit_length())


def loss_memory_chunking(loss_memory: str, num_tokens: int, vocab_local: int, dim: int, element_size: int,
                         device: torch.device) -> tuple[int, bool]:
    """(chunk_size, fp32_weight_grad) of the ``mtp.loss_memory`` setting: "fast" = the default chunking with a
    float32 d(weight) accumulator, "lean" = Liger's chunking with bf16 accumulation. One place for the model's
    loss and the memory planner."""
    if loss_memory == "lean":
        return lean_chunk_size(num_tokens, vocab_local, dim), False
    if loss_memory == "fast":
        return default_chunk_size(num_tokens, vocab_local, element_size, device), True
    raise ValueError(f"loss_memory must be 'fast' or 'lean', got {loss_memory!r}")


@dataclass(frozen=True)
class _Options:
    tp_group: Any
    ignore_index: int
    reduction: str
    chunk_size: int | None
    sequence_parallel: bool
    recompute: bool
    fp32_weight_grad: bool
    backend: str
    vocab_size: int | None


def _select_backend(name: str, hidden: torch.Tensor):
    if name == "torch":
        return _chunked_torch
    native = native_backend(hidden)
    if native is None:
        if name == "native":
            raise RuntimeError("linear_cross_entropy(backend='native'): megatron_mtp._C cannot serve "
                               f"{hidden.device.type}/{hidden.dtype} tensors (see the warning above)")
        return _chunked_torch
    return native


def scale_unless_one_(grad: torch.Tensor, scale: torch.Tensor) -> None:
    """grad *= scale in place, skipped when scale is exactly 1 (a plain ``loss.backward()``), without a host sync.

    On the GPU a test like ``scale == 1`` in Python would stall the stream, and an unconditional multiply costs a
    read and a write of d(weight) (2 GiB at V = 131072, d = 4096); the native kernel reads the scalar on the
    device and returns at once when it is 1.
    """
    native = native_backend(grad)
    if native is not None and grad.dtype != torch.float64 and grad.is_contiguous():
        native.scale_unless_one_(grad, scale.to(device=grad.device, dtype=torch.float32))
    elif grad.device.type == "cpu":
        if scale.item() != 1:
            grad.mul_(scale.to(grad.dtype))
    else:
        grad.mul_(scale.to(grad.dtype))


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, target: torch.Tensor, opts: _Options):
        group = opts.tp_group
        world = group_size(group)
        d = hidden.shape[-1]
        h = hidden.reshape(-1, d)
        tgt = target.reshape(-1)
        sharded_seq = opts.sequence_parallel and world > 1
        if sharded_seq:
            local_rows = h.shape[0]
            h = all_gather_rows(h, group)
            if tgt.numel() == local_rows:
                tgt = all_gather_rows(tgt, group)
        if tgt.numel() != h.shape[0]:
            raise ValueError(f"linear_cross_entropy: target has {tgt.numel()} ids for {h.shape[0]} hidden rows")
        tgt = tgt.to(device=h.device, dtype=torch.long)

        vocab_start = group_rank(group) * weight.shape[0]
        # Rows of this shard below the real vocabulary size; padding rows stay out of the softmax.
        vocab_limit = -1 if opts.vocab_size is None else max(0, min(weight.shape[0], opts.vocab_size - vocab_start))
        need_dh, need_dw = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        need_grad = need_dh or need_dw
        fused = need_grad and opts.reduction != "none" and not opts.recompute
        backend = _select_backend(opts.backend, h)
        stats_dtype = torch.float64 if h.dtype == torch.float64 else torch.float32
        chunk = opts.chunk_size or default_chunk_size(h.shape[0], weight.shape[0], h.element_size(), h.device)

        valid = tgt != opts.ignore_index
        # Count of non-ignored targets as a device tensor (no host sync); 0 targets -> divide by 1 -> loss 0.
        n_valid = valid.sum().clamp(min=1).to(stats_dtype) if opts.reduction == "mean" else None
        row_scale = None
        if fused:
            row_scale = valid.to(stats_dtype)
            if n_valid is not None:
                row_scale = row_scale / n_valid

        lse, target_logit, dh, dw = backend.linear_ce_forward(
            h, weight, tgt, row_scale, vocab_start, vocab_limit, chunk, need_dh and fused, need_dw and fused,
            opts.fp32_weight_grad, make_stats_reducer(group))
        losses = torch.where(valid, lse - target_logit, torch.zeros((), dtype=lse.dtype, device=lse.device))

        ctx.opts, ctx.fused, ctx.world = opts, fused, world
        ctx.hidden_shape, ctx.sharded_seq = hidden.shape, sharded_seq
        if fused:
            ctx.grads = (dh, dw)  # intermediates, not inputs: kept on ctx until backward scales them
        elif need_grad:
            ctx.save_for_backward(h, weight, tgt, lse, valid)
            ctx.backend, ctx.vocab_start, ctx.vocab_limit = backend, vocab_start, vocab_limit
            ctx.chunk, ctx.n_valid = chunk, n_valid

        if opts.reduction == "sum":
            return losses.sum()
        if opts.reduction == "mean":
            return losses.sum() / n_valid
        return losses if sharded_seq else losses.view(hidden.shape[:-1])

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor):
        opts = ctx.opts
        if ctx.fused:
            if ctx.grads is None:
                raise RuntimeError("linear_cross_entropy: this graph was already backpropagated; the fused mode "
                                   "hands its precomputed gradients out once (use recompute=True to backprop twice)")
            # Dropping ctx's references lets autograd adopt the tensors as .grad without a copy.
            dh, dw = ctx.grads
            ctx.grads = None
            scale = grad_loss.reshape(())
            for grad in (dh, dw):
                if grad is not None:
                    scale_unless_one_(grad, scale)
        else:
            h, weight, tgt, lse, valid = ctx.saved_tensors
            if opts.reduction == "none":
                row_scale = grad_loss.reshape(-1).to(lse.dtype) * valid
            else:
                row_scale = grad_loss.reshape(()).to(lse.dtype) * valid
                if opts.reduction == "mean":
                    row_scale = row_scale / ctx.n_valid
            dh, dw = ctx.backend.linear_ce_backward(
                h, weight, tgt, lse, row_scale, ctx.vocab_start, ctx.vocab_limit, ctx.chunk, ctx.needs_input_grad[0],
                ctx.needs_input_grad[1], opts.fp32_weight_grad)

        if dh is not None and ctx.world > 1:
            # d(hidden) from this rank covers only its vocabulary shard: sum the partial products over the group.
            dh = reduce_scatter_rows(dh, opts.tp_group) if ctx.sharded_seq else all_reduce_(dh, opts.tp_group)
        if dh is not None:
            dh = dh.view(ctx.hidden_shape)
        return dh, dw, None, None


def linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    target: torch.Tensor,
    *,
    tp_group=None,
    ignore_index: int = -100,
    reduction: str = "mean",
    chunk_size: int | None = None,
    sequence_parallel: bool = False,
    recompute: bool = False,
    fp32_weight_grad: bool = True,
    backend: str = "auto",
    vocab_size: int | None = None,
) -> torch.Tensor:
    """Cross-entropy of ``hidden @ weight^T`` against ``target``, chunked over tokens, vocab-parallel over ``tp_group``.

    Args:
        hidden: [..., d] activations (flattened to [T, d]); with ``sequence_parallel`` this rank's [T/tp, d] shard.
        weight: [V_local, d] this rank's rows of the (padded) unembedding; same dtype as ``hidden``.
        target: [...] int64 GLOBAL token ids, one per hidden row (``ignore_index`` rows contribute nothing).
        tp_group: tensor-parallel process group over which the vocabulary is sharded (None: not sharded).
            d(hidden) is all-reduced (or reduce-scattered) over it by this op.
        reduction: "mean" (over non-ignored targets; 0 of them gives loss 0 and zero gradients), "sum", or
            "none" (per-token losses, float32; shaped like ``hidden[..., 0]``, or flat [T] with sequence_parallel).
        chunk_size: tokens per chunk; default from a logits-memory budget (``default_chunk_size``).
        sequence_parallel: gather ``hidden`` along dim 0 in forward, reduce-scatter d(hidden) in backward.
        recompute: form the gradients in backward by recomputing the logits (8*T*d*V FLOPs instead of 6; less
            memory held between forward and backward). Always the case for reduction="none".
        fp32_weight_grad: accumulate d(weight) across chunks in float32 (default). False accumulates in the weight
            dtype, saving a V_local x d x 2-byte buffer for bf16 weights at the cost of one rounding per chunk.
        backend: "auto" (native if built, else PyTorch), "native", or "torch" (the pure-PyTorch chunked path).
        vocab_size: the real vocabulary size when the unembedding is padded (e.g. to a multiple of 8 x tp):
            global ids >= vocab_size are left out of the softmax (as if their logits were -inf) and get zero
            d(weight). None: every row is real.

    Returns the loss (float32; float64 for float64 inputs).
    """
    if reduction not in _REDUCTIONS:
        raise ValueError(f"linear_cross_entropy: reduction must be one of {_REDUCTIONS}, got {reduction!r}")
    if backend not in ("auto", "native", "torch"):
        raise ValueError(f"linear_cross_entropy: backend must be 'auto', 'native' or 'torch', got {backend!r}")
    if weight.dim() != 2 or hidden.shape[-1] != weight.shape[1]:
        raise ValueError(f"linear_cross_entropy: hidden [..., d] and weight [V_local, d] disagree: "
                         f"{tuple(hidden.shape)} vs {tuple(weight.shape)}")
    if hidden.dtype != weight.dtype:
        raise TypeError(f"linear_cross_entropy: hidden is {hidden.dtype} but weight is {weight.dtype}; cast one "
                        "of them (the GEMMs run in one dtype)")
    if target.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"linear_cross_entropy: target must hold integer token ids, got {target.dtype}")
    if chunk_size is not None and chunk_size < 1:
        raise ValueError(f"linear_cross_entropy: chunk_size must be >= 1, got {chunk_size}")
    if vocab_size is not None and vocab_size < 1:
        raise ValueError(f"linear_cross_entropy: vocab_size must be >= 1, got {vocab_size}")
    opts = _Options(tp_group, int(ignore_index), reduction, chunk_size, bool(sequence_parallel), bool(recompute),
                    bool(fp32_weight_grad), backend, None if vocab_size is None else int(vocab_size))
    return _LinearCrossEntropy.apply(hidden, weight, target, opts)
