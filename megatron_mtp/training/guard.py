"""The non-finite guard: a step whose loss or gradient norm is NaN or infinite updates nothing, too many such
steps in a row end the run, and a non-finite state is never saved.

Skipping follows Megatron: the step still counts (the learning-rate schedule and data order move on), the
optimizer leaves weights and Adam moments untouched, and the log reports ``skipped_iters`` per logging window
with the skipped steps left out of the logged losses. Every rank must take the same decision or the replicas
drift apart (and the next collective pairs different operations), so each decision is reduced over the whole
world first. That makes one host sync per step (Megatron makes the same one, reading its gradient norm).

Where the decision is taken:

* ``LocalEngine``: after the gradient norm, before ``optimizer.step`` (:func:`all_finite`).
* ``DeepSpeedEngine``: DeepSpeed's ZeRO optimizers skip a step whose gradient norm is not finite, for bf16 and
  fp32 alike (``engine.was_step_applied()`` reports it; checked with deepspeed 0.19.8, and a user JSON that
  sets ``bf16.check_grad_overflow`` false turns it off for bf16); without ZeRO our own clipping hook drops the
  gradients instead. A non-finite loss is turned into NaN gradients on its rank (:func:`poison_non_finite`)
  so the same gradient test catches it on every rank, with no extra collective.
"""
from __future__ import annotations

import math

import torch
import torch.distributed as dist

from megatron_mtp.errors import TrainingError


def _any_rank(flag: bool, device: torch.device) -> bool:
    """True on every rank if ``flag`` is true on any rank."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def all_finite(*values: torch.Tensor) -> bool:
    """Whether every value is finite on every rank (the same answer everywhere)."""
    bad = torch.stack([(~torch.isfinite(v.detach().float())).any() for v in values]).any()
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        bad = bad.float().reshape(1)
        dist.all_reduce(bad, op=dist.ReduceOp.MAX)
    return not bool(bad.item())


def poison_non_finite(loss: torch.Tensor) -> torch.Tensor:
    """``loss`` unchanged if finite, else a loss whose gradients are all NaN (device-side, no host sync).

    An infinite loss can have finite gradients (a certain-wrong target under a saturated softmax); scaling the
    upstream gradient by NaN makes the step's gradient norm NaN, which the optimizer's own test then rejects on
    every data- and model-parallel rank."""
    scale = torch.where(torch.isfinite(loss.detach()), 1.0, math.nan).to(loss.dtype)
    return loss * scale


def parameters_finite(model: torch.nn.Module) -> bool:
    """Whether every parameter on every rank is finite (one fused norm per rank, one all-reduce)."""
    params = [p.detach() for p in model.parameters()]
    device = params[0].device if params else torch.device("cpu")
    if params:
        norms = torch._foreach_norm(params)
        ok = bool(torch.isfinite(torch.stack([n.float() for n in norms]).sum()).item())
    else:
        ok = True
    return not _any_rank(not ok, device)


class SkipCounter:
    """Skipped steps: per logging window (``skipped_iters``), in a row, and the stop after too many in a row."""

    def __init__(self, max_consecutive: int, is_reporter: bool):
        self.max_consecutive = max_consecutive
        self.is_reporter = is_reporter
        self.window = 0
        self.in_a_row = 0

    def record(self, skipped: bool, step: int) -> None:
        """Count step ``step`` (1-based, as logged); raise TrainingError on the ``max_consecutive``-th skip in
        a row. Every rank calls it with the same ``skipped``, so every rank stops at the same step."""
        if not skipped:
            self.in_a_row = 0
            return
        self.window += 1
        self.in_a_row += 1
        if self.is_reporter:
            print(f"step {step}: the loss or gradient norm is not finite; update skipped "
                  f"({self.in_a_row} in a row, train.max_consecutive_skips is {self.max_consecutive})", flush=True)
        if self.in_a_row >= self.max_consecutive:
            raise TrainingError(
                f"the loss or gradient norm was not finite for {self.in_a_row} steps in a row (steps "
                f"{step - self.in_a_row + 1}-{step}), so training stopped; resume from the last checkpoint with "
                f"a lower optimizer.lr or a stricter optimizer.clip_grad.")

    def take_window(self) -> int:
        n, self.window = self.window, 0
        return n


def save_if_finite(ckpt, engine, step: int, train_iter) -> None:
    """``ckpt.save`` unless a parameter is not finite on some rank: then nothing is written (the last good
    checkpoint stays the newest, so rotation cannot prune it) and the run stops with a TrainingError."""
    if not parameters_finite(engine.model):
        raise TrainingError(f"the model's parameters are not finite at step {step}, so no checkpoint was written; "
                            f"resume from the newest one under {ckpt.root} (the last good state) with a lower "
                            f"optimizer.lr.")
    ckpt.save(step, train_iter)
