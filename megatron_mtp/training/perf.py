"""GPU performance passes for the training step (issue 10); each is optional and none changes the maths.

* :func:`apply_compile` — ``torch.compile`` each ``TransformerLayer`` in place (``train.compile``). Inductor fuses
  the memory-bound pieces of a Llama block (RMSNorm in fp32, RoPE, SwiGLU's silu*up, residual adds, the casts)
  into a few Triton kernels and its partitioner recomputes cheap pointwise results in backward instead of
  saving them. Module names, ``state_dict`` keys and parameter identity are unchanged (``nn.Module.compile``),
  so checkpoints, TP marks and the pipeline specs do not see it.
* :class:`MasterWeightAdamW` — bf16 parameters with fp32 master weights, fp32 gradient accumulation and a
  fused AdamW on the masters: the regime DeepSpeed's bf16 mode uses (ZeRO >= 1), for ``LocalEngine``. Compute
  runs in bf16 without autocast's per-step weight casts, the residual stream is bf16, and the fused
  cross-entropy receives bf16 operands.
* :func:`apply_attention_layout` — lays q/k/v out as [batch, seq, heads, head_dim] (what the flash and cuDNN
  kernels read natively) and optionally expands the KV heads, so that SDPA may pick cuDNN's Hopper kernel,
  which needs equal head counts and that layout. Off unless the benchmark shows it pays.
* :func:`sdpa_backend` — which fused attention kernel SDPA picks for given q/k/v (a diagnostic).

Nothing here needs a GPU to import or to run; the passes are exercised on CPU by the tests.
"""
from __future__ import annotations

import types
from typing import Optional

import torch
import torch.nn.functional as F

from megatron_mtp.config import OptimizerConfig

# ---------------------------------------------------------------------------------------------------------
# torch.compile


def apply_compile(model: torch.nn.Module, mode: Optional[str] = None, dynamic: Optional[bool] = False) -> int:
    """Compile every ``TransformerLayer`` of ``model`` in place; returns how many were compiled.

    One compiled graph serves all layers of one shape (dynamo treats the parameters as inputs), so the compile
    cost is paid once per distinct layer shape and dtype, not per layer. Tensor-parallel collectives inside a
    layer are graph breaks (the mappings in ``parallel/mappings.py`` are ``torch.compiler.disable``d: traced,
    they lost gradients over NCCL); the pieces between them are still fused.
    """
    from megatron_mtp.model.transformer import TransformerLayer

    import torch._dynamo

    # Trunk layers and heads share code objects: a generous cache keeps every variant (train / eval, grad on /
    # off, the heads' call inside the memory-efficient loss) compiled instead of falling back to eager.
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
    if hasattr(torch._dynamo.config, "accumulated_cache_size_limit"):
        torch._dynamo.config.accumulated_cache_size_limit = max(
            torch._dynamo.config.accumulated_cache_size_limit, 512)
    count = 0
    for module in model.modules():
        if isinstance(module, TransformerLayer) and not getattr(module, "_mtp_compiled", False):
            module.compile(mode=mode, dynamic=dynamic)
            module._mtp_compiled = True
            count += 1
    return count


# ---------------------------------------------------------------------------------------------------------
# bf16 parameters with fp32 master weights


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
        from megatron_mtp.training.optimizer import param_groups

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
        from megatron_mtp.training.local_engine import global_grad_norm

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


# ---------------------------------------------------------------------------------------------------------
# Attention layout


