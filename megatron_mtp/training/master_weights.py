"""bf16 parameters with fp32 master weights (``train.master_weights``, ``LocalEngine`` on GPU).

The regime DeepSpeed's bf16 mode uses (ZeRO >= 1), for the single-replica engine: fp32 master weights,
fp32 gradient accumulation and a fused AdamW on the masters. Compute runs in bf16 without autocast's
per-step weight casts, the residual stream is bf16, and the fused cross-entropy receives bf16 operands.
Nothing here needs a GPU to run; the tests exercise it on CPU.

With ``train.compile`` and ``optimizer.compiled_step`` (off by default until it is timed on a GPU) the optimizer step is one compiled
function (:func:`adamw_master_step`): for each parameter, the clip factor, AdamW on the fp32 master and the
bf16 copy are one pass over the gradient, the master, the two moments and the bf16 parameter. With one
micro-batch it reads the bf16 gradient that backward produced, so no fp32 gradient is ever materialised.
"""
from __future__ import annotations

import warnings

import torch

from megatron_mtp.config import OptimizerConfig
from megatron_mtp.training.grads import global_grad_norm
from megatron_mtp.training.optimizer import param_groups


class _ParamView:
    """Looks like a module to the engine's gradient helpers (``.parameters()``), yielding the given tensors."""

    def __init__(self, params: list):
        self._params = params

    def parameters(self):
        return iter(self._params)


_MARKS = ("init_key", "init_std", "partition_dim", "partition_chunks", "logical_size", "tensor_model_parallel",
          "model_parallel", "sequence_parallel")


def adamw_master_step(groups: list, coef) -> None:
    """One AdamW step, computed as ``torch.optim.AdamW`` computes it (decoupled weight decay, bias correction
    from each parameter's own step count), on fp32 masters, then the bf16 parameter := the updated master.

    ``groups``: per parameter group ``(params, grads, masters, exp_avgs, exp_avg_sqs, steps, lr, weight_decay,
    beta1, beta2, eps)``; ``lr`` and the ``steps`` are tensors, so neither the schedule nor the step count is a
    constant of the compiled graph. A gradient is read in its own dtype (bf16 from backward, or the fp32
    accumulation of several micro-batches) and multiplied by ``coef``, the clip factor (None: no clipping).
    Compiled, each parameter's chain becomes one kernel: one read of the gradient, master and moments, one
    write of the master, moments and bf16 parameter."""
    for params, grads, masters, exp_avgs, exp_avg_sqs, steps, lr, weight_decay, beta1, beta2, eps in groups:
        torch._foreach_add_(steps, 1)  # one kernel for all the scalar counts, not one per parameter
        for p, g, m, exp_avg, exp_avg_sq, step in zip(params, grads, masters, exp_avgs, exp_avg_sqs, steps):
            g = g.float()
            if coef is not None:
                g = g * coef
            if weight_decay != 0:
                m.mul_(1 - lr * weight_decay)
            exp_avg.lerp_(g, 1 - beta1)
            exp_avg_sq.mul_(beta2).addcmul_(g, g, value=1 - beta2)
            bias_correction1 = 1 - beta1 ** step
            bias_correction2_sqrt = (1 - beta2 ** step).sqrt()
            step_size = lr / bias_correction1
            denom = (exp_avg_sq.sqrt() / bias_correction2_sqrt).add_(eps)
            m.add_(-step_size * exp_avg / denom)  # addcdiv's order: (value * exp_avg) / denom
            p.copy_(m)


