"""Gradient helpers shared by both engines: sequence-parallel reductions, the global norm, clipping, autocast."""
from __future__ import annotations

from contextlib import nullcontext

import torch
import torch.distributed as dist

from megatron_mtp.parallel import state
from megatron_mtp.training import ds_compat


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
    flat = flat.to(torch.promote_types(flat.dtype, torch.float32))  # bf16 gradients are summed in fp32
    dist.all_reduce(flat, group=group)
    offset = 0
    for g in grads:
        g.copy_(flat[offset: offset + g.numel()].view_as(g))
        offset += g.numel()


def global_grad_norm(model: torch.nn.Module) -> torch.Tensor:
    """L2 norm of the whole model's gradient: TP-sharded parameters count on every rank, replicated ones
    on TP rank 0 only, then summed over the model-parallel (TP x PP) group. A weight tied across pipeline
    stages (DeepSpeed's ``ds_pipe_replicated`` copies of the embedding) counts once, on its owning stage.
    bf16 gradients are summed in fp32 (no fp32 copy of them is made)."""
    grads = [p.grad.detach() for p in model.parameters() if p.grad is not None
             and not ds_compat.is_pipe_replicated(p)
             and (getattr(p, "tensor_model_parallel", False) or state.tp_rank() == 0)]
    if grads:  # one fused multi-tensor kernel instead of pow + sum per parameter
        wide = torch.float64 if any(g.dtype == torch.float64 for g in grads) else torch.float32
        norms = torch._foreach_norm(grads, 2, dtype=wide)
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
