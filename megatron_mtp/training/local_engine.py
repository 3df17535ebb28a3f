"""The training engine for one model replica: a single process or one tensor-parallel group.

Data parallelism, ZeRO and pipeline stages go through DeepSpeed (``deepspeed_engine.py``); both implement
``training.engine.Engine``, so the loop and the checkpoint manager do not care which one they drive.
"""
from __future__ import annotations

import os
from typing import Callable

import torch

from megatron_mtp.config import Config
from megatron_mtp.io_utils import atomic_torch_save, load_torch
from megatron_mtp.parallel import state
from megatron_mtp.parallel.canonical import copy_into_model, copy_into_params
from megatron_mtp.training.engine import LOCAL_FORMAT, EngineBase, StepResult
from megatron_mtp.training.grads import allreduce_sequence_parallel_grads, autocast_context, clip_gradients
from megatron_mtp.training.guard import all_finite
from megatron_mtp.training.master_weights import MasterWeightAdamW
from megatron_mtp.training.optimizer import build_optimizer


def use_master_weights(cfg: Config, device: torch.device, dtype: torch.dtype) -> bool:
    """bf16 parameters + fp32 masters (``train.master_weights``, the default) apply on CUDA with bf16; on
    CPU, and for fp32/fp64 runs, parameters stay fp32 (bf16 then means autocast)."""
    return bool(cfg.train.master_weights) and device.type == "cuda" and dtype == torch.bfloat16


class LocalEngine(EngineBase):
    checkpoint_format = LOCAL_FORMAT

    def __init__(self, model: torch.nn.Module, cfg: Config, device: torch.device, dtype: torch.dtype,
                 master_weights: bool = False):
        self.model, self.cfg, self.device, self.dtype = model, cfg, device, dtype
        # master_weights (GPU bf16): bf16 parameters, fp32 master weights and fp32 gradient accumulation
        # (training/master_weights.py), the regime of DeepSpeed's bf16 mode; else fp32 parameters, with
        # autocast when dtype is bf16.
        self.master_weights = bool(master_weights) and dtype == torch.bfloat16
        if self.master_weights:
            model.to(torch.bfloat16)
            # with compiled layers, the optimizer step is compiled too (one pass per parameter); the
            # master-weight regime is a CUDA one (use_master_weights), so this is the GPU's ``fast`` regime
            self.optimizer = MasterWeightAdamW(model, cfg.optimizer, device,
                                               compiled_step=cfg.train.compile and cfg.optimizer.compiled_step)
        else:
            self.optimizer = build_optimizer(model, cfg.optimizer, device)


    def train_step(self, micro_batches: list, step: int) -> StepResult:
        self.model.train()
        self.optimizer.zero_grad(set_to_none=True)
        accum = len(micro_batches)
        loss_sum, heads_sum = 0.0, 0.0
        for i, tokens in enumerate(micro_batches):
            with autocast_context(self.device, self.dtype):
                loss, head_losses = self.model(tokens.to(self.device, non_blocking=True))
            (loss / accum).backward()
            if self.master_weights:  # fp32 accumulation across micro-batches
                self.optimizer.accumulate_grads(last=i == accum - 1)
            loss_sum = loss_sum + loss.detach()
            heads_sum = heads_sum + head_losses
        if self.master_weights:  # the gradients the step reads; the clip factor is applied inside the step
            allreduce_sequence_parallel_grads(self.optimizer.grad_view)
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

    def state_dict(self) -> dict:
        return {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict()}

    def load_state_dict(self, sd: dict, load_optimizer: bool = True) -> None:
        self.model.load_state_dict(sd["model"])
        if load_optimizer:
            self.optimizer.load_state_dict(sd["optimizer"])
        elif self.master_weights:
            self.optimizer.sync_from_model()

    def save_to(self, ckpt_dir: str) -> None:
        """Every TP rank writes its model and optimizer shard (there is no data parallelism here)."""
        atomic_torch_save(self.state_dict(), os.path.join(ckpt_dir, self.shard_name()))

    def load_from(self, ckpt_dir: str, load_optimizer: bool = True) -> None:
        self.load_state_dict(load_torch(os.path.join(ckpt_dir, self.shard_name())), load_optimizer)

    @torch.no_grad()
    def load_full_weights(self, weight: Callable[[str], torch.Tensor]) -> None:
        copy_into_model(self.model, weight)
        if self.master_weights:  # the fp32 masters take the fp32 values, not the bf16 rounding
            copy_into_params(((str(i), m) for i, m in enumerate(self.optimizer.masters)), weight)

