"""A decode step's layer as four weight-streaming Triton kernels: the decoder's ``layer_kernels="triton"``.

At batch 1 a layer's work is reading its weights once (88 MB at the 1.1B shape) and everything else is
latency: cuBLAS's one-row GEMMs each come with the norm, RoPE, cache-write, SiLU and residual kernels around
them, ~18 launches a layer of 1-6 µs each, so the step ran at a third of the HBM floor. Here each GEMM carries
its neighbours in its prologue and epilogue, so a layer is four kernels besides the attention:

1. ``qkv``: RMSNorm (prologue) -> QKV projection -> RoPE on the query and key heads, the folded queries
   written in the attention's layout and the new keys and values written into the cache at each sequence's
   next slots (epilogue);
2. ``linear_residual`` for the output projection: x + o W_o^T;
3. ``gate_up``: RMSNorm (prologue) -> gate and up projections side by side -> silu(gate) * up (epilogue);
4. ``linear_residual`` for the down projection: x + a W_down^T.

Each program streams a block of weight rows once and keeps every token row of the step (up to ``MAX_ROWS``:
batch x new tokens) in registers, so the weights are read once whatever the rows. Every program computes the
RMSNorm of the rows it needs itself (a few KiB of activations, served by L2), which is what lets the norm live
in the GEMV instead of a kernel of its own: sum_k (x_k w_k / rms) W_nk = (sum_k x_k w_k W_nk) / rms, so the
sums of squares accumulate beside the dot products and the 1 / RMS scales the finished sums. The arithmetic
otherwise rounds where the eager decode path rounds (each GEMM's output, each product of RoPE, SiLU and the
gating, the residual add, in the weights' dtype; sums in fp32). The one difference: the eager path rounds the
normed activations to the weights' dtype before the GEMM, the kernels keep them in fp32 — in fp32 the two agree
to rounding (the tests compare tokens exactly), in bf16 the kernels' products are the more exact.

Same contracts as ``model.transformer.decode_qkv`` and ``decode_mlp`` (m layers side by side: one trunk layer,
or the k - 1 stacked draft heads); the decoder routes larger row counts (a prefill) to those.

Tile shapes are tuned per (rows, matrix shape) on first use on a GPU (``triton.autotune``; the decoder's
warm-up runs before any graph capture); Triton's interpreter (``TRITON_INTERPRET=1``, the CPU tests) takes the
first configuration.
"""
from __future__ import annotations

import torch

# (one test of where Triton kernels run serves both kernel modules; the decoder asks gemv_kernels.available)
from megatron_mtp.ops.decode_attention import available, interpreting  # noqa: F401

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU installs: the decoder then keeps the torch layer programs
    triton = None

# Token rows (batch x new tokens) a launch keeps in registers. Beyond it a step has rows enough for a GEMM
# library to read the weights at full speed (and a prefill has hundreds): the decoder gives those to torch.
MAX_ROWS = 8
# Elements of a block's product tile [rows, weight rows, K block] the configurations keep per launch; with
# more, registers spill.
_TILE_BUDGET = 8192


