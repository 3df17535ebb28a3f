"""Split-KV decode attention (flash-decoding) in Triton: the decoder's ``attention="flash_decoding"``.

A decode step asks little of attention — a few query rows per KV head against a cache of a few hundred slots —
and the library kernels spend it badly: the memory-efficient kernel runs one thread block per (sequence, KV
head), so at batch 1 four blocks walk the whole cache one after another while the rest of the GPU idles
(tens of microseconds a layer, more than the layer's weight reads). Here the cache is cut into splits that run
side by side, each reducing its slots with an online softmax into a partial result; a second small kernel
merges the splits (flash-decoding, Dao et al. 2023) and writes the output straight into the token layout the
output projection reads, so the GQA rows need no unfolding copy.

Same contract as ``model.transformer.decode_attention``: folded queries q [B, n_kv, rows, head_dim] (rows =
group * s, row r is query r % s of head r // s of the group), keys and values [B, n_kv, capacity, head_dim]
(any strides with a unit last one: the decoder's stacked buffers are views), an additive mask [B, 1, rows,
capacity] (0 or -inf) that hides padding, stale slots and the future. Up to ``MAX_ROWS`` query rows, in tiles of
``ROW_TILE`` (a draft tree's step has group x nodes of them): a prefill has group x prompt-width rows, enough to
fill the GPU with SDPA's own kernel, and the decoder gives it that (``inference.generation.decode_attention_flash``).
Scores and the softmax are fp32; the probabilities meet V in V's dtype, as flash attention does. fp32 inputs
multiply in full fp32 (no TF32), so the greedy fp32 tests see the eager path's tokens.

Triton ships with CUDA builds of torch; on a CPU install it is usually absent and the decoder keeps SDPA.
The CPU tests run these kernels through Triton's interpreter (``TRITON_INTERPRET=1``) where Triton is
installed.
"""
from __future__ import annotations

import os

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU installs: the decoder offers this attention only where Triton is
    triton = None


