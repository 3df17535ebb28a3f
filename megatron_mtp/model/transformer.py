"""A Llama decoder layer built from tensor-parallel pieces: RMSNorm, RoPE, grouped-query attention through
``scaled_dot_product_attention``, and a SwiGLU MLP. Trunk layers and transformer MTP heads are this class.

Activations are [batch, seq, hidden]. Under sequence parallelism a layer receives and returns its
sequence shard [batch, seq/tp, hidden]; the column-parallel projections gather the full sequence and the
row-parallel ones scatter it back.
"""
from __future__ import annotations

from contextlib import nullcontext
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from megatron_mtp.config import ModelConfig
from megatron_mtp.parallel import mappings, state
from megatron_mtp.parallel.layers import ColumnParallelLinear, RMSNorm, RowParallelLinear, scaled_init_std
from megatron_mtp.parallel.random import get_rng_tracker
from megatron_mtp.validation import dropout_probability


def rope_cos_sin(positions: torch.Tensor, head_dim: int, theta: float, dtype) -> tuple:
    """cos/sin tables for rotary embeddings at ``positions`` ([seq] or [batch, seq]), HF's half-split layout."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.float32) / head_dim))
    freqs = positions.to(torch.float32).unsqueeze(-1) * inv_freq
    emb = torch.cat([freqs, freqs], dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [batch, heads, seq, head_dim]; cos/sin: [seq, head_dim] or [batch, seq, head_dim]."""
    if cos.dim() == 3:
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    return x * cos + _rotate_half(x) * sin


class Attention(nn.Module):
    """Causal grouped-query self-attention. The fused QKV projection is laid out per KV group —
    [q heads of group 0, k0, v0, q heads of group 1, k1, v1, ...] — so a column split hands every TP rank
    whole groups (TP must divide the number of KV heads)."""

    def __init__(self, cfg: ModelConfig, key: str, sequence_parallel: bool, dtype=None):
        super().__init__()
        tp = state.tp_size()
        self.head_dim = cfg.head_dim
        self.n_kv = cfg.kv_heads // tp
        self.group = cfg.num_attention_heads // cfg.kv_heads  # query heads per KV head
        self.n_q = self.n_kv * self.group
        qkv_out = (cfg.num_attention_heads + 2 * cfg.kv_heads) * cfg.head_dim
        self.qkv = ColumnParallelLinear(cfg.hidden_size, qkv_out, init_key=f"{key}.qkv", init_std=cfg.init_std,
                                        sequence_parallel=sequence_parallel, dtype=dtype)
        self.out = RowParallelLinear(cfg.num_attention_heads * cfg.head_dim, cfg.hidden_size,
                                     init_key=f"{key}.out", init_std=scaled_init_std(cfg.init_std, cfg.num_layers),
                                     sequence_parallel=sequence_parallel, dtype=dtype)
        self.dropout = dropout_probability(cfg, "attention_dropout")

    def _attention(self, q, k, v, attn_mask):
        p = self.dropout if self.training else 0.0
        # Each TP rank holds different heads: their dropout masks must be independent, so draw them from
        # this rank's tracker stream (the default stream is identical on every TP rank).
        with get_rng_tracker().fork() if p > 0 else nullcontext():
            if attn_mask is None:
                return F.scaled_dot_product_attention(q, k, v, dropout_p=p, is_causal=True,
                                                      enable_gqa=self.group > 1)
            return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=p,
                                                  enable_gqa=self.group > 1)

    def forward(self, x, cos, sin, attn_mask: Optional[torch.Tensor] = None):
        # Under sequence parallelism x is a sequence shard; the QKV projection gathers the full sequence.
        b, s = x.shape[0], x.shape[1] * (state.tp_size() if self.qkv.sequence_parallel else 1)
        qkv = self.qkv(x).view(b, s, self.n_kv, self.group + 2, self.head_dim)
        q = qkv[:, :, :, : self.group].reshape(b, s, self.n_q, self.head_dim).transpose(1, 2)
        k = qkv[:, :, :, self.group].transpose(1, 2)
        v = qkv[:, :, :, self.group + 1].transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        o = self._attention(q, k, v, attn_mask)
        o = o.transpose(1, 2).reshape(b, s, self.n_q * self.head_dim)
        return self.out(o)