if triton is not None:

    @triton.jit
    def _norm_block(X, NW, sx_r, r, r_ok, k, k_ok, ss):
        """A K block of the token rows times the norm weight (fp32, 0 outside the rows and K), and the rows'
        running squares [rows, BK] (summed over K after the loop). The norm's 1 / RMS is a per-row factor, so it is applied to the finished dot
        products instead: the weights stream from the first iteration, with no pass over the rows before it."""
        x = tl.load(X + r[:, None] * sx_r + k[None, :], mask=r_ok[:, None] & k_ok[None, :], other=0.0).to(tl.float32)
        w = tl.load(NW + k, mask=k_ok, other=0.0).to(tl.float32)
        return x * w[None, :], ss + x * x

    @triton.jit
    def _qkv_kernel(X, NW, W, Cos, Sin, Q, KB, VB, Lengths, rows, s_new, b, capacity, eps,
                    sx_m, sx_r, sn_m, sw_m, sw_n, sc_b, sc_s,
                    sq_b, sq_h, sq_r, sk_b, sk_h, sk_n, sv_b, sv_h, sv_n,
                    K: tl.constexpr, HEAD_DIM: tl.constexpr, GROUP: tl.constexpr,
                    R_PAD: tl.constexpr, BP: tl.constexpr, BK: tl.constexpr):
        """One (head of the QKV output, block of BP RoPE pairs, layer): rows [p, p + HEAD_DIM / 2) of the head
        and their rotation partners, normed and projected for every token row, rotated (query and key heads),
        and written: query heads into Q (folded rows t * s + i), the key and value heads into the caches."""
        head = tl.program_id(0)
        mi = tl.program_id(2)
        half: tl.constexpr = HEAD_DIM // 2
        j = head // (GROUP + 2)  # the KV head
        t = head % (GROUP + 2)  # 0..GROUP-1: query heads of the group, GROUP: the key head, GROUP + 1: the value head
        p = tl.program_id(1) * BP + tl.arange(0, BP)
        p_ok = p < half
        r = tl.arange(0, R_PAD)
        r_ok = r < rows
        w_lo = W + mi * sw_m + (head * HEAD_DIM + p)[:, None] * sw_n
        w_hi = w_lo + half * sw_n
        # Products accumulate elementwise and are summed over K once, after the loop: a reduction across the
        # threads in every iteration would stall the weight stream.
        lo = tl.zeros([R_PAD, BP, BK], tl.float32)
        hi = tl.zeros([R_PAD, BP, BK], tl.float32)
        ss = tl.zeros([R_PAD, BK], tl.float32)
        for k0 in range(0, K, BK):
            k = k0 + tl.arange(0, BK)
            k_ok = k < K
            xw, ss = _norm_block(X + mi * sx_m, NW + mi * sn_m, sx_r, r, r_ok, k, k_ok, ss)
            wl = tl.load(w_lo + k[None, :], mask=p_ok[:, None] & k_ok[None, :], other=0.0).to(tl.float32)
            wh = tl.load(w_hi + k[None, :], mask=p_ok[:, None] & k_ok[None, :], other=0.0).to(tl.float32)
            lo += xw[:, None, :] * wl[None, :, :]
            hi += xw[:, None, :] * wh[None, :, :]
        rstd = tl.rsqrt(tl.sum(ss, 1) / K + eps)[:, None]
        dt = Q.dtype.element_ty
        lo = (tl.sum(lo, 2) * rstd).to(dt).to(tl.float32)
        hi = (tl.sum(hi, 2) * rstd).to(dt).to(tl.float32)
        bi = r // s_new
        i = r % s_new
        ok = r_ok[:, None] & p_ok[None, :]
        if t <= GROUP:  # RoPE (rotate-half): lo' = lo cos - hi sin, hi' = hi cos + lo sin, each product rounded
            c = Cos + bi[:, None] * sc_b + i[:, None] * sc_s + p[None, :]
            sn = Sin + bi[:, None] * sc_b + i[:, None] * sc_s + p[None, :]
            c_lo = tl.load(c, mask=ok, other=0.0).to(tl.float32)
            c_hi = tl.load(c + half, mask=ok, other=0.0).to(tl.float32)
            s_lo = tl.load(sn, mask=ok, other=0.0).to(tl.float32)
            s_hi = tl.load(sn + half, mask=ok, other=0.0).to(tl.float32)
            lo_r = (lo * c_lo).to(dt).to(tl.float32) - (hi * s_lo).to(dt).to(tl.float32)
            hi_r = (hi * c_hi).to(dt).to(tl.float32) + (lo * s_hi).to(dt).to(tl.float32)
            lo = lo_r
            hi = hi_r
        seq = mi * b + bi
        if t < GROUP:
            dst = Q + seq[:, None] * sq_b + j * sq_h + (t * s_new + i)[:, None] * sq_r + p[None, :]
        else:
            slot = tl.minimum(tl.load(Lengths + bi, mask=r_ok, other=0) + i, capacity - 1)
            if t == GROUP:
                dst = KB + seq[:, None] * sk_b + j * sk_h + slot[:, None] * sk_n + p[None, :]
            else:
                dst = VB + seq[:, None] * sv_b + j * sv_h + slot[:, None] * sv_n + p[None, :]
        tl.store(dst, lo.to(dt), mask=ok)
        tl.store(dst + half, hi.to(dt), mask=ok)

    @triton.jit
    def _linear_residual_kernel(X, W, Res, Out, rows, sx_m, sx_r, sw_m, sw_n, sr_m, sr_r, so_m, so_r,
                                N: tl.constexpr, K: tl.constexpr, R_PAD: tl.constexpr, BN: tl.constexpr,
                                BK: tl.constexpr):
        """One (block of BN output columns, layer): Out = Res + X W^T for every token row, the product rounded
        to the output dtype before the add (as ``x + F.linear(o, w)``)."""
        mi = tl.program_id(1)
        n = tl.program_id(0) * BN + tl.arange(0, BN)
        n_ok = n < N
        r = tl.arange(0, R_PAD)
        r_ok = r < rows
        acc = tl.zeros([R_PAD, BN, BK], tl.float32)  # summed over K after the loop (see _qkv_kernel)
        for k0 in range(0, K, BK):
            k = k0 + tl.arange(0, BK)
            k_ok = k < K
            x = tl.load(X + mi * sx_m + r[:, None] * sx_r + k[None, :], mask=r_ok[:, None] & k_ok[None, :],
                        other=0.0).to(tl.float32)
            w = tl.load(W + mi * sw_m + n[:, None] * sw_n + k[None, :], mask=n_ok[:, None] & k_ok[None, :],
                        other=0.0).to(tl.float32)
            acc += x[:, None, :] * w[None, :, :]
        acc = tl.sum(acc, 2)
        dt = Out.dtype.element_ty
        ok = r_ok[:, None] & n_ok[None, :]
        res = tl.load(Res + mi * sr_m + r[:, None] * sr_r + n[None, :], mask=ok, other=0.0).to(tl.float32)
        y = res + acc.to(dt).to(tl.float32)
        tl.store(Out + mi * so_m + r[:, None] * so_r + n[None, :], y.to(dt), mask=ok)

    @triton.jit
    def _gate_up_kernel(X, NW, W, Out, rows, eps, sx_m, sx_r, sn_m, sw_m, sw_n, so_m, so_r,
                        F: tl.constexpr, K: tl.constexpr, R_PAD: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
        """One (block of BN hidden units, layer): silu(gate) * up of the normed rows, the gate rows [0, F) and
        the up rows [F, 2F) of W read side by side."""
        mi = tl.program_id(1)
        n = tl.program_id(0) * BN + tl.arange(0, BN)
        n_ok = n < F
        r = tl.arange(0, R_PAD)
        r_ok = r < rows
        w_g = W + mi * sw_m + n[:, None] * sw_n
        w_u = w_g + F * sw_n
        g = tl.zeros([R_PAD, BN, BK], tl.float32)  # summed over K after the loop (see _qkv_kernel)
        u = tl.zeros([R_PAD, BN, BK], tl.float32)
        ss = tl.zeros([R_PAD, BK], tl.float32)
        for k0 in range(0, K, BK):
            k = k0 + tl.arange(0, BK)
            k_ok = k < K
            xw, ss = _norm_block(X + mi * sx_m, NW + mi * sn_m, sx_r, r, r_ok, k, k_ok, ss)
            wg = tl.load(w_g + k[None, :], mask=n_ok[:, None] & k_ok[None, :], other=0.0).to(tl.float32)
            wu = tl.load(w_u + k[None, :], mask=n_ok[:, None] & k_ok[None, :], other=0.0).to(tl.float32)
            g += xw[:, None, :] * wg[None, :, :]
            u += xw[:, None, :] * wu[None, :, :]
        rstd = tl.rsqrt(tl.sum(ss, 1) / K + eps)[:, None]
        dt = Out.dtype.element_ty
        g = (tl.sum(g, 2) * rstd).to(dt).to(tl.float32)
        u = (tl.sum(u, 2) * rstd).to(dt).to(tl.float32)
        a = (g / (1.0 + tl.exp(-g))).to(dt).to(tl.float32) * u
        tl.store(Out + mi * so_m + r[:, None] * so_r + n[None, :], a.to(dt), mask=r_ok[:, None] & n_ok[None, :])


def _configs(r_pad: int, two_tiles: bool) -> list:
    """Tile shapes for ``r_pad`` token rows: (weight rows per program, K block), the K block as large as the
    register budget allows (halved when the kernel reads two weight tiles per output). The interpreter takes the
    first."""
    budget = _TILE_BUDGET // (2 if two_tiles else 1)
    out = []
    for rows_w in (8, 4, 16, 32):
        bk = min(512, budget // (r_pad * rows_w))
        if bk >= 32:
            out.append((rows_w, bk))
    return out


def _warps(r_pad: int, rows_w: int, bk: int, two_tiles: bool) -> int:
    """Warps for a tile: the accumulators hold the whole product tile, ~32 fp32 registers a thread at most."""
    elements = r_pad * rows_w * bk * (2 if two_tiles else 1)
    return max(4, min(8, elements // 1024))


_TUNED: dict = {}


def _launch(kernel, grid, args: tuple, constants: dict, r_pad: int, block: str, two_tiles: bool, key: tuple):
    """Launch ``kernel`` over ``grid(meta)`` with the tile shape tuned for (kernel, rows, ``key``): on a GPU
    each configuration is timed on first use (``triton.autotune``); the interpreter takes the first."""
    if interpreting():
        rows_w, bk = _configs(r_pad, two_tiles)[0]
        meta = {block: rows_w, "BK": bk}
        kernel[grid(meta)](*args, **constants, **meta, R_PAD=r_pad)
        return
    full_key = (id(kernel), r_pad) + key
    tuned = _TUNED.get(full_key)
    if tuned is None:  # (the configurations are built once per key: an uncaptured step launches every layer)
        tuned = _TUNED[full_key] = triton.autotune(
            configs=[triton.Config({block: rows_w, "BK": bk}, num_warps=_warps(r_pad, rows_w, bk, two_tiles),
                                   num_stages=3) for rows_w, bk in _configs(r_pad, two_tiles)], key=[])(kernel)
    tuned[grid](*args, **constants, R_PAD=r_pad)


def _rows_pad(rows: int) -> int:
    if rows > MAX_ROWS:
        raise ValueError(f"the decode GEMV kernels serve up to {MAX_ROWS} token rows (batch x new tokens), got "
                         f"{rows}: give larger steps to the torch layer programs.")
    return 1 << (rows - 1).bit_length()


def _check(*tensors) -> None:
    if triton is None:
        raise RuntimeError("layer_kernels='triton' needs Triton (it ships with CUDA builds of torch); use "
                           "layer_kernels='torch'.")
    if any(t.stride(-1) != 1 for t in tensors):
        raise ValueError("the decode GEMV kernels need tensors with a contiguous last dim.")


def _stacked_rows(x: torch.Tensor, m: int, rows: int) -> tuple:
    """x [rows-shaped, hidden] shared by m layers or [m, ...] -> (a [mx, rows, hidden] view, its layer stride:
    0 when shared)."""
    shared = x.dim() == 3
    x3 = x.reshape(1 if shared else m, rows, x.size(-1))
    if x3.stride(-1) != 1:
        x3 = x3.contiguous()
    return x3, (0 if shared else x3.stride(0))


def qkv(x, norm_weight, eps: float, qkv_weight, cos, sin, k_buf, v_buf, lengths, n_kv: int, group: int,
        head_dim: int) -> torch.Tensor:
    """``decode_qkv`` (same arguments, same result and cache writes) in one kernel."""
    m = qkv_weight.size(0)
    b, s, hidden = x.shape[-3], x.shape[-2], x.shape[-1]
    rows = b * s
    r_pad = _rows_pad(rows)
    x3, sx_m = _stacked_rows(x, m, rows)
    _check(x3, norm_weight, qkv_weight, k_buf, v_buf)
    if cos.dim() == 2:
        cos, sin = cos[None], sin[None]
    cos, sin = cos.contiguous(), sin.contiguous()
    sc_b = 0 if cos.size(0) == 1 else cos.stride(0)
    q = x.new_empty(m * b, n_kv, group * s, head_dim)
    heads = n_kv * (group + 2)
    args = (x3, norm_weight, qkv_weight, cos, sin, q, k_buf, v_buf, lengths, rows, s, b, k_buf.size(2), eps,
            sx_m, x3.stride(1), norm_weight.stride(0), qkv_weight.stride(0), qkv_weight.stride(1), sc_b, cos.stride(1),
            q.stride(0), q.stride(1), q.stride(2), k_buf.stride(0), k_buf.stride(1), k_buf.stride(2),
            v_buf.stride(0), v_buf.stride(1), v_buf.stride(2))
    _launch(_qkv_kernel, lambda meta: (heads, triton.cdiv(head_dim // 2, meta["BP"]), m), args,
            dict(K=hidden, HEAD_DIM=head_dim, GROUP=group), r_pad, "BP", True, (hidden, head_dim, group))
    return q


def linear_residual(x, res, weight) -> torch.Tensor:
    """res + x W^T for m layers: x [m, rows, K], res [m, rows, N] or [rows, N] (shared), weight [m, N, K] ->
    [m, rows, N]."""
    m, rows, k = x.shape
    n = weight.size(1)
    r_pad = _rows_pad(rows)
    _check(x, res, weight)
    res3 = res.reshape(-1, rows, n)
    out = x.new_empty(m, rows, n)
    args = (x, weight, res3, out, rows, x.stride(0), x.stride(1), weight.stride(0), weight.stride(1),
            0 if res3.size(0) == 1 and m > 1 else res3.stride(0), res3.stride(1), out.stride(0), out.stride(1))
    _launch(_linear_residual_kernel, lambda meta: (triton.cdiv(n, meta["BN"]), m), args, dict(N=n, K=k), r_pad,
            "BN", False, (n, k))
    return out


def gate_up(x, norm_weight, eps: float, weight) -> torch.Tensor:
    """silu(gate) * up of rms_norm(x) for m layers: x [m, rows, hidden], weight [m, 2 F, hidden] (gate rows
    first) -> [m, rows, F]."""
    m, rows, hidden = x.shape
    f = weight.size(1) // 2
    r_pad = _rows_pad(rows)
    _check(x, norm_weight, weight)
    out = x.new_empty(m, rows, f)
    args = (x, norm_weight, weight, out, rows, eps, x.stride(0), x.stride(1), norm_weight.stride(0),
            weight.stride(0), weight.stride(1), out.stride(0), out.stride(1))
    _launch(_gate_up_kernel, lambda meta: (triton.cdiv(f, meta["BN"]), m), args, dict(F=f, K=hidden), r_pad, "BN",
            True, (f, hidden))
    return out


def mlp(x, o, out_weight, norm_weight, eps: float, gate_up_weight, down_weight) -> torch.Tensor:
    """``decode_mlp`` (same arguments, same result [m, b, s, hidden]) in three kernels."""
    m = out_weight.size(0)
    b, s = o.size(0) // m, o.size(1)
    rows = b * s
    hidden = out_weight.size(1)
    o3 = o.reshape(m, rows, o.size(-1))
    x1 = linear_residual(o3, x.reshape(-1, rows, hidden), out_weight)
    a = gate_up(x1, norm_weight, eps, gate_up_weight)
    return linear_residual(a, x1, down_weight).view(m, b, s, hidden)
