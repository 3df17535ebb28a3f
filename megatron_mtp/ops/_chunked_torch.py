"""Pure-PyTorch twin of the native chunk loop (``csrc/linear_cross_entropy.cpp``), with the same entry points.

Used when ``megatron_mtp._C`` is not built (or cannot serve the device/dtype) and as an independent second
implementation in the tests. Same algorithm: per chunk of tokens, logits = h @ W^T, row statistics,
[tensor-parallel reduction], gradient of the logits formed in place, then d(hidden) and d(weight) with float32
accumulation of d(weight) across chunks. It materialises float32 copies of the chunk, so it is slower and
hungrier than the native path, but never the [tokens, vocab] logits.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch

StatsReducer = Optional[Callable[[torch.Tensor, torch.Tensor, torch.Tensor], None]]


def _compute_dtypes(hidden: torch.Tensor) -> tuple[torch.dtype, torch.dtype]:
    """(dtype of the GEMM operands, dtype of the statistics), mirroring the native path."""
    dtype = hidden.dtype
    if hidden.device.type == "cpu" and dtype in (torch.bfloat16, torch.float16):
        dtype = torch.float32
    return dtype, (torch.float64 if dtype == torch.float64 else torch.float32)


def _target_columns(target: torch.Tensor, vocab_start: int, vocab: int) -> tuple[torch.Tensor, torch.Tensor]:
    col = target - vocab_start
    local = (col >= 0) & (col < vocab)
    return col.clamp(0, max(vocab - 1, 0)), local


def _softmax_grad(logits: torch.Tensor, target: torch.Tensor, vocab_start: int, lse: torch.Tensor,
                  row_scale: torch.Tensor) -> torch.Tensor:
    grad = torch.exp(logits - lse[:, None])
    if logits.shape[1] == 0:
        return grad
    col, local = _target_columns(target, vocab_start, logits.shape[1])
    grad[torch.arange(grad.shape[0], device=grad.device), col] -= local.to(grad.dtype)
    grad *= row_scale[:, None]
    return torch.where(row_scale[:, None] == 0, torch.zeros((), dtype=grad.dtype, device=grad.device), grad)


class _WeightGradAccumulator:
    """dW = sum_c G_c^T @ h_c in float32 (or the weight dtype if that is wider, or if fp32 accumulation is off)."""

    def __init__(self, weight: torch.Tensor, fp32_accumulation: bool):
        wide = weight.dtype in (torch.float32, torch.float64)
        self.out_dtype = weight.dtype
        acc_dtype = weight.dtype if wide or not fp32_accumulation else torch.float32
        self.acc = torch.zeros(weight.shape, dtype=acc_dtype, device=weight.device)

    def add(self, grad_logits: torch.Tensor, hidden_chunk: torch.Tensor) -> None:
        if grad_logits.dtype == self.acc.dtype:
            self.acc.addmm_(grad_logits.t(), hidden_chunk)
            return
        try:  # torch >= 2.8 on CUDA: bf16 operands with a float32 accumulator, no upcast copies
            torch.addmm(self.acc, grad_logits.t(), hidden_chunk, out_dtype=self.acc.dtype, out=self.acc)
        except (TypeError, RuntimeError, NotImplementedError):
            self.acc.addmm_(grad_logits.t().to(self.acc.dtype), hidden_chunk.to(self.acc.dtype))

    def finish(self) -> torch.Tensor:
        return self.acc.to(self.out_dtype)


def _used_weight(weight: torch.Tensor, vocab_limit: int, dtype: torch.dtype) -> torch.Tensor:
    # Padding rows (ids >= the real vocabulary) are left out of the GEMMs: same as logits of -inf.
    rows = weight.shape[0] if vocab_limit < 0 else vocab_limit
    return weight[:rows].to(dtype).contiguous()


def _pad_rows(grad_weight: torch.Tensor, total_rows: int) -> torch.Tensor:
    if grad_weight.shape[0] == total_rows:
        return grad_weight
    full = grad_weight.new_zeros((total_rows,) + tuple(grad_weight.shape[1:]))
    full[:grad_weight.shape[0]] = grad_weight
    return full


def linear_ce_forward(hidden, weight, target, row_scale, vocab_start, vocab_limit, chunk_size, need_grad_hidden,
                      need_grad_weight, fp32_weight_grad, reduce_stats: StatsReducer):
    """-> [lse, target_logit, grad_hidden | None, grad_weight | None] (see csrc/linear_cross_entropy.h)."""
    out_dtype, total_rows = hidden.dtype, weight.shape[0]
    dtype, stats_dtype = _compute_dtypes(hidden)
    hidden = hidden.to(dtype).contiguous()
    weight = _used_weight(weight, vocab_limit, dtype)
    tokens, vocab = hidden.shape[0], weight.shape[0]
    chunk = max(1, min(int(chunk_size), tokens))
    want_grad = need_grad_hidden or need_grad_weight

    lse = torch.empty(tokens, dtype=stats_dtype, device=hidden.device)
    target_logit = torch.empty_like(lse)
    row_max = torch.empty_like(lse)
    row_sum = torch.empty_like(lse)
    if want_grad:
        row_scale = row_scale.to(device=hidden.device, dtype=stats_dtype)
    grad_hidden = torch.empty_like(hidden) if need_grad_hidden else None
    grad_weight = _WeightGradAccumulator(weight, fp32_weight_grad) if need_grad_weight else None

    for start in range(0, tokens, chunk):
        end = min(start + chunk, tokens)
        h = hidden[start:end]
        t = target[start:end]
        logits = (h @ weight.t()).to(stats_dtype)
        if vocab == 0:  # a tensor-parallel rank holding only padding: contributes nothing to the softmax
            row_max[start:end], row_sum[start:end], target_logit[start:end] = float("-inf"), 0.0, 0.0
        else:
            col, local = _target_columns(t, vocab_start, vocab)
            row_max[start:end] = logits.max(dim=1).values
            row_sum[start:end] = torch.exp(logits - row_max[start:end, None]).sum(dim=1)
            target_logit[start:end] = torch.where(local, logits.gather(1, col[:, None]).squeeze(1), 0.0)
        if not want_grad:
            continue
        if reduce_stats is not None:
            reduce_stats(row_max[start:end], row_sum[start:end], target_logit[start:end])
        lse[start:end] = row_max[start:end] + torch.log(row_sum[start:end])
        grad_logits = _softmax_grad(logits, t, vocab_start, lse[start:end], row_scale[start:end]).to(dtype)
        if grad_hidden is not None:
            grad_hidden[start:end] = grad_logits @ weight
        if grad_weight is not None:
            grad_weight.add(grad_logits, h)

    if not want_grad and tokens > 0:
        if reduce_stats is not None:
            reduce_stats(row_max, row_sum, target_logit)
        torch.add(row_max, torch.log(row_sum), out=lse)
    dh = grad_hidden.to(out_dtype) if grad_hidden is not None else None
    dw = _pad_rows(grad_weight.finish().to(out_dtype), total_rows) if grad_weight is not None else None
    return [lse, target_logit, dh, dw]


def linear_ce_backward(hidden, weight, target, lse, row_scale, vocab_start, vocab_limit, chunk_size,
                       need_grad_hidden, need_grad_weight, fp32_weight_grad):
    """-> [grad_hidden | None, grad_weight | None], recomputing each chunk's logits from the saved lse."""
    out_dtype, total_rows = hidden.dtype, weight.shape[0]
    dtype, stats_dtype = _compute_dtypes(hidden)
    hidden = hidden.to(dtype).contiguous()
    weight = _used_weight(weight, vocab_limit, dtype)
    tokens = hidden.shape[0]
    chunk = max(1, min(int(chunk_size), tokens))
    lse = lse.to(stats_dtype)
    row_scale = row_scale.to(stats_dtype)
    grad_hidden = torch.empty_like(hidden) if need_grad_hidden else None
    grad_weight = _WeightGradAccumulator(weight, fp32_weight_grad) if need_grad_weight else None
    if need_grad_hidden or need_grad_weight:
        for start in range(0, tokens, chunk):
            end = min(start + chunk, tokens)
            h = hidden[start:end]
            logits = (h @ weight.t()).to(stats_dtype)
            grad_logits = _softmax_grad(logits, target[start:end], vocab_start, lse[start:end],
                                        row_scale[start:end]).to(dtype)
            if grad_hidden is not None:
                grad_hidden[start:end] = grad_logits @ weight
            if grad_weight is not None:
                grad_weight.add(grad_logits, h)
    dh = grad_hidden.to(out_dtype) if grad_hidden is not None else None
    dw = _pad_rows(grad_weight.finish().to(out_dtype), total_rows) if grad_weight is not None else None
    return [dh, dw]