# ---------------------------------------------------------------------------------------------------------
# The decode path (KV cache, one process): pure functions of tensors, the same math as the modules above.
# They run m layers side by side on one input — m = 1 for a trunk layer, m = k - 1 for the draft heads of
# self-speculative decoding, whose weights a decoder stacks [m, ...] so that every head costs one batched
# kernel instead of one kernel each. Grouped-query attention folds the query heads that share a KV head into
# the query rows — [m * b, n_kv, group * s, head_dim] against keys [m * b, n_kv, capacity, head_dim] — so any
# attention kernel serves it without expanding the cache to the query heads.


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    xf = x.float()  # RMSNorm.forward's arithmetic, so the decode path matches the training forward
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).type_as(x) * weight


def stacked_alias(t: torch.Tensor, m: Optional[int] = None) -> torch.Tensor:
    """The first ``m`` of stacked weights ``t`` [n, ...] — or, for ``m`` None, a layer's own weight ``t`` as a
    stack of one [1, ...] — as a plain tensor over the same memory: no copy, no autograd, and not a view.
    A compiled decode step guards on a view's base (its sizes and strides), so the trunk's ``weight[None]``
    (base: the 2-D parameter) and the draft heads' ``stack[:m]`` (base: the 3-D stack) would each compile
    their own program; plain tensors of one layout share one."""
    if m is None:
        size, stride = (1, *t.shape), (t.numel(), *t.stride())
    else:
        size, stride = (m, *t.shape[1:]), t.stride()
    return t.new_empty(0).set_(t.untyped_storage(), t.storage_offset(), size, stride).detach()