def _rope_bshd(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """RoPE on [b, s, heads, d] with cos/sin [s, d] or [b, s, d]; returns a contiguous [b, s, heads, d]."""
    cos, sin = cos.unsqueeze(-2), sin.unsqueeze(-2)
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat([-x2, x1], dim=-1) * sin


def _attention_forward_bshd(self, x, cos, sin, kv_cache=None, attn_mask=None):
    """``Attention.forward`` with q/k/v built in [b, s, heads, d] memory order (same values, same maths)."""
    if kv_cache is not None:  # inference keeps the original path (the cache stores [b, heads, s, d])
        return type(self).forward(self, x, cos, sin, kv_cache, attn_mask)
    from megatron_mtp.parallel import state

    b, s = x.shape[0], x.shape[1] * (state.tp_size() if self.qkv.sequence_parallel else 1)
    qkv = self.qkv(x).view(b, s, self.n_kv, self.group + 2, self.head_dim)
    q = _rope_bshd(qkv[:, :, :, : self.group].reshape(b, s, self.n_q, self.head_dim), cos, sin)
    k = _rope_bshd(qkv[:, :, :, self.group], cos, sin)
    v = qkv[:, :, :, self.group + 1].contiguous()
    if self._mtp_expand_kv and self.group > 1:
        # query head j reads KV head j // group: repeat each KV head `group` times in place
        k = k.repeat_interleave(self.group, dim=2)
        v = v.repeat_interleave(self.group, dim=2)
    q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    if hasattr(self, "_attention"):  # the layer's own SDPA call (dropout, RNG tracker)
        o = self._attention(q, k, v, attn_mask)
    else:
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=attn_mask is None,
                                           enable_gqa=self.group > 1)
    return self.out(o.transpose(1, 2).reshape(b, s, self.n_q * self.head_dim))


def apply_attention_layout(model: torch.nn.Module, expand_kv: bool = False) -> int:
    """Patch every ``Attention`` of ``model`` to build q/k/v in [b, s, h, d] order (optionally expanding GQA's
    KV heads). Returns the number of modules patched. Apply before :func:`apply_compile`."""
    from megatron_mtp.model.transformer import Attention

    count = 0
    for module in model.modules():
        if isinstance(module, Attention):
            module._mtp_expand_kv = bool(expand_kv)
            module.forward = types.MethodType(_attention_forward_bshd, module)
            count += 1
    return count


_SDPA_NAMES = {0: "math", 1: "flash", 2: "efficient", 3: "cudnn", 4: "overrideable"}


def sdpa_backend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, is_causal: bool = True,
                 enable_gqa: bool = False) -> str:
    """The fused kernel SDPA would run for these inputs ("flash", "cudnn", "efficient", "math", ...)."""
    try:
        choice = torch._fused_sdp_choice(q, k, v, None, 0.0, is_causal, scale=None, enable_gqa=enable_gqa)
    except TypeError:  # torch without enable_gqa in the chooser
        choice = torch._fused_sdp_choice(q, k, v, None, 0.0, is_causal)
    except RuntimeError as exc:
        return f"error: {exc}"[:200]
    return _SDPA_NAMES.get(int(choice), str(choice))


def sdpa_reasons(q, k, v, is_causal: bool = True, enable_gqa: bool = False) -> dict:
    """Per backend: can SDPA use it for these inputs (True/False), with the warnings it gives when not."""
    import warnings

    out = {}
    try:
        params = torch.backends.cuda.SDPAParams(q, k, v, None, 0.0, is_causal, enable_gqa)
    except Exception as exc:  # noqa: BLE001 - a diagnostic must not fail the caller
        return {"error": f"{type(exc).__name__}: {exc}"[:200]}
    for name, fn in (("flash", "can_use_flash_attention"), ("efficient", "can_use_efficient_attention"),
                     ("cudnn", "can_use_cudnn_attention")):
        check = getattr(torch.backends.cuda, fn, None)
        if check is None:
            continue
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                ok = bool(check(params, True))
            except Exception as exc:  # noqa: BLE001
                ok, caught = False, [types.SimpleNamespace(message=f"{type(exc).__name__}: {exc}")]
        out[name] = {"usable": ok, "why_not": [str(w.message)[:200] for w in caught][:3] if not ok else []}
    return out


def reference_attention(q, k, v, group: int) -> torch.Tensor:
    """Causal attention in plain PyTorch with GQA by repetition (tests)."""
    if group > 1:
        k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    return F.scaled_dot_product_attention(q, k, v, is_causal=True)