def interpreting() -> bool:
    """Whether Triton's interpreter is on (``TRITON_INTERPRET=1``: kernels run on the CPU, as in the tests)."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def available(device: torch.device) -> bool:
    """Whether Triton kernels (these and ``ops.decode_gemv``'s) can run on ``device``'s tensors: Triton is
    installed, and the device is a GPU or Triton's interpreter is on (it runs them on the CPU)."""
    return triton is not None and (torch.device(device).type == "cuda" or interpreting())


# Key slots per inner block, and the number of thread blocks a step should fill (about two per SM of an H100:
# beyond that the merge costs more than the parallelism gains).
BLOCK_N = 64
TARGET_PROGRAMS = 264
# A decode step has group x k query rows (at most 8 x 8 for the shapes we ship), a draft tree's step group x its
# nodes; a program takes up to ROW_TILE of them (its tile is sized to them: many more would not fit in shared
# memory) and further tiles run as further programs. Past MAX_ROWS (a prefill's group x prompt width) SDPA's
# own kernel has rows enough to fill the GPU.
ROW_TILE = 64
MAX_ROWS = 256


def num_splits(programs: int, capacity: int) -> tuple:
    """(splits, slots per split) for ``programs`` (sequence, KV head) pairs over ``capacity`` slots: enough
    splits to fill the GPU, each a whole number of blocks."""
    blocks = -(-capacity // BLOCK_N)
    splits = max(1, min(blocks, -(-TARGET_PROGRAMS // programs)))
    per_split = -(-blocks // splits)
    return -(-blocks // per_split), per_split * BLOCK_N


if triton is not None:

    @triton.jit
    def _partial_kernel(Q, K, V, Mask, Acc, ML,
                        sqb, sqh, sqr, skb, skh, skn, svb, svh, svn, smb, smr, smn,
                        n_kv, rows, capacity, split_len, n_splits, scale,
                        SPLIT_BLOCKS: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr, HEAD_DIM: tl.constexpr,
                        BLOCK_N: tl.constexpr, PRECISION: tl.constexpr):
        """One (sequence, KV head, split, tile of BLOCK_R rows): online softmax over the split's slots ->
        unnormalised output Acc [rows, head_dim], running max and sum ML [rows, 2] (fp32)."""
        pid = tl.program_id(0)
        split = tl.program_id(1)
        b = pid // n_kv
        h = pid % n_kv
        r = tl.program_id(2) * BLOCK_R + tl.arange(0, BLOCK_R)
        d = tl.arange(0, BLOCK_D)
        r_ok = r < rows
        d_ok = d < HEAD_DIM
        q = tl.load(Q + b * sqb + h * sqh + r[:, None] * sqr + d[None, :],
                    mask=r_ok[:, None] & d_ok[None, :], other=0.0)
        m_i = tl.full([BLOCK_R], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_R], tl.float32)
        acc = tl.zeros([BLOCK_R, BLOCK_D], tl.float32)
        first = split * split_len
        # (A compile-time trip count: the interpreter of the Triton that torch 2.11 ships cannot take a bound
        # passed at run time under numpy 2. A few values in practice: blocks per split for each capacity bucket.)
        for j in range(0, SPLIT_BLOCKS):
            n = first + j * BLOCK_N + tl.arange(0, BLOCK_N)
            n_ok = n < capacity
            k = tl.load(K + b * skb + h * skh + n[None, :] * skn + d[:, None],
                        mask=n_ok[None, :] & d_ok[:, None], other=0.0)  # [BLOCK_D, BLOCK_N]
            s = tl.dot(q, k, input_precision=PRECISION) * scale
            bias = tl.load(Mask + b * smb + r[:, None] * smr + n[None, :] * smn,
                           mask=r_ok[:, None] & n_ok[None, :], other=float("-inf"))
            s = s + bias.to(tl.float32)
            m_new = tl.maximum(m_i, tl.max(s, 1))
            # A row that has seen only masked slots so far keeps max -inf: shift by 0 there, not by -inf
            # (which would make exp(-inf - -inf) = NaN).
            shift = tl.where(m_new == float("-inf"), 0.0, m_new)
            p = tl.exp(s - shift[:, None])
            alpha = tl.exp(m_i - shift)
            v = tl.load(V + b * svb + h * svh + n[:, None] * svn + d[None, :],
                        mask=n_ok[:, None] & d_ok[None, :], other=0.0)  # [BLOCK_N, BLOCK_D]
            l_i = l_i * alpha + tl.sum(p, 1)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
            m_i = m_new
        base = (pid * n_splits + split) * rows
        tl.store(Acc + (base + r[:, None]) * HEAD_DIM + d[None, :], acc, mask=r_ok[:, None] & d_ok[None, :])
        tl.store(ML + (base + r) * 2, m_i, mask=r_ok)
        tl.store(ML + (base + r) * 2 + 1, l_i, mask=r_ok)

    @triton.jit
    def _merge_kernel(Acc, ML, Out, n_kv, rows, s_new, n_splits, sob, sos,
                      BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr, HEAD_DIM: tl.constexpr):
        """One (sequence, KV head, row): the splits' partial results merged, normalised and written at the
        row's place in the token layout [B, s, n_q * head_dim]."""
        pid = tl.program_id(0)
        row = tl.program_id(1)
        b = pid // n_kv
        h = pid % n_kv
        sp = tl.arange(0, BLOCK_S)
        d = tl.arange(0, BLOCK_D)
        sp_ok = sp < n_splits
        base = (pid * n_splits + sp) * rows + row
        m = tl.load(ML + base * 2, mask=sp_ok, other=float("-inf"))
        l = tl.load(ML + base * 2 + 1, mask=sp_ok, other=0.0)
        m_max = tl.max(m, 0)
        w = tl.where(m == float("-inf"), 0.0, tl.exp(m - m_max))
        acc = tl.load(Acc + base[:, None] * HEAD_DIM + d[None, :], mask=sp_ok[:, None] & (d[None, :] < HEAD_DIM),
                      other=0.0)
        o = tl.sum(acc * w[:, None], 0) / tl.sum(l * w, 0)
        group = rows // s_new
        g = row // s_new
        i = row % s_new
        col = (h * group + g) * HEAD_DIM + d
        tl.store(Out + b * sob + i * sos + col, o.to(Out.dtype.element_ty), mask=d < HEAD_DIM)


def flash_decoding(q: torch.Tensor, k_all: torch.Tensor, v_all: torch.Tensor, mask: torch.Tensor,
                   s: int) -> torch.Tensor:
    """``decode_attention``'s result [B, s, n_q * head_dim] by split-KV attention (see the module docstring)."""
    if triton is None:
        raise RuntimeError("attention='flash_decoding' needs Triton (it ships with CUDA builds of torch); "
                           "use attention='sdpa'.")
    B, n_kv, rows, head_dim = q.shape
    capacity = k_all.size(2)
    if q.stride(-1) != 1 or k_all.stride(-1) != 1 or v_all.stride(-1) != 1:
        raise ValueError("flash_decoding needs queries, keys and values with a contiguous last dim.")
    if mask.size(-2) != rows or mask.size(0) != B:
        raise ValueError(f"flash_decoding needs the mask folded and repeated like the queries: [{B}, 1, {rows}, "
                         f"{capacity}], got {list(mask.shape)}.")
    if mask.dtype == torch.bool:
        mask = torch.zeros(mask.shape, dtype=q.dtype, device=mask.device).masked_fill(~mask, float("-inf"))
    if rows > MAX_ROWS:
        raise ValueError(f"flash_decoding serves up to {MAX_ROWS} query rows (a decode step, a draft tree's), got "
                         f"{rows}: give a prefill to SDPA.")
    programs = B * n_kv
    block_r = min(ROW_TILE, max(16, triton.next_power_of_2(rows)))
    tiles = -(-rows // block_r)
    n_splits, split_len = num_splits(programs * tiles, capacity)
    acc = torch.empty(programs * n_splits * rows * head_dim, dtype=torch.float32, device=q.device)
    ml = torch.empty(programs * n_splits * rows * 2, dtype=torch.float32, device=q.device)
    out = torch.empty(B, s, n_kv * rows // s * head_dim, dtype=q.dtype, device=q.device)
    block_d = max(16, triton.next_power_of_2(head_dim))
    precision = "ieee" if q.dtype == torch.float32 else "tf32"  # (bf16/fp16 operands ignore it)
    _partial_kernel[(programs, n_splits, tiles)](
        q, k_all, v_all, mask, acc, ml,
        q.stride(0), q.stride(1), q.stride(2), k_all.stride(0), k_all.stride(1), k_all.stride(2),
        v_all.stride(0), v_all.stride(1), v_all.stride(2), mask.stride(0), mask.stride(2), mask.stride(3),
        n_kv, rows, capacity, split_len, n_splits, head_dim ** -0.5,
        SPLIT_BLOCKS=split_len // BLOCK_N, BLOCK_R=block_r, BLOCK_D=block_d, HEAD_DIM=head_dim, BLOCK_N=BLOCK_N,
        PRECISION=precision)
    _merge_kernel[(programs, rows)](
        acc, ml, out, n_kv, rows, s, n_splits, out.stride(0), out.stride(1),
        BLOCK_S=max(2, triton.next_power_of_2(n_splits)), BLOCK_D=block_d, HEAD_DIM=head_dim)
    return out