class MasterWeightAdamW:
    """AdamW over fp32 master copies of a bf16 model; gradients accumulate in fp32.

    Per micro-batch, after ``backward``, call :meth:`accumulate_grads`: it adds the bf16 ``.grad`` of every
    parameter into the fp32 master gradient and frees the bf16 one (so accumulation over micro-batches is in
    fp32, as the design asks). Gradient clipping and the sequence-parallel all-reduce act on
    :attr:`grad_view` (the gradients the step will read). :meth:`step` runs a fused AdamW on the masters and
    copies them back into the bf16 parameters.

    ``compiled_step``: :meth:`step` runs :func:`adamw_master_step` through ``torch.compile`` instead, with the
    clip factor inside it; the last micro-batch's ``accumulate_grads(last=True)`` then leaves the bf16
    gradients in place when there was only one micro-batch (the step reads them directly). If compiling
    fails, one warning, and the step is torch's AdamW and a separate copy from then on.

    ``state_dict`` is a torch AdamW state dict (the masters are ordered and grouped exactly as
    ``training.optimizer.param_groups`` orders the model's parameters, so checkpoint tools that read the Adam
    moments by index keep working) plus one extra key, ``master_weights``. Loading a state dict without it
    (e.g. one written by the autocast regime) takes the masters from the model's current weights. Both steps
    keep the same state, so either resumes the other's checkpoints.
    """

    def __init__(self, model: torch.nn.Module, cfg: OptimizerConfig, device: torch.device,
                 compiled_step: bool = False):
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
        self._param_of = {id(m): p for p, m in zip(self.params, self.masters)}
        # compiled lazily, at the first step; the learning rates live in tensors (one per group) so that the
        # schedule never recompiles the step
        self.compiled_step = torch.compile(adamw_master_step, fullgraph=True, dynamic=False) if compiled_step \
            else None
        self._lrs = [torch.zeros((), dtype=torch.float32, device=g["params"][0].device if g["params"] else device)
                     for g in master_groups]
        self._clip_coef = None

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
        self._clip_coef = None

    @torch.no_grad()
    def accumulate_grads(self, last: bool = False) -> None:
        """Fold the parameters' bf16 gradients into the fp32 master gradients and free them. With the compiled
        step, ``last`` (after the step's last backward) leaves a bf16 gradient that has no fp32 one to join,
        i.e. the only micro-batch's, where it is: the compiled step reads it directly."""
        keep = last and self.compiled_step is not None
        first, acc_dst, acc_src = [], [], []
        for p, m in zip(self.params, self.masters):
            g = p.grad
            if g is None:
                continue
            if m.grad is None:
                if not keep:
                    first.append((p, m))
            else:
                acc_dst.append(m.grad)
                acc_src.append(g)
        for p, m in first:
            m.grad = p.grad.to(torch.float32)
            p.grad = None  # free each bf16 gradient as soon as it is folded: peak +4 bytes/param, not +6
        if acc_dst:
            torch._foreach_add_(acc_dst, acc_src)
        for p, m in zip(self.params, self.masters):
            if m.grad is not None:
                p.grad = None

    @property
    def grad_view(self) -> _ParamView:
        """The tensors whose ``.grad`` the step reads, for the gradient helpers (the sequence-parallel
        all-reduce, the norm): each master that holds an fp32 gradient, else the bf16 parameter."""
        return _ParamView([m if m.grad is not None or p.grad is None else p
                           for p, m in zip(self.params, self.masters)])

    @torch.no_grad()
    def clip_grad_norm_(self, max_norm: float) -> torch.Tensor:
        """Global gradient norm of :attr:`grad_view` (TP/PP-aware, ``grads.global_grad_norm``; bf16 gradients
        are summed in fp32), clipped to ``max_norm``. The clip factor is applied where the step reads the
        gradients: inside the compiled step, or as the fused AdamW's ``grad_scale`` input (which divides every
        gradient), saving a read and write of all gradients; else the gradients are scaled here."""
        norm = global_grad_norm(self.grad_view)
        if max_norm > 0:
            self._clip_coef = (max_norm / (norm + 1e-6)).clamp(max=1.0)
            if self.compiled_step is None:
                self._scale_eagerly()
        return norm

    def _scale_eagerly(self) -> None:
        """Apply the pending clip factor to the fp32 master gradients, or hand it to the fused AdamW."""
        if self._clip_coef is None:
            return
        if self.inner.defaults.get("fused"):
            self.inner.grad_scale = (1.0 / self._clip_coef).to(torch.float32)
        else:
            torch._foreach_mul_([m.grad for m in self.masters if m.grad is not None], self._clip_coef)
        self._clip_coef = None

    @torch.no_grad()
    def step(self) -> None:
        if self.compiled_step is not None:
            try:
                self._step_compiled()
                return
            except Exception as exc:  # noqa: BLE001 - compiling fails before any tensor is touched
                self.compiled_step = None
                # the compiler's own error, not dynamo's wrapper of it
                exc = getattr(exc, "inner_exception", None) or exc.__cause__ or exc
                reason = (str(exc).strip().splitlines() or [""])[0][:200]
                warnings.warn(f"the compiled optimizer step failed ({type(exc).__name__}: {reason}), so this run "
                              "uses torch's AdamW and a separate bf16 copy instead (set optimizer.compiled_step "
                              "false to skip the attempt)", RuntimeWarning, stacklevel=3)
        self.accumulate_grads()
        self._scale_eagerly()
        try:
            self.inner.step()
        finally:
            self.inner.grad_scale = None
        try:
            torch._foreach_copy_(self.params, self.masters)
        except (RuntimeError, AttributeError):  # older torch: no mixed-dtype foreach copy
            for p, m in zip(self.params, self.masters):
                p.copy_(m)

    def _step_compiled(self) -> None:
        groups = []
        for group, lr in zip(self.inner.param_groups, self._lrs):
            lr.fill_(group["lr"])
            params, grads, masters, exp_avgs, exp_avg_sqs, steps = [], [], [], [], [], []
            for m in group["params"]:
                p = self._param_of[id(m)]
                g = m.grad if m.grad is not None else p.grad
                if g is None:  # as torch's AdamW: a parameter without a gradient is left alone
                    continue
                state = self.inner.state[m]
                if not state:  # torch's AdamW state, as its fused (device-side step count) variant keeps it
                    state["step"] = torch.zeros((), dtype=torch.float32, device=m.device)
                    state["exp_avg"] = torch.zeros_like(m, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(m, memory_format=torch.preserve_format)
                elif state["step"].device != m.device or state["step"].dtype != torch.float32:
                    state["step"] = state["step"].to(device=m.device, dtype=torch.float32)  # a CPU-side count
                params.append(p)
                grads.append(g)
                masters.append(m)
                exp_avgs.append(state["exp_avg"])
                exp_avg_sqs.append(state["exp_avg_sq"])
                steps.append(state["step"])
            if group["amsgrad"] or group["maximize"]:
                raise NotImplementedError("the compiled step implements AdamW without amsgrad or maximize")
            beta1, beta2 = group["betas"]
            groups.append((params, grads, masters, exp_avgs, exp_avg_sqs, steps, lr, group["weight_decay"],
                           beta1, beta2, group["eps"]))
        self.compiled_step(groups, self._clip_coef)
        self._clip_coef = None

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
