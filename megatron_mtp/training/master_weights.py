"""bf16 parameters with fp32 master weights (``train.master_weights``, ``LocalEngine`` on GPU).

The regime DeepSpeed's bf16 mode uses (ZeRO >= 1), for the single-replica engine: fp32 master weights,
fp32 gradient accumulation and a fused AdamW on the masters. Compute runs in bf16 without autocast's
per-step weight casts, the residual stream is bf16, and the fused cross-entropy receives bf16 operands.
Nothing here needs a GPU to run; the tests exercise it on CPU.
"""
from __future__ import annotations

import torch

from megatron_mtp.config import OptimizerConfig
from megatron_mtp.training.grads import global_grad_norm
from megatron_mtp.training.optimizer import param_groups




def use_master_weights(device: torch.device, dtype: torch.dtype) -> bool:
    """The default precision regime of ``LocalEngine``: bf16 parameters + fp32 masters on CUDA with bf16."""
    return device.type == "cuda" and dtype == torch.bfloat16


class _ParamView:
    """Looks like a module to the engine's gradient helpers (``.parameters()``), yielding the fp32 masters."""

    def __init__(self, params: list):
        self._params = params

    def parameters(self):
        return iter(self._params)


_MARKS = ("init_key", "init_std", "partition_dim", "partition_chunks", "logical_size", "tensor_model_parallel",
          "model_parallel", "sequence_parallel")


class MasterWeightAdamW:
    """AdamW over fp32 master copies of a bf16 model; gradients accumulate in fp32.

    Per micro-batch, after ``backward``, call :meth:`accumulate_grads`: it adds the bf16 ``.grad`` of every
    parameter into the fp32 master gradient and frees the bf16 one (so accumulation over micro-batches is in
    fp32, as the design asks). Gradient clipping and the sequence-parallel all-reduce act on
    :attr:`master_view` (the fp32 gradients). :meth:`step` runs a fused AdamW on the masters and copies them
    back into the bf16 parameters.

    ``state_dict`` is a torch AdamW state dict (the masters are ordered and grouped exactly as
    ``training.optimizer.param_groups`` orders the model's parameters, so checkpoint tools that read the Adam
    moments by index keep working) plus one extra key, ``master_weights``. Loading a state dict without it
    (e.g. one written by the autocast regime) takes the masters from the model's current weights.
    """

    def __init__(self, model: torch.nn.Module, cfg: OptimizerConfig, device: torch.device):
        groups = param_groups(model, cfg.weight_decay)
        self.params, self.masters, master_groups = [], [], []
        for group in groups:
            masters = []
            for p in group["params"]:
                m = p.detach().to(torch.float32, copy=True)
                m.requires_grad_(True)
                for mark in _MARKS:
                    if hasattr(p, mark):
                        setattr(m, mark, getattr(p, mark))
                self.params.append(p)
                self.masters.append(m)
                masters.append(m)
            master_groups.append({**group, "params": masters})
        fused = cfg.fused if cfg.fused is not None else device.type == "cuda"
        self.inner = torch.optim.AdamW(master_groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps,
                                       fused=fused or None)
        self.master_view = _ParamView(self.masters)

    @property
    def param_groups(self) -> list:
        return self.inner.param_groups

    @property
    def state(self):
        return self.inner.state

    def zero_grad(self, set_to_none: bool = True) -> None:
        for p in self.params:
            p.grad = None
        for m in self.masters:
            m.grad = None

    @torch.no_grad()
    def accumulate_grads(self) -> None:
        """Fold the parameters' bf16 gradients into the fp32 master gradients and free them."""
        first, acc_dst, acc_src = [], [], []
        for p, m in zip(self.params, self.masters):
            g = p.grad
            if g is None:
                continue
            if m.grad is None:
                first.append((p, m))
            else:
                acc_dst.append(m.grad)
                acc_src.append(g)
        for p, m in first:
            m.grad = p.grad.to(torch.float32)
            p.grad = None  # free each bf16 gradient as soon as it is folded: peak +4 bytes/param, not +6
        if acc_dst:
            torch._foreach_add_(acc_dst, acc_src)
        for p in self.params:
            p.grad = None

    @torch.no_grad()
    def clip_grad_norm_(self, max_norm: float) -> torch.Tensor:
        """Global gradient norm of the fp32 master gradients (TP/PP-aware, ``local_engine.global_grad_norm``),
        clipped to ``max_norm``. With the fused AdamW the clip factor rides in the optimizer kernel (its
        ``grad_scale`` input divides every gradient), saving a read and write of all gradients."""
        norm = global_grad_norm(self.master_view)
        if max_norm > 0:
            coef = (max_norm / (norm + 1e-6)).clamp(max=1.0)
            if self.inner.defaults.get("fused"):
                self.inner.grad_scale = (1.0 / coef).to(torch.float32)
            else:
                torch._foreach_mul_([m.grad for m in self.masters if m.grad is not None], coef)
        return norm

    @torch.no_grad()
    def step(self) -> None:
        self.accumulate_grads()
        try:
            self.inner.step()
        finally:
            self.inner.grad_scale = None
        try:
            torch._foreach_copy_(self.params, self.masters)
        except (RuntimeError, AttributeError):  # older torch: no mixed-dtype foreach copy
            for p, m in zip(self.params, self.masters):
                p.copy_(m)

    def state_dict(self) -> dict:
        sd = self.inner.state_dict()
        sd["master_weights"] = [m.detach() for m in self.masters]
        return sd

    @torch.no_grad()
    def load_state_dict(self, sd: dict) -> None:
        sd = dict(sd)
        masters = sd.pop("master_weights", None)
        self.inner.load_state_dict(sd)
        if masters is not None and len(masters) == len(self.masters):
            for m, w in zip(self.masters, masters):
                m.copy_(w)
        else:
            for m, p in zip(self.masters, self.params):
                m.copy_(p)
        for p, m in zip(self.params, self.masters):
            p.copy_(m)

    @torch.no_grad()
    def sync_from_model(self) -> None:
        """Masters <- the model's weights (after loading a model state dict without optimizer state)."""
        for m, p in zip(self.masters, self.params):
            m.copy_(p)