def _stacked_linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x [m, rows, in] through weights [m, out, in] -> [m, rows, out]; m = 1 is a plain ``F.linear``."""
    if weight.size(0) == 1:
        return F.linear(x[0], weight[0])[None]
    return torch.bmm(x, weight.transpose(1, 2))


def decode_qkv(x, norm_weight, eps: float, qkv_weight, cos, sin, k_buf, v_buf, lengths,
               n_kv: int, group: int, head_dim: int) -> torch.Tensor:
    """The first half of m layers: norm, QKV projection, RoPE, and the write of the new keys and values into
    the cache at each sequence's next slots ``lengths[b] ..`` — one fused program when compiled.

    x [b, s, hidden] (shared by the m layers) or [m, b, s, hidden]; norm_weight [m, hidden]; qkv_weight
    [m, qkv_out, hidden]; cos/sin [b|1, s, head_dim]; k_buf/v_buf [m * b, n_kv, capacity, head_dim] (written
    in place); lengths [b]. Returns the folded queries [m * b, n_kv, group * s, head_dim]."""
    m = qkv_weight.size(0)
    b, s, hidden = x.shape[-3], x.shape[-2], x.shape[-1]
    xn = rms_norm(x if x.dim() == 4 else x[None], norm_weight[:, None, None], eps)
    qkv = _stacked_linear(xn.expand(m, b, s, hidden).reshape(m, b * s, hidden), qkv_weight)
    qkv = qkv.view(m, b, s, n_kv, group + 2, head_dim)
    if cos.dim() == 2:
        cos, sin = cos[None], sin[None]
    c, si = cos[None, :, :, None, None], sin[None, :, :, None, None]  # [1, b|1, s, 1, 1, head_dim]
    # The query heads of each group and its key head (rotated together), then its value head. Split, not
    # sliced: under size-oblivious tracing a slice with a symbolic end gets a data-dependent size, which
    # torch 2.11 cannot guard on (the compile fails); split sizes that sum to the dim are exact.
    qk, v_new = qkv.split([group + 1, 1], dim=-2)
    qk = qk * c + _rotate_half(qk) * si
    q_new, k_new = qk.split([group, 1], dim=-2)
    # The folded queries are copied into a fresh buffer rather than reshaped: whether a reshape of the
    # permuted rows can be a view depends on s == 1, which would give one token and k tokens separate
    # compilations.
    q = qk.new_empty(m * b, n_kv, group * s, head_dim)
    q.view(m, b, n_kv, group, s, head_dim).copy_(q_new.permute(0, 1, 3, 4, 2, 5))
    # Row r of the buffers is layer r // b, sequence r % b; the index tensors broadcast to [m, b, s, n_kv, 1],
    # the layout of the new keys and values, so they are written without a reshape. Slots are clamped so a
    # finished sequence that keeps riding along in a batch never writes out of bounds (no host check is
    # possible without a sync; the decoder sizes the capacity so live ones fit). An index_put_ on the buffer
    # itself (not a view, not a scatter): the compiler then writes the new rows in place instead of copying
    # the whole cache.
    device = lengths.device
    slots = (lengths[:, None] + torch.arange(s, device=device)[None]).clamp(max=k_buf.size(2) - 1)
    # (The key and value heads are taken as slices [.., 1, head_dim], not selected: a compiler lowers a
    # select to a squeeze whose strides it cannot derive without specialising sizes of 1.)
    index = (torch.arange(m * b, device=device).view(m, b, 1, 1, 1),
             torch.arange(n_kv, device=device).view(1, 1, 1, n_kv, 1), slots.view(1, b, s, 1, 1))
    k_buf.index_put_(index, k_new)
    v_buf.index_put_(index, v_new)
    return q


def fold_mask(mask: torch.Tensor, group: int, s: int, batch: int) -> torch.Tensor:
    """[b, 1, s, kv] -> [batch, 1, group * s, kv]: the query-row order of ``decode_qkv``, and for m layers
    side by side (batch = m * b) repeated m times; masks already in that form pass untouched."""
    b, kv = mask.size(0), mask.size(-1)
    if mask.size(-2) != group * s:
        mask = mask[:, :, None].expand(b, 1, group, s, kv).reshape(b, 1, group * s, kv)
    if b != batch:  # (a batch-1 mask too: a compiler that keeps sizes of 1 symbolic would not broadcast it)
        mask = mask.repeat(batch // b, 1, 1, 1)
    return mask


def decode_attention(q, k_all, v_all, mask, s: int) -> torch.Tensor:
    """Folded queries against the whole cache -> [m * b, s, n_q * head_dim] in the layout ``Attention`` uses."""
    b, n_kv, rows, head_dim = q.shape
    o = F.scaled_dot_product_attention(q, k_all, v_all, attn_mask=mask)
    return o.view(b, n_kv, rows // s, s, head_dim).permute(0, 3, 1, 2, 4).reshape(b, s, n_kv * (rows // s) * head_dim)


def decode_attention_fused(q, k_all, v_all, mask, s: int) -> torch.Tensor:
    """``decode_attention`` written out as products and sums in fp32, for a compiler to turn into a few
    reduction kernels spread over the whole GPU — at batch 1 the memory-efficient kernel runs one thread
    block per KV head and is latency-bound (tens of microseconds per layer). Eagerly this would materialise
    [.., rows, capacity, head_dim] products: only compiled decoders use it."""
    head_dim = q.size(-1)
    qf = q.float() * head_dim ** -0.5
    # The mask's head dim (size 1) re-made as a literal 1: a compiler that keeps input sizes of 1 symbolic
    # (the decoder's) would not broadcast it.
    scores = (qf[:, :, :, None, :] * k_all[:, :, None, :, :].float()).sum(-1) + mask[:, 0, None].float()
    p = torch.softmax(scores, dim=-1)
    o = (p[:, :, :, :, None] * v_all[:, :, None, :, :].float()).sum(-2).to(q.dtype)  # [b, n_kv, rows, head_dim]
    return unfold_heads(o, s)


def unfold_heads(o: torch.Tensor, s: int) -> torch.Tensor:
    """A compiled decode attention's output [b, n_kv, group * s, head_dim] (GQA rows folded, see
    ``decode_qkv``) in the token layout [b, s, heads * head_dim] the output projection reads. Copied into that
    layout rather than reshaped: whether the reshape is a view depends on s == 1, which a compiler would
    specialise on."""
    b, n_kv, rows, head_dim = o.shape
    out = o.new_empty(b, s, n_kv * (rows // s) * head_dim)
    out.view(b, s, n_kv, rows // s, head_dim).copy_(o.view(b, n_kv, rows // s, s, head_dim).permute(0, 3, 1, 2, 4))
    return out


def decode_mlp(x, o, out_weight, norm_weight, eps: float, gate_up_weight, down_weight) -> torch.Tensor:
    """The rest of m layers: x + out(o), then x + down(silu(gate) * up) of its norm.

    x [b, s, hidden] (shared) or [m, b, s, hidden]; o [m * b, s, n_q * head_dim]; weights stacked [m, ...].
    Returns [m, b, s, hidden]."""
    m = out_weight.size(0)
    b, s = o.size(0) // m, o.size(1)
    x = x + _stacked_linear(o.reshape(m, b * s, o.size(-1)), out_weight).view(m, b, s, -1)
    h = _stacked_linear(rms_norm(x, norm_weight[:, None, None], eps).view(m, b * s, -1), gate_up_weight)
    gate, up = h.chunk(2, dim=-1)
    return x + _stacked_linear(F.silu(gate) * up, down_weight).view(m, b, s, -1)


def decode_layers(x, cos, sin, k_buf, v_buf, lengths, mask, weights: dict, kernels, eps: float,
                  n_kv: int, group: int, head_dim: int) -> torch.Tensor:
    """m decoder layers side by side on x (see ``decode_qkv``): ``weights`` holds the stacked ``attn_norm``,
    ``qkv``, ``out``, ``mlp_norm``, ``gate_up`` and ``down`` weights; ``kernels`` is (decode_qkv, an attention
    function, decode_mlp)
    or compiled versions of them. Returns [m, b, s, hidden]."""
    qkv_fn, attention_fn, mlp_fn = kernels
    s = x.size(-2)
    q = qkv_fn(x, weights["attn_norm"], eps, weights["qkv"], cos, sin, k_buf, v_buf, lengths, n_kv, group, head_dim)
    o = attention_fn(q, k_buf, v_buf, fold_mask(mask, group, s, q.size(0)), s)
    return mlp_fn(x, o, weights["out"], weights["mlp_norm"], eps, weights["gate_up"], weights["down"])


class SwiGLU(nn.Module):
    """down(silu(gate(x)) * up(x)); gate and up are one fused column-parallel GEMM split per block."""

    def __init__(self, cfg: ModelConfig, key: str, sequence_parallel: bool, dtype=None):
        super().__init__()
        self.gate_up = ColumnParallelLinear(cfg.hidden_size, 2 * cfg.ffn_size, init_key=f"{key}.gate_up",
                                            init_std=cfg.init_std, chunks=2, sequence_parallel=sequence_parallel,
                                            dtype=dtype)
        self.down = RowParallelLinear(cfg.ffn_size, cfg.hidden_size, init_key=f"{key}.down",
                                      init_std=scaled_init_std(cfg.init_std, cfg.num_layers),
                                      sequence_parallel=sequence_parallel, dtype=dtype)

    def forward(self, x):
        gate, up = self.gate_up(x).chunk(2, dim=-1)
        return self.down(F.silu(gate) * up)


class TransformerLayer(nn.Module):
    """Pre-norm Llama block. ``key`` names it for initialisation and KV caching (e.g. ``trunk.3``)."""

    def __init__(self, cfg: ModelConfig, key: str, sequence_parallel: bool = False, dtype=None):
        super().__init__()
        self.key = key
        self.attn_norm = RMSNorm(cfg.hidden_size, cfg.norm_eps, init_key=f"{key}.attn_norm",
                                 sequence_parallel=sequence_parallel, dtype=dtype)
        self.attn = Attention(cfg, key, sequence_parallel, dtype=dtype)
        self.mlp_norm = RMSNorm(cfg.hidden_size, cfg.norm_eps, init_key=f"{key}.mlp_norm",
                                sequence_parallel=sequence_parallel, dtype=dtype)
        self.mlp = SwiGLU(cfg, f"{key}.mlp", sequence_parallel, dtype=dtype)
        self.hidden_dropout = dropout_probability(cfg, "hidden_dropout")
        self.sequence_parallel = sequence_parallel and state.tp_size() > 1

    def _residual(self, x: torch.Tensor, branch: torch.Tensor) -> torch.Tensor:
        """x + dropout(branch). Without sequence parallelism the residual stream is replicated over TP and
        its masks must agree on every rank: the default stream, seeded alike on all TP ranks. Under
        sequence parallelism each rank holds other tokens, so (as in Megatron) the masks come from the
        per-rank tracker stream; otherwise every shard would reuse one mask pattern."""
        if self.hidden_dropout > 0 and self.training:
            with get_rng_tracker().fork() if self.sequence_parallel else nullcontext():
                branch = F.dropout(branch, self.hidden_dropout, training=True)
        return x + branch

    def forward(self, x, cos, sin, kv_cache=None, attn_mask=None):
        if kv_cache is not None:
            return self.decode(x, cos, sin, kv_cache, attn_mask)
        x = self._residual(x, self.attn(self.attn_norm(x), cos, sin))
        return self._residual(x, self.mlp(self.mlp_norm(x)))

    def decode_weights(self) -> dict:
        """This layer's weights in the stacked form of ``decode_layers`` (a leading dim of 1), as plain
        tensors over the parameters' memory (``stacked_alias``): decoding needs no gradients, and a compiled
        decode step guards on ``requires_grad`` and keeps a parameter's shape static — the trunk and the
        draft heads' stacked weights would each compile apart."""
        weights = {"attn_norm": self.attn_norm.weight, "qkv": self.attn.qkv.weight, "out": self.attn.out.weight,
                   "mlp_norm": self.mlp_norm.weight, "gate_up": self.mlp.gate_up.weight, "down": self.mlp.down.weight}
        return {name: stacked_alias(w) for name, w in weights.items()}

    def decode(self, x, cos, sin, kv_cache, attn_mask):
        """Inference with a KV cache (one process, no dropout): the same math as ``forward`` as three pieces
        — ``decode_qkv`` (which also writes the cache), the attention, ``decode_mlp`` — so that a decoder can
        compile the two pure pieces once for every layer and capture the whole step in a CUDA graph.

        ``attn_mask``: [b, 1, s, capacity] (bool or additive), or already repeated for the query heads of
        a KV group, [b, 1, group * s, capacity] (``KVCache.attention_bias``)."""
        if state.tp_size() > 1:
            raise ValueError("KV-cache decoding runs in one process; merge tensor-parallel checkpoints first "
                             "(megatron_mtp.inference.load_model does).")
        attn = self.attn
        k_buf, v_buf = kv_cache.buffers(self.key, attn.n_kv, attn.head_dim, x.dtype)
        return decode_layers(x, cos, sin, k_buf, v_buf, kv_cache.lengths, attn_mask, self.decode_weights(),
                             kv_cache.kernels, self.attn_norm.eps, attn.n_kv, attn.group, attn.head_dim)[0]


class LinearHead(nn.Module):
    """The cheap MTP head (paper Table S4): one d x d linear map of the trunk output, TP column-split
    and gathered so its output has the trunk's layout."""

    def __init__(self, cfg: ModelConfig, key: str, sequence_parallel: bool = False, dtype=None):
        super().__init__()
        self.key = key
        self.sequence_parallel = sequence_parallel and state.tp_size() > 1
        self.proj = ColumnParallelLinear(cfg.hidden_size, cfg.hidden_size, init_key=f"{key}.proj",
                                         init_std=cfg.init_std, gather_output=True,
                                         sequence_parallel=sequence_parallel, dtype=dtype)

    def forward(self, x, cos=None, sin=None, kv_cache=None, attn_mask=None):
        y = self.proj(x)  # full sequence when sequence-parallel (the projection gathered it)
        return mappings.scatter_to_sequence_region(y) if self.sequence_parallel else y
