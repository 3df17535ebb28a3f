"""AdamW with Llama's settings and the usual weight-decay split."""
from __future__ import annotations

import torch

from megatron_mtp.config import OptimizerConfig


def param_groups(model: torch.nn.Module, weight_decay: float) -> list:
    """Matrices (linears, embeddings) decay; vectors (norm weights) do not, as in Megatron and nanoGPT."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.dim() >= 2 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(model: torch.nn.Module, cfg: OptimizerConfig, device: torch.device) -> torch.optim.Optimizer:
    fused = cfg.fused if cfg.fused is not None else device.type == "cuda"
    return torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=(cfg.beta1, cfg.beta2),
                             eps=cfg.eps, fused=fused or None)
