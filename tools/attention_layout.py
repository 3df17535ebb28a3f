"""Benchmark-only attention experiments for tools/bench_train.py (not part of the library).

* :func:`apply_attention_layout` lays q/k/v out as [batch, seq, heads, head_dim] (what the flash and cuDNN
  kernels read natively) and optionally expands the KV heads, so that SDPA may pick cuDNN's Hopper kernel,
  which needs equal head counts and that layout. The measurements (docs/benchmarks.md) showed it does not
  pay, so the library keeps its own layout; the benchmark keeps the experiment reproducible.
* :func:`sdpa_backend` / :func:`sdpa_reasons`: which fused attention kernel SDPA picks for given q/k/v, and
  why the others were refused (diagnostics).
"""
from __future__ import annotations

import os
import sys
import types
import warnings

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..")))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from megatron_mtp.model.transformer import Attention  # noqa: E402
from megatron_mtp.parallel import state  # noqa: E402




def _rope_bshd(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """RoPE on [b, s, heads, d] with cos/sin [s, d] or [b, s, d]; returns a contiguous [b, s, heads, d]."""
    cos, sin = cos.unsqueeze(-2), sin.unsqueeze(-2)
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat([-x2, x1], dim=-1) * sin


def _attention_forward_bshd(self, x, cos, sin, attn_mask=None):
    """``Attention.forward`` with q/k/v built in [b, s, heads, d] memory order (same values, same maths).
    Decoding does not come through here: it uses the layer's own ``decode`` path."""
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
