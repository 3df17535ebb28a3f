"""The training engine for one model replica: a single process or one tensor-parallel group.

Data parallelism, ZeRO and pipeline stages go through DeepSpeed (``deepspeed_engine.py``); both engines
offer the same ``train_step`` so the loop does not care which one it drives.
"""
from __future__ import annotations

import os
from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.distributed as dist

from megatron_mtp.config import Config
from megatron_mtp.parallel import state
from megatron_mtp.training.guard import all_finite
from megatron_mtp.training.lr_schedule import learning_rate
from megatron_mtp.training.optimizer import build_optimizer


@dataclass
class StepResult:
    loss: torch.Tensor  # weighted total, averaged over micro-batches (a device tensor: no host sync)
    head_losses: torch.Tensor  # [n] per-head mean losses
    grad_norm: torch.Tensor
    lr: float
    skipped: bool = False  # the loss or gradient norm was not finite, so no update (training/guard.py)


def autocast_context(device: torch.device, dtype: torch.dtype):
    """bf16 autocast on GPU (fp32 master weights); plain fp32/fp64 on CPU."""
    if device.type == "cuda" and dtype == torch.bfloat16:
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return nullcontext()


def allreduce_sequence_parallel_grads(model: torch.nn.Module) -> None:
    """Norm weights see only their sequence shard under sequence parallelism: sum their grads over TP."""
    group = state.tp_group()
    if state.tp_size() == 1:
        return
    grads = [p.grad for p in model.parameters() if getattr(p, "sequence_parallel", False) and p.grad is not None]
    if not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat, group=group)
    offset = 0
    for g in grads:
        g.copy_(flat[offset: offset + g.numel()].view_as(g))
        offset += g.numel()


def global_grad_norm(model: torch.nn.Module) -> torch.Tensor:
    """L2 norm of the whole model's gradient: TP-sharded parameters count on every rank, replicated ones
    on TP rank 0 only, then summed over the model-parallel (TP x PP) group. A weight tied across pipeline
    stages (DeepSpeed's ``ds_pipe_replicated`` copies of the embedding) counts once, on its owning stage."""
    grads = [p.grad.detach() for p in model.parameters() if p.grad is not None
             and not getattr(p, "ds_pipe_replicated", False)
             and (getattr(p, "tensor_model_parallel", False) or state.tp_rank() == 0)]
    if grads:  # one fused multi-tensor kernel instead of pow + sum per parameter (perf, issue 10)
        norms = torch._foreach_norm(grads)
        total = torch.stack([n.float() for n in norms]).pow(2).sum()
    else:
        total = torch.zeros((), device=next(model.parameters()).device)
    group = state.get_state().model_parallel_group
    if group is not None and dist.get_world_size(group) > 1:
        dist.all_reduce(total, group=group)
    return total.sqrt()


def clip_gradients(model: torch.nn.Module, max_norm: float) -> torch.Tensor:
    norm = global_grad_norm(model)
    if max_norm > 0:
        coef = (max_norm / (norm + 1e-6)).clamp(max=1.0)
        torch._foreach_mul_([p.grad for p in model.parameters() if p.grad is not None], coef)
    return norm


class LocalEngine:
    def __init__(self, model: torch.nn.Module, cfg: Config, device: torch.device, dtype: torch.dtype,
                 master_weights: bool = False):
        self.model, self.cfg, self.device, self.dtype = model, cfg, device, dtype
        # master_weights (GPU bf16): bf16 parameters, fp32 master weights and fp32 gradient accumulation
        # (training/perf.py), the regime of DeepSpeed's bf16 mode; default: fp32 parameters under autocast.
        self.master_weights = bool(master_weights) and dtype == torch.bfloat16
        if self.master_weights:
            from megatron_mtp.training.perf import MasterWeightAdamW

            model.to(torch.bfloat16)
            self.optimizer = MasterWeightAdamW(model, cfg.optimizer, device)
        else:
            self.optimizer = build_optimizer(model, cfg.optimizer, device)
        self.decay_iters = cfg.optimizer.decay_iters or cfg.train.iters

    def lr_at(self, step: int) -> float:
        o = self.cfg.optimizer
        return learning_rate(step, o.lr, o.min_lr, o.warmup_iters, self.decay_iters)

    def train_step(self, micro_batches: list, step: int) -> StepResult:
        self.model.train()
        self.optimizer.zero_grad(set_to_none=True)
        accum = len(micro_batches)
        loss_sum, heads_sum = 0.0, 0.0
        for tokens in micro_batches:
            with autocast_context(self.device, self.dtype):
                loss, head_losses = self.model(tokens.to(self.device, non_blocking=True))
            (loss / accum).backward()
            if self.master_weights:
                self.optimizer.accumulate_grads()  # fp32 accumulation across micro-batches
            loss_sum = loss_sum + loss.detach()
            heads_sum = heads_sum + head_losses
        if self.master_weights:  # fp32 master gradients; the clip factor is applied inside the fused AdamW
            allreduce_sequence_parallel_grads(self.optimizer.master_view)
            grad_norm = self.optimizer.clip_grad_norm_(self.cfg.optimizer.clip_grad)
        else:
            allreduce_sequence_parallel_grads(self.model)
            grad_norm = clip_gradients(self.model, self.cfg.optimizer.clip_grad)
        lr = self.lr_at(step)
        loss = loss_sum / accum
        if not all_finite(loss, grad_norm):  # reduced over the world: every TP rank skips together
            self.optimizer.zero_grad(set_to_none=True)
            return StepResult(loss, heads_sum / accum, grad_norm, lr, skipped=True)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.optimizer.step()
        return StepResult(loss, heads_sum / accum, grad_norm, lr)

    @torch.no_grad()
    def eval_step(self, micro_batches: list) -> torch.Tensor:
        self.model.eval()
        heads_sum = 0.0
        for tokens in micro_batches:
            with autocast_context(self.device, self.dtype):
                _, head_losses = self.model(tokens.to(self.device))
            heads_sum = heads_sum + head_losses
        return heads_sum / len(micro_batches)

    # ---- checkpoint hooks (the CheckpointManager owns directories, atomic publishing, RNG, data position)

    def shard_name(self) -> str:
        return f"model_tp{state.tp_rank():02d}.pt"

    def save_to(self, ckpt_dir: str) -> None:
        """Every TP rank writes its model and optimizer shard (there is no data parallelism here)."""
        from megatron_mtp.checkpoint.manager import atomic_torch_save

        atomic_torch_save({"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict()},
                          os.path.join(ckpt_dir, self.shard_name()))

    def load_from(self, ckpt_dir: str, load_optimizer: bool = True) -> None:
        sd = torch.load(os.path.join(ckpt_dir, self.shard_name()), map_location="cpu", weights_only=False)
        self.model.load_state_dict(sd["model"])
        if load_optimizer:
            self.optimizer.load_state_dict(sd["optimizer"])
        elif self.master_weights:
            self.optimizer.sync_from_model()
