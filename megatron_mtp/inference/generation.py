"""Batched KV-cache generation with plain or self-speculative decoding from the MTP heads.

Plain decoding is the ``k = 1`` case of the same loop: one token per forward from head 1.

Self-speculative decoding with ``k`` heads (2 <= k <= n; paper section 3.4, blockwise parallel decoding):

* a forward takes, per sequence, ``[y, d_2 .. d_k]``: the last sampled token y (not yet in the cache)
  and the drafts of heads 2..k made at the previous forward for the k-1 positions after y;
* head 1 is unembedded at all k positions: its prediction at input j verifies draft j+1. The accepted
  prefix has length a (0..k-1) per sequence; the next token y' comes from head 1 at input a — head 1's
  argmax (greedy) or a resample from the residual / the bonus distribution (sampling, below);
* heads 2..k run over all k positions (their KV caches need every position) but are unembedded only at
  input a, the last accepted position: their predictions are the next forward's drafts;
* the cache commits a + 1 slots of the k written (y and the accepted drafts); the rest are rolled back.

So every forward emits a + 1 tokens per sequence and sequences move on at their own pace. A draft tree
(``inference.tree``) verifies each head's top candidates in one forward instead of one draft per head.

Greedy verification accepts the longest prefix of drafts equal to head 1's argmax, which makes the output
identical to plain greedy decoding. Sampling uses speculative sampling with rejection (Leviathan et al.
2023; Chen et al. 2023): draft x of head i, drawn from q = head i's distribution, is accepted with
probability min(1, p(x) / q(x)), p = head 1's distribution at that position; at the first rejection the
token is resampled from norm(max(0, p - q)), and if all drafts pass, a bonus token is drawn from p. Each
draft is drawn independently of the tokens before it given the committed prefix, so the output is
distributed exactly as plain sampling from head 1. Temperature, top-k and top-p are applied to p and q
alike (``sampling.probabilities``).

The step runs at device speed (``Decoder``): a static KV cache and static buffers, acceptance, rollback,
the stop conditions (EOD, budget), the statistics and the next drafts all computed on the device, so a
step needs no host sync; on CUDA the prefill and the step are CUDA graphs (their layer pieces fused by
``torch.compile``), replayed back to back while the host watches a stop flag a few steps behind.
"""
from __future__ import annotations

import sys
import time
import weakref
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

import torch
import torch.nn.functional as F
from torch.nn.attention.flex_attention import flex_attention

from megatron_mtp.errors import InputError
from megatron_mtp.ops import decode_attention as flash_decoding_kernels
from megatron_mtp.ops import decode_gemv as gemv_kernels
from megatron_mtp.inference.kv_cache import KVCache, compact_slots, decode_bias, decode_positions, tree_bias
from megatron_mtp.model.transformer import (decode_attention, decode_attention_fused, decode_layers, decode_mlp,
                                            decode_qkv, rms_norm, stacked_alias, unfold_heads)
from megatron_mtp.inference.sampling import SamplingParams, next_tokens, probabilities, sample
from megatron_mtp.inference.tree import DraftTree, select_nodes


# ---------------------------------------------------------------------------------------------------------
# Statistics


@dataclass
class DecodeStats:
    """Counts of one ``generate`` call. ``seq_forwards`` counts, per sequence, the forwards it was active
    in (prefill included), so ``tokens_per_forward`` is the mean number of tokens one sequence gains from
    one forward: 1.0 for plain decoding, up to k with k heads."""

    heads: int
    batch_size: int
    forwards: int = 0
    seq_forwards: int = 0
    tokens: int = 0  # generated tokens, a final EOD included (the outputs leave EOD out)
    prompt_tokens: int = 0
    proposed: list = field(default_factory=list)  # per draft head 2..k: times its draft was reached
    accepted: list = field(default_factory=list)  # per draft head 2..k: times its draft was accepted
    verify_steps: int = 0  # sequence-forwards that verified drafts
    prefill_s: float = 0.0
    wall_s: float = 0.0

    def __post_init__(self):
        if not self.proposed:
            self.proposed = [0] * max(0, self.heads - 1)
            self.accepted = [0] * max(0, self.heads - 1)

    @property
    def tokens_per_forward(self) -> float:
        return self.tokens / max(1, self.seq_forwards)

    @property
    def acceptance(self) -> list:
        """Per draft head (2..k): P(draft accepted | all earlier drafts of that forward accepted)."""
        return [a / p if p else None for a, p in zip(self.accepted, self.proposed)]

    @property
    def acceptance_unconditional(self) -> list:
        """Per draft head (2..k): fraction of verifying forwards in which its draft was accepted."""
        return [a / self.verify_steps if self.verify_steps else None for a in self.accepted]

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.wall_s if self.wall_s else 0.0

    def as_dict(self) -> dict:
        return {
            "heads": self.heads, "batch_size": self.batch_size, "tokens": self.tokens,
            "prompt_tokens": self.prompt_tokens, "forwards": self.forwards,
            "tokens_per_forward": self.tokens_per_forward,
            "acceptance_per_head": {f"head_{i + 2}": r for i, r in enumerate(self.acceptance)},
            "acceptance_unconditional_per_head": {f"head_{i + 2}": r for i, r in enumerate(self.acceptance_unconditional)},
            "tokens_per_s": self.tokens_per_s, "wall_s": self.wall_s, "prefill_s": self.prefill_s,
        }

    def summary(self) -> str:
        parts = [f"{self.tokens} tokens in {self.wall_s:.2f}s ({self.tokens_per_s:.1f} tokens/s, batch "
                 f"{self.batch_size})", f"{self.forwards} forwards", f"{self.tokens_per_forward:.2f} tokens/forward"]
        if self.heads > 1:
            acc = ", ".join(f"head {i + 2} {r:.1%}" if r is not None else f"head {i + 2} -"
                            for i, r in enumerate(self.acceptance))
            parts.append(f"acceptance {acc}")
        return "; ".join(parts)


@dataclass
class GenerationOutput:
    tokens: list  # per prompt: the generated token ids (EOD excluded)
    stats: DecodeStats
    finished_by_eod: list  # per prompt: stopped at EOD (else at the token budget)


# ---------------------------------------------------------------------------------------------------------
# Verification rules (module-level so tests can swap in a deliberately wrong one)


def verify_greedy(logits1: torch.Tensor, drafts: torch.Tensor) -> tuple:
    """logits1 [b, k, V] (head 1 at the k inputs), drafts [b, k-1] -> (accepted a [b], next token [b])."""
    pred = logits1.argmax(dim=-1)
    accepted = (pred.narrow(1, 0, pred.size(1) - 1) == drafts).long().cumprod(dim=1).sum(dim=1)
    return accepted, pred.gather(1, accepted[:, None])[:, 0]


def verify_sampled(p: torch.Tensor, q: torch.Tensor, drafts: torch.Tensor,
                   generator: Optional[torch.Generator]) -> tuple:
    """Speculative sampling with rejection.

    p [b, k, V]: head 1's (filtered) distributions at the k inputs; q [b, k-1, V]: the distributions the
    drafts [b, k-1] were drawn from. Returns (accepted a [b], next token [b]).
    """
    b, k = p.shape[0], p.shape[1]
    pd = p.narrow(1, 0, k - 1).gather(-1, drafts[..., None])[..., 0]
    qd = q.gather(-1, drafts[..., None])[..., 0]
    u = torch.rand(qd.shape, generator=generator, device=qd.device, dtype=qd.dtype)
    ok = u * qd < pd  # with probability min(1, p(x) / q(x))
    accepted = ok.long().cumprod(dim=1).sum(dim=1)
    rows = torch.arange(b, device=p.device)
    p_a = p[rows, accepted]  # [b, V]: head 1 at the first rejected input, or the bonus position
    q_a = q[rows, accepted.clamp(max=k - 2)]
    rejected = (accepted < k - 1)[:, None]
    residual = torch.where(rejected, (p_a - q_a).clamp(min=0), p_a)
    mass = residual.sum(-1, keepdim=True)
    residual = torch.where(mass > 0, residual / mass.clamp(min=1e-30), p_a)  # p == q: never rejects
    return accepted, sample(residual, generator)


# ---------------------------------------------------------------------------------------------------------
# The decoder: static buffers, one step function, CUDA graphs


def _round_up(x: int, multiple: int) -> int:
    return -(-x // multiple) * multiple


# The pure tensor programs of a step. Each is a function of tensors only (no module calls, so nothing of the
# tensor-parallel machinery is traced), so the decoder can hand them to torch.compile, which fuses each into
# a few kernels instead of the dozens of tiny ones a batch-1 step otherwise launches.


def step_inputs(lengths, start, cos_table, sin_table, s: int, capacity: int, group: int) -> tuple:
    """(additive attention bias [b, 1, group * s, capacity], cos, sin [b, s, head_dim]) of a forward over the
    next ``s`` tokens. RoPE comes from tables of every position, so it costs one gather, not a
    recomputation (the tables hold the values ``rope_cos_sin`` gives)."""
    bias = decode_bias(lengths, start, s, capacity, group, cos_table.dtype)
    pos = decode_positions(lengths, start, s)
    return bias, cos_table[pos], sin_table[pos]


def decode_attention_flex(q, k_all, v_all, mask, s: int) -> torch.Tensor:
    """``decode_attention`` through FlexAttention, for compiled decoders only: compiled, a query of a few rows
    takes its flash-decoding kernel, which splits the cache over thread blocks (the memory-efficient kernel
    runs one block per KV head at batch 1). The additive mask [b, 1, rows, capacity] is read inside the kernel
    (a score modification); the folded GQA rows stay folded (one query "head" per KV head). Its GPU kernels
    need a head dim of at least 16 (a smaller one fails to compile: the decoder then warns and runs uncompiled)."""
    def add_mask(score, bi, h, qi, kv):
        return score + mask[bi, 0, qi, kv]

    return unfold_heads(flex_attention(q, k_all, v_all, score_mod=add_mask), s)


def decode_attention_flash(q, k_all, v_all, mask, s: int) -> torch.Tensor:
    """The decoder's ``attention="flash_decoding"``: a decode step's few query rows through the split-KV Triton
    kernels (``ops.decode_attention``), a prefill's group x prompt-width rows through SDPA, whose own kernel has
    rows enough to fill the GPU."""
    if q.size(2) > flash_decoding_kernels.MAX_ROWS:
        return decode_attention(q, k_all, v_all, mask, s)
    return flash_decoding_kernels.flash_decoding(q, k_all, v_all, mask, s)


class _ByRows:
    """A layer program for ``layer_kernels="triton"``: a step of at most ``ops.decode_gemv.MAX_ROWS`` token rows
    (batch x new tokens) through the GEMV kernels, a larger one (a prefill) through ``large`` (the torch
    program, compiled or not), whose GEMMs have rows enough to read the weights at full speed. Both programs
    take the residual stream x [.., b, s, hidden] first."""

    def __init__(self, small: Callable, large: Callable):
        self.small, self.large = small, large

    def __call__(self, x, *args):
        small = x.size(-3) * x.size(-2) <= gemv_kernels.MAX_ROWS
        return (self.small if small else self.large)(x, *args)


def _drafts_of(inputs) -> torch.Tensor:
    """The drafts among a step's inputs [b, k]: all but the first column. narrow, not ``inputs[:, 1:]``: torch
    2.11's inductor cannot lower an open-ended slice of a size-obliviously traced size (the compiled step then
    fails and the decoder falls back to its uncompiled step)."""
    return inputs.narrow(1, 1, inputs.size(1) - 1)


def head_logits(h, norm_weight, eps: float, unembedding, vocab: int) -> torch.Tensor:
    """Full-vocabulary logits of head outputs ``h`` [..., hidden] through the shared final norm."""
    # narrow, not a slice: under size-oblivious tracing a slice with a symbolic end gets a data-dependent size
    # (torch 2.11 then fails on the guards after it); narrow's is exact.
    return F.linear(rms_norm(h, norm_weight, eps), unembedding).narrow(-1, 0, vocab)


def select_rows(x, index) -> torch.Tensor:
    """Rows of the draft heads' [m, b, s, ...] at input ``index`` [b] -> [b, m, ...]."""
    m, b = x.shape[0], x.shape[1]
    picked = x.gather(2, index.view(1, b, 1, *([1] * (x.dim() - 3))).expand(m, b, 1, *x.shape[3:]))
    return picked[:, :, 0].transpose(0, 1)


def all_logits(h1, hd, norm_weight, eps: float, unembedding, vocab: int) -> tuple:
    """(head 1's logits [b, k, V], the draft heads' [k-1, b, k, V]) in one GEMM: the unembedding — the largest
    matrix of a small model — is read once, and head 1's verification and the draft rows come out together."""
    logits = head_logits(torch.cat([h1[None], hd]), norm_weight, eps, unembedding, vocab)
    return logits[0], logits.narrow(0, 1, logits.size(0) - 1)


def commit(inputs, accepted, y, drafts, out, out_len, done, all_done, budget, eod, forwards, seq_forwards,
           proposed, accepted_count, lengths) -> None:
    """The bookkeeping of a step, in place: emit the accepted drafts then y (a + 1 tokens per live sequence),
    stop conditions, statistics, the next inputs [y, drafts] (written into ``inputs``; a draft tree's step
    passes its accepted path as ``inputs`` and no drafts, and writes its next inputs itself), and the cache
    commit (a + 1 of the k slots written; the rest are rolled back by not counting them). Finished sequences
    ride along unchanged."""
    b, k = inputs.shape
    active = ~done
    # All k columns are written (the ones past a are overwritten by the next step); only a + 1 count.
    j = torch.arange(k, device=inputs.device)[None]
    emitted = torch.where(j < accepted[:, None], torch.cat([_drafts_of(inputs), y[:, None]], 1), y[:, None])
    out.index_put_((torch.arange(b, device=out.device)[:, None], (out_len[:, None] + j).clamp(max=out.size(1) - 1)),
                   emitted)
    valid = (j <= accepted[:, None]) & active[:, None]
    gained = (accepted + 1) * active
    out_len.add_(gained)
    done.logical_or_(((emitted == eod) & valid).any(1) | (out_len >= budget))
    all_done.copy_(done.all())
    forwards.add_(active.any().long())
    seq_forwards.add_(active.sum())
    if k > 1:
        # Counted over every draft head, those past k masked: an in-place add into ``proposed[:k - 1]`` would
        # leave the compiler a slice whose end it cannot compare with the buffer's size without specialising.
        i = torch.arange(proposed.size(0), device=inputs.device)[None]
        live = (i < k - 1) & active[:, None]
        proposed.add_(((i <= accepted[:, None]) & live).sum(0))
        accepted_count.add_(((i < accepted[:, None]) & live).sum(0))
    if k == 1 or drafts is not None:
        # One copy of the whole buffer, the source viewed in its shape: a copy into column slices, or one that
        # broadcasts, would make a compiler specialise on batch 1 or k = 2.
        inputs.copy_((y[:, None] if drafts is None else torch.cat([y[:, None], drafts], 1)).view(b, k))
    lengths.add_(gained)


def greedy_tail(h1, hd, norm_weight, eps: float, unembedding, vocab: int, inputs, out, out_len, done, all_done,
                budget, eod, forwards, seq_forwards, proposed, accepted_count, lengths) -> None:
    """Greedy: head 1's logits at the k inputs, verification, the next drafts from the draft heads' rows at
    the last accepted input (``hd`` [k-1, b, k, hidden], None for k = 1), and ``commit``."""
    if hd is None:  # (h1 [b, 1, hidden] is not indexed: a compiler lowers that to a squeeze that specialises b == 1)
        y = head_logits(h1, norm_weight, eps, unembedding, vocab).argmax(-1).view(h1.size(0))
        accepted, drafts = torch.zeros_like(y), None
    else:
        logits1, draft_logits = all_logits(h1, hd, norm_weight, eps, unembedding, vocab)
        accepted, y = verify_greedy(logits1, _drafts_of(inputs))
        drafts = select_rows(draft_logits, accepted).argmax(-1)
    commit(inputs, accepted, y, drafts, out, out_len, done, all_done, budget, eod, forwards, seq_forwards,
           proposed, accepted_count, lengths)


def tree_inputs(lengths, start, cos_table, sin_table, ancestors, depth, capacity: int, group: int) -> tuple:
    """``step_inputs`` of a forward over a draft tree (per sequence: ``ancestors`` [b, N, N], ``depth`` [b, N]):
    the tree's mask (``kv_cache.tree_bias``) and RoPE at each node's depth past the committed length."""
    bias = tree_bias(lengths, start, ancestors, capacity, group, cos_table.dtype)
    pos = (lengths - start)[:, None] + depth
    return bias, cos_table[pos], sin_table[pos]


def tree_verify(h1, hd, norm_weight, eps: float, unembedding, vocab: int, inputs, parent, ancestors, depth, path,
                ranks: int, pred=None) -> tuple:
    """Verification of a draft tree (``inference.tree``), per sequence: ``inputs`` [b, N] (the root y and the
    drafts), its tree as ``parent`` [b, N], ``ancestors`` [b, N, N], ``depth`` [b, N], ``path`` [b, N, D + 1]
    (``DraftTree.tensors`` with a batch dim), head 1's outputs ``h1`` [b, N, hidden] and the draft heads'
    ``hd`` [D, b, N, hidden] at every node; ``pred`` [b, N] head 1's token at every node — its argmax when None
    (greedy), else drawn by the caller (``sample_tree_nodes``). A node is accepted when its token is ``pred``
    at its parent and its parent is accepted; the deepest accepted node (one per depth at most: a head's
    candidates differ) ends the path. Returns (accepted a [b], the next token y [b] — ``pred`` there —, the
    path's nodes [b, D + 1] and tokens [b, D + 1] (the root first; past a, the last node repeated), and the
    draft heads' top-``ranks`` candidates at the last accepted node [b, D, ranks] with their log-probabilities
    (a dynamic tree's next selection weighs them))."""
    b, n = inputs.shape
    if pred is None:
        pred = head_logits(h1, norm_weight, eps, unembedding, vocab).argmax(-1)  # [b, N]
    ok = (inputs == pred.gather(1, parent)) | (torch.arange(n, device=inputs.device) == 0)
    reached = (ok[:, None, :] | ~ancestors).all(-1)  # [b, N]: the node and all its ancestors match
    best = (reached.long() * (depth + 1)).argmax(1)  # [b]
    accepted = depth.gather(1, best[:, None]).view(b)
    y = pred.gather(1, best[:, None]).view(b)
    nodes = path.gather(1, best.view(b, 1, 1).expand(b, 1, path.size(2))).view(b, path.size(2))
    tokens = inputs.gather(1, nodes)
    candidates, logq = draft_candidates(hd, best, norm_weight, eps, unembedding, vocab, ranks)
    return accepted, y, nodes, tokens, candidates, logq


def draft_candidates(hd, index, norm_weight, eps: float, unembedding, vocab: int, ranks: int) -> tuple:
    """Each draft head's top-``ranks`` tokens [b, D, ranks] and their log-probabilities, from its outputs ``hd``
    [D, b, s, hidden] at input ``index`` [b] (the last accepted position)."""
    d, b, hidden = hd.size(0), hd.size(1), hd.size(3)
    # The rows gathered head-major [D, b, hidden] (contiguous: the unembedding of select_rows' transposed
    # [b, D, hidden] would make the compiler specialise on batch 1).
    picked = hd.gather(2, index.view(1, b, 1, 1).expand(d, b, 1, hidden)).view(d, b, hidden)
    logits = head_logits(picked, norm_weight, eps, unembedding, vocab).float().transpose(0, 1)  # [b, D, V]
    top = logits.topk(ranks, dim=-1)
    return top.indices, top.values - logits.logsumexp(-1, keepdim=True)


def tree_following(y, candidates, head, rank) -> torch.Tensor:
    """The next forward's inputs [b, N]: y, then each node's candidate (``head`` / ``rank`` [b, N - 1], which draft
    head and which of its ``candidates`` [b, D, ranks])."""
    b = y.size(0)
    rows = torch.arange(b, device=y.device)[:, None]
    return torch.cat([y[:, None], candidates[rows, head, rank]], 1)


def sample_tree_nodes(p: torch.Tensor, generator: Optional[torch.Generator]) -> torch.Tensor:
    """Sampling over a draft tree: one token per node [b, N], each drawn independently from head 1's
    (filtered) distribution ``p`` [b, N, V] there. The tree is then followed while a node's token is the one
    drawn at its parent, and the tokens emitted are the draws along that path: each is drawn from head 1 given
    exactly its prefix, so the output is distributed as plain sampling (the candidates are fixed in advance,
    so a candidate x is taken with probability p(x): speculative sampling's rule for a draft distribution that
    is a point mass on x). Draws at nodes off the path are never used."""
    return sample(p, generator)


class _SizeOblivious:
    """A compiled program traced with size-oblivious shapes. Dynamic shapes alone still specialise every
    size that is 0 or 1 when first seen (batch 1, one token, one layer), so the first call at batch 1 and
    k = 1 would compile graphs that batch 16 or k = 4 cannot reuse; size-oblivious reasoning keeps such a
    size symbolic, so one graph serves every batch size and token count (a branch on a size, like the
    one-layer ``F.linear`` of ``_stacked_linear``, still makes its own graph). Duck shaping is off for the
    same reason: sizes that happen to be equal when first seen (batch 1 and one draft head) would be guarded
    equal. The flags are scoped to these calls: other compiled code of the process keeps the defaults."""

    def __init__(self, fn):
        self.fn = fn

    def __call__(self, *args):
        from torch.fx.experimental import _config as fx_config

        with fx_config.patch(backed_size_oblivious=True, use_duck_shape=False):
            return self.fn(*args)


class _Programs:
    """The step's tensor programs, compiled (``torch.compile``, dynamic shapes: one compilation serves every
    layer, batch size, prompt width and k of a shape class — one layer or a stack of draft heads, k = 1 or
    more; see ``_SizeOblivious``) or as they are. ``gemv`` adds inductor's coordinate-descent tuning,
    under which a one-row matmul (batch 1, one token) becomes a Triton reduction that the norm before it
    and the residual add after it fuse into (gpt-fast's configuration)."""

    EAGER = dict(qkv=decode_qkv, mlp=decode_mlp, inputs=step_inputs, tail=greedy_tail, commit=commit,
                 tree_inputs=tree_inputs, tree_verify=tree_verify, compact=compact_slots, select=select_nodes)
    # The decode attentions by name. sdpa (a library kernel) and flash_decoding (Triton kernels launched from
    # Python, captured by the step's graph like any kernel) run as they are, compiled decoder or not; fused and
    # flex exist only compiled.
    ATTENTIONS = dict(sdpa=decode_attention, flash_decoding=decode_attention_flash,
                      fused=decode_attention_fused, flex=decode_attention_flex)
    UNCOMPILED = ("sdpa", "flash_decoding")
    # The layer programs by name: torch's (decode_qkv / decode_mlp: cuBLAS GEMMs, compiled or not) or the
    # Triton GEMV kernels that carry the norm, RoPE, cache write, SwiGLU and residual (``ops.decode_gemv``).
    LAYER_KERNELS = ("torch", "triton")

    @classmethod
    def attention_for(cls, attention: str, compile: bool) -> str:
        """The attention a decoder asked for ``attention`` runs: a compiled-only one falls back to sdpa when
        the decoder does not compile."""
        return attention if compile or attention in cls.UNCOMPILED else "sdpa"

    def __init__(self, compile: bool, gemv: bool = False, attention: str = "sdpa", layer_kernels: str = "torch"):
        self.compiled = compile
        self.names = (attention, layer_kernels)
        fns = dict(self.EAGER)
        self.attention = self.ATTENTIONS[attention if attention in self.UNCOMPILED else "sdpa"]
        if compile:
            import torch._dynamo

            options = {"coordinate_descent_tuning": True} if gemv else None
            if attention not in self.UNCOMPILED:
                fns["attention"] = self.ATTENTIONS[attention]
            # gemv's point is a matmul known to have one row, which only a specialised graph knows: with gemv
            # the programs keep dynamo's default and compile the one-token step apart.
            wrap = (lambda fn: fn) if gemv else _SizeOblivious
            if gemv:  # then each (batch 1 or more, one token or k) class is a cache entry of one code object
                torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
            fns = {name: wrap(torch.compile(fn, dynamic=True, fullgraph=True, options=options))
                   for name, fn in fns.items()}
            self.attention = fns.pop("attention", self.attention)
        (self.qkv, self.mlp, self.inputs, self.tail, self.commit, self.tree_inputs, self.tree_verify, self.compact,
         self.select) = (fns[n] for n in ("qkv", "mlp", "inputs", "tail", "commit", "tree_inputs", "tree_verify",
                                          "compact", "select"))
        if layer_kernels == "triton":
            self.qkv, self.mlp = _ByRows(gemv_kernels.qkv, self.qkv), _ByRows(gemv_kernels.mlp, self.mlp)

    @property
    def kernels(self) -> tuple:
        return (self.qkv, self.attention, self.mlp)


class _State:
    """Every tensor a decode step reads or writes, for one (batch, capacity) bucket. The tensors never move:
    captured graphs replay on them; a new call refills them in place."""

    def __init__(self, b: int, capacity: int, device, n_heads: int, vocab: int):
        self.b, self.capacity = b, capacity
        self.cache = KVCache(b, capacity, device)
        z = dict(dtype=torch.long, device=device)
        self.out = torch.zeros(b, capacity, **z)  # emitted tokens, per sequence from column 0
        self.out_len = torch.zeros(b, **z)
        self.done = torch.zeros(b, dtype=torch.bool, device=device)
        self.all_done = torch.zeros((), dtype=torch.bool, device=device)
        self.budget = torch.zeros((), **z)
        self.eod = torch.full((), -1, **z)
        self.forwards = torch.zeros((), **z)
        self.seq_forwards = torch.zeros((), **z)
        self.proposed = torch.zeros(max(1, n_heads - 1), **z)
        self.accepted = torch.zeros(max(1, n_heads - 1), **z)
        self.inputs = {k: torch.zeros(b, k, **z) for k in range(1, n_heads + 1)}  # [y, drafts of heads 2..k]
        self.trees = {}  # DraftTree -> its inputs [b, N] and per-sequence tree (``tree_buffers``)
        self.q = {}  # k -> [b, k-1, V] draft distributions (sampling)
        self.prompts = {}  # padded width -> [b, width]
        self.vocab, self.device = vocab, device

    def prompt_buffer(self, width: int) -> torch.Tensor:
        if width not in self.prompts:
            self.prompts[width] = torch.zeros(self.b, width, dtype=torch.long, device=self.device)
        return self.prompts[width]

    def step_inputs(self, k: int, tree: Optional[DraftTree]) -> torch.Tensor:
        """The inputs of a k-token step [b, k], or of a draft tree's [b, N]."""
        return self.inputs[k] if tree is None else self.tree_buffers(tree)["inputs"]

    def tree_buffers(self, tree: DraftTree) -> dict:
        """A draft tree's per-sequence buffers: its inputs [b, N] and its current tree in ``DraftTree.tensors``'
        form with a batch dim (a dynamic tree's changes every step; a static one's is the same for all)."""
        if tree not in self.trees:
            b, n, z = self.b, tree.nodes, dict(dtype=torch.long, device=self.device)
            self.trees[tree] = {"inputs": torch.zeros(b, n, **z), "depth": torch.zeros(b, n, **z),
                                "parent": torch.zeros(b, n, **z), "path": torch.zeros(b, n, tree.depth + 1, **z),
                                "head": torch.zeros(b, n - 1, **z), "rank": torch.zeros(b, n - 1, **z),
                                "ancestors": torch.zeros(b, n, n, dtype=torch.bool, device=self.device)}
        return self.trees[tree]

    def q_buffer(self, k: int) -> torch.Tensor:
        if k not in self.q:
            self.q[k] = torch.zeros(self.b, k - 1, self.vocab, dtype=torch.float32, device=self.device)
        return self.q[k]

    def counters(self) -> tuple:
        """The tensors ``commit`` updates after the step's inputs, in its argument order."""
        return (self.out, self.out_len, self.done, self.all_done, self.budget, self.eod, self.forwards,
                self.seq_forwards, self.proposed, self.accepted, self.cache.lengths)


_DRAFT_WEIGHTS = {"attn_norm": "attn_norm.weight", "qkv": "attn.qkv.weight", "out": "attn.out.weight",
                  "mlp_norm": "mlp_norm.weight", "gate_up": "mlp.gate_up.weight", "down": "mlp.down.weight"}


class Decoder:
    """Plain and self-speculative decoding of one model with static buffers.

    The prefill and the k-token decode step are plain tensor programs with no host sync (acceptance,
    rollback, stop conditions, statistics and the next drafts all stay on the device). On CUDA
    (``graphs=True``) each is captured once as a CUDA graph per (batch, capacity, k, sampling) bucket —
    per prompt-width bucket for the prefill — and replayed; with ``compile=True`` the step's pure pieces
    (``_Programs``: the two halves of a layer, the forward's mask and RoPE, the verification and bookkeeping)
    are fused by ``torch.compile`` first. Elsewhere the same programs run eagerly.

    Transformer draft heads 2..n run as ONE batched layer: their weights are stacked once per decoder
    ([n-1, ...], a copy refreshed in place when the model's weights change) and their KV caches share one
    buffer, so k-1 draft heads cost about one layer's launches (at batch 1 a layer is latency, not FLOPs).
    """

    WIDTH_BUCKET = 64  # prompts are left-padded to a multiple of this: fewer prefill graphs
    CAPACITY_BUCKET = 128  # attention runs over the whole capacity: keep it close to what is needed
    # Graph mode: the host reads the stop flag of the step POLL_LAG launches back. 1 keeps the GPU fed (the
    # next replay is queued while a step runs: a launch takes microseconds, a step far longer) and wastes at
    # most one step at the end — which is 2% of a 50-step speculative run.
    POLL_LAG = 1
    STREAM_EVERY = 4  # steps between reads of the emitted tokens when streaming (callback / progress bar)
    MAX_STATES = 4  # (batch, capacity) buckets kept at once

    def __init__(self, model, graphs: Optional[bool] = None, compile: Optional[bool] = None, gemv: bool = False,
                 attention: Optional[str] = None, layer_kernels: Optional[str] = None):
        self.model = model
        self.device = model.embedding.weight.device
        self.dtype = model.embedding.weight.dtype
        cuda = self.device.type == "cuda"
        self.graphs = cuda if graphs is None else graphs
        if self.graphs and not cuda:
            raise ValueError("CUDA graphs need a model on a CUDA device.")
        self.compile = self.graphs if compile is None else compile
        self.gemv = gemv and self.compile
        attention = default_attention(self.device) if attention is None else attention
        if attention not in _Programs.ATTENTIONS:
            names = ", ".join(map(repr, _Programs.ATTENTIONS))
            raise ValueError(f"attention must be one of {names}, got {attention!r}.")
        if attention == "flash_decoding" and not flash_decoding_kernels.available(self.device):
            raise ValueError("attention='flash_decoding' needs Triton and a CUDA device (or Triton's interpreter, "
                             "TRITON_INTERPRET=1); use attention='sdpa'.")
        self.attention = _Programs.attention_for(attention, self.compile)
        layer_kernels = default_layer_kernels(self.device) if layer_kernels is None else layer_kernels
        if layer_kernels not in _Programs.LAYER_KERNELS:
            raise ValueError(f"layer_kernels must be 'torch' or 'triton', got {layer_kernels!r}.")
        if layer_kernels == "triton" and not gemv_kernels.available(self.device):
            raise ValueError("layer_kernels='triton' needs Triton and a CUDA device (or Triton's interpreter, "
                             "TRITON_INTERPRET=1); use layer_kernels='torch'.")
        self.layer_kernels = layer_kernels
        self.programs = _Programs(self.compile, self.gemv, self.attention, layer_kernels)
        self.compile_error = None
        cfg = model.cfg
        self.group = cfg.num_attention_heads // cfg.kv_heads
        self.n_heads = model.mtp.n_heads
        with torch.no_grad():  # RoPE of every position, from the model's own function (same values)
            self.cos_table, self.sin_table = model.rope(torch.arange(cfg.max_seq_length, device=self.device),
                                                        self.dtype)
        self.batched_drafts = model.mtp.head_type == "transformer" and self.n_heads > 1
        self._draft_weights: dict = {}
        self._draft_versions = None
        if self.batched_drafts:
            self.sync_draft_weights()
        self._states: dict = {}
        self._trees: dict = {}  # DraftTree -> its index tensors on the device (``DraftTree.tensors``)
        self._graphs: dict = {}
        self._pool = None
        self._generator = torch.Generator(device=self.device) if self.graphs else None
        self._side = torch.cuda.Stream(self.device) if self.graphs else None
        self.signature = self._signature(model)

    @staticmethod
    def _signature(model) -> tuple:
        """Captured graphs read the weights at fixed addresses: a model moved or cast gets a new decoder."""
        w = model.embedding.weight
        return (w.device, w.dtype, w.data_ptr())

    def sync_draft_weights(self) -> None:
        """Stack the draft heads' weights [n-1, ...], or refresh the stack in place (captured graphs keep its
        address) when any of them changed since (an optimizer step, a load: tensors count their in-place
        writes in ``_version``)."""
        heads = self.model.output.heads[1:]
        params = [[h.get_parameter(path) for h in heads] for path in _DRAFT_WEIGHTS.values()]
        versions = tuple(p._version for group in params for p in group) + tuple(p.data_ptr() for g in params
                                                                                 for p in g)
        if versions == self._draft_versions:
            return
        with torch.no_grad():
            for name, group in zip(_DRAFT_WEIGHTS, params):
                if name in self._draft_weights:
                    self._draft_weights[name].copy_(torch.stack(group))
                else:
                    self._draft_weights[name] = torch.stack(group)
        self._draft_versions = versions

    def state(self, b: int, capacity: int) -> _State:
        """The buffers for batch ``b`` and at least ``capacity`` slots: an existing bucket of up to twice that
        capacity is reused; beyond MAX_STATES buckets the least recently used one (its KV cache and graphs)
        is dropped, so prompts of many lengths (HumanEval) do not pile up caches."""
        fits = [key for key in self._states if key[0] == b and capacity <= key[1] <= 2 * capacity]
        key = min(fits, key=lambda k: k[1]) if fits else (b, capacity)
        st = self._states.pop(key, None)
        if st is None:
            st = _State(b, capacity, self.device, self.n_heads, self.model.cfg.vocab_size)
            st.cache.kernels = self.programs.kernels
            while len(self._states) >= self.MAX_STATES:
                old = next(iter(self._states))
                del self._states[old]
                self._graphs = {g: v for g, v in self._graphs.items() if g[1:3] != old}
        self._states[key] = st  # (re)inserted last: the dict's order is the recency order
        return st

    # ---- the two programs -----------------------------------------------------------------------------

    def tree_tensors(self, tree: DraftTree) -> dict:
        """A draft tree's index tensors on the device (a dynamic tree's: its candidates'), made once."""
        if tree not in self._trees:
            self._trees[tree] = tree.tensors(self.device)
        return self._trees[tree]

    def _forward(self, st: _State, tokens: torch.Tensor, k: int, tree: Optional[DraftTree] = None) -> tuple:
        """Trunk, head 1 and the draft heads 2..k over ``tokens`` [b, s] -> (head 1's outputs [b, s, hidden],
        the draft heads' [k-1, b, s, hidden] or None). Every head runs over every input: its KV cache needs
        them all. With graphs the draft heads run on a side stream beside head 1 and the verification.
        ``tree``: the tokens are a draft tree's nodes (its mask and positions instead of a causal chain's)."""
        model, cache, s = self.model, st.cache, tokens.size(1)
        if tree is None:
            mask, cos, sin = self.programs.inputs(cache.lengths, cache.start, self.cos_table, self.sin_table, s,
                                                  cache.capacity, self.group)
        else:
            t = st.tree_buffers(tree)
            mask, cos, sin = self.programs.tree_inputs(cache.lengths, cache.start, self.cos_table, self.sin_table,
                                                       t["ancestors"], t["depth"], cache.capacity, self.group)
        z = model.trunk_forward(tokens, cos, sin, cache, mask)
        if k == 1:
            return model.output.heads[0](z, cos, sin, cache, mask), None
        main = torch.cuda.current_stream(self.device) if self._side is not None else None
        if main is not None:
            self._side.wait_stream(main)
        with torch.cuda.stream(self._side) if main is not None else nullcontext():
            hd = self._draft_hidden(st, z, cos, sin, mask, k)
        h1 = model.output.heads[0](z, cos, sin, cache, mask)
        if main is not None:
            main.wait_stream(self._side)
        return h1, hd

    def _draft_hidden(self, st: _State, z, cos, sin, mask, k: int) -> torch.Tensor:
        """The outputs of draft heads 2..k over every input: [k-1, b, s, hidden]."""
        model, cache = self.model, st.cache
        if not self.batched_drafts:  # linear heads: a d x d map each
            return torch.stack([model.output.heads[i](z, cos, sin, cache, mask) for i in range(1, k)])
        head = model.output.heads[1]
        attn, m, b = head.attn, k - 1, st.b
        k_all, v_all = cache.stack([h.key for h in model.output.heads[1:]], attn.n_kv, attn.head_dim, z.dtype)
        weights = {name: stacked_alias(w, m) for name, w in self._draft_weights.items()}
        return decode_layers(z, cos, sin, k_all[: m * b], v_all[: m * b], cache.lengths, mask, weights,
                             self.programs.kernels, head.attn_norm.eps, attn.n_kv, attn.group, attn.head_dim)

    def _unembedding(self) -> tuple:
        out = self.model.output
        return out.final_norm.weight, out.final_norm.eps, out._unembedding(self.model.tied_weight)

    def prefill(self, st: _State, width: int, k: int, sampling: SamplingParams, generator,
                tree: Optional[DraftTree] = None) -> None:
        """The left-padded prompts (``st.prompts[width]``, ``st.cache.start``) in one forward; the first
        token, the first drafts (a draft tree's: each head's top candidates) and fresh counters.
        ``st.budget`` and ``st.eod`` are set by the caller."""
        cache = st.cache
        cache.lengths.zero_()
        h1, hd = self._forward(st, st.prompts[width], k)
        norm_w, eps, unembedding = self._unembedding()
        vocab = self.model.cfg.vocab_size
        last = torch.full((st.b,), width - 1, dtype=torch.long, device=self.device)
        y, _ = next_tokens(head_logits(h1[:, -1], norm_w, eps, unembedding, vocab), sampling, generator)
        cache.advance(width)
        st.out[:, 0] = y
        st.out_len.fill_(1)
        st.done.copy_((y == st.eod) | (st.budget <= 1))
        st.all_done.copy_(st.done.all())
        st.forwards.fill_(1)
        st.seq_forwards.fill_(st.b)
        st.proposed.zero_()
        st.accepted.zero_()
        inputs = st.step_inputs(k, tree)
        inputs[:, 0] = y
        if tree is not None:
            buffers = st.tree_buffers(tree)
            if not tree.select:  # a static tree: the same for every sequence and step
                for name, value in self.tree_tensors(tree).items():
                    buffers[name].copy_(value.expand(buffers[name].shape))
            candidates, logq = draft_candidates(hd, last, norm_w, eps, unembedding, vocab, tree.ranks)
            self._next_tree(st, tree, y, candidates, logq)
        elif hd is not None:
            drafts, q = next_tokens(head_logits(select_rows(hd, last), norm_w, eps, unembedding, vocab), sampling,
                                    generator)
            inputs[:, 1:] = drafts
            if q is not None:
                st.q_buffer(k).copy_(q)

    def step(self, st: _State, k: int, sampling: SamplingParams, generator) -> None:
        """One forward over ``[y, d_2 .. d_k]`` per sequence: verify, emit a + 1 tokens, roll back the rest,
        draft again — all on the device. Finished sequences ride along without committing anything."""
        inputs = st.inputs[k]
        h1, hd = self._forward(st, inputs, k)
        norm_w, eps, unembedding = self._unembedding()
        vocab = self.model.cfg.vocab_size
        if sampling.greedy:
            self.programs.tail(h1, hd, norm_w, eps, unembedding, vocab, inputs, *st.counters())
            return
        # Sampling draws from generators, which the compiler does not trace: these lines stay eager; the
        # bookkeeping after them is compiled like the greedy tail's.
        if k == 1:
            y, _ = next_tokens(head_logits(h1[:, 0], norm_w, eps, unembedding, vocab), sampling, generator)
            accepted, drafts = torch.zeros_like(y), None
        else:
            logits1, draft_logits = all_logits(h1, hd, norm_w, eps, unembedding, vocab)
            accepted, y = verify_sampled(probabilities(logits1, sampling), st.q[k], _drafts_of(inputs), generator)
            drafts, q = next_tokens(select_rows(draft_logits, accepted), sampling, generator)
            st.q[k].copy_(q)
        self.programs.commit(inputs, accepted, y, drafts, *st.counters())

    def tree_step(self, st: _State, tree: DraftTree, sampling: SamplingParams, generator) -> None:
        """One forward over a draft tree's nodes per sequence: verify (greedily, or with a draw from head 1 at
        every node: ``sample_tree_nodes``), move the accepted path's keys and values to consecutive slots, emit
        a + 1 tokens, draft the next tree — all on the device."""
        t = st.tree_buffers(tree)
        inputs = t["inputs"]
        h1, hd = self._forward(st, inputs, tree.heads, tree)
        norm_w, eps, unembedding = self._unembedding()
        vocab = self.model.cfg.vocab_size
        pred = None
        if not sampling.greedy:  # (drawn eagerly: the compiler does not trace generators)
            pred = sample_tree_nodes(probabilities(head_logits(h1, norm_w, eps, unembedding, vocab), sampling),
                                     generator)
        accepted, y, nodes, tokens, candidates, logq = self.programs.tree_verify(
            h1, hd, norm_w, eps, unembedding, vocab, inputs, t["parent"], t["ancestors"], t["depth"], t["path"],
            tree.ranks, pred)
        st.cache.compact(nodes, self.programs.compact)
        self.programs.commit(tokens, accepted, y, None, *st.counters())
        self._next_tree(st, tree, y, candidates, logq)

    def _next_tree(self, st: _State, tree: DraftTree, y, candidates, logq) -> None:
        """The next forward's tree and inputs, in place: a dynamic tree selects its nodes for each sequence
        from the draft heads' probabilities (``inference.tree.select_nodes``); a static one keeps its own."""
        t = st.tree_buffers(tree)
        if tree.select:
            for name, value in self.programs.select(logq, self.tree_tensors(tree), tree.select).items():
                t[name].copy_(value)
        t["inputs"].copy_(tree_following(y, candidates, t["head"], t["rank"]))

    # ---- CUDA graphs ----------------------------------------------------------------------------------

    def _graph(self, key: tuple, fn: Callable[[], None], sampled: bool):
        graph = self._graphs.get(key)
        if graph is not None:
            return graph
        try:
            graph = self._capture(fn, sampled)
        except Exception as exc:  # a compiler or kernel failure must cost speed, not correctness
            graph = self._capture_plainer(fn, sampled, exc)
        self._graphs[key] = graph
        return graph

    def _capture_plainer(self, fn, sampled: bool, exc: Exception):
        """Capture ``fn`` again after ``exc`` with plainer programs, warning once each: first without
        inductor (the Triton attention and layer kernels kept), then torch's layer programs and SDPA alone;
        ``exc`` (or the last failure) is raised when nothing plainer is left."""
        fallbacks = []
        if self.programs.compiled:
            fallbacks.append(("the uncompiled step", _Programs(
                compile=False, attention=_Programs.attention_for(self.attention, False),
                layer_kernels=self.layer_kernels)))
        if (self.attention, self.layer_kernels) != ("sdpa", "torch"):
            fallbacks.append(("SDPA and torch's layer programs, uncompiled", _Programs(compile=False)))
        for what, programs in fallbacks:
            if self.programs.compiled == programs.compiled and self.programs.names == programs.names:
                continue  # (already these: the uncompiled step kept sdpa and torch)
            self.compile_error = f"{type(exc).__name__}: {exc}".splitlines()[0][:300]
            print(f"warning: the decode step failed ({self.compile_error}); decoding with {what}.", file=sys.stderr)
            self.programs = programs
            for st in self._states.values():
                st.cache.kernels = programs.kernels
            self._graphs.clear()
            try:
                return self._capture(fn, sampled)
            except Exception as again:
                exc = again
        raise exc

    def _capture(self, fn, sampled: bool):
        # Warm up on a side stream (kernel selection, compilation, lazy buffers), as torch.cuda.graphs says.
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            for _ in range(2):
                fn()
        torch.cuda.current_stream(self.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        if sampled:  # replays draw fresh numbers from our generator's advancing Philox offset
            graph.register_generator_state(self._generator)
        with torch.cuda.graph(graph, pool=self._pool):
            fn()
        if self._pool is None:
            self._pool = graph.pool()  # all graphs of this decoder share one pool: they never run at once
        return graph

    @staticmethod
    def step_key(b: int, capacity: int, k: int, sampling: SamplingParams, tree: Optional[DraftTree] = None) -> tuple:
        """What a captured step graph is kept under, after its kind: batch and capacity first (``state`` drops a
        bucket's graphs by them), then the step's shape and sampling."""
        return (b, capacity, k, (sampling.greedy, sampling.temperature, sampling.top_k, sampling.top_p), tree)

    # ---- one generate call ----------------------------------------------------------------------------

    def generate(self, prompts, max_new_tokens, sampling, heads, eod, pad_id, generator, progress,
                 callback, tree: Optional[DraftTree] = None) -> GenerationOutput:
        model = self.model
        k, b = (heads if tree is None else tree.heads), len(prompts)
        n_heads = model.mtp.n_heads
        lengths = [len(p) for p in prompts]
        width = _round_up(max(lengths), self.WIDTH_BUCKET) if self.graphs else max(lengths)
        # (a step writes up to k slots, a draft tree's N, past the committed length)
        written = max(n_heads, 0 if tree is None else tree.nodes)
        capacity = _round_up(width + max_new_tokens + 2 * written, self.CAPACITY_BUCKET)
        stats = DecodeStats(heads=k, batch_size=b, prompt_tokens=sum(lengths))
        t0 = time.perf_counter()
        if self.batched_drafts and k > 1:
            self.sync_draft_weights()
        st = self.state(b, capacity)
        capacity = st.capacity
        rows = [[pad_id] * (width - len(p)) + list(p) for p in prompts]
        st.prompt_buffer(width).copy_(torch.tensor(rows, dtype=torch.long))
        st.cache.reset([width - n for n in lengths])
        st.budget.fill_(max_new_tokens)
        st.eod.fill_(-1 if eod is None else eod)
        sampled = not sampling.greedy
        if self.graphs:
            gen = self._generator
            g_prefill = self._graph(("prefill",) + self.step_key(b, capacity, k, sampling, tree) + (width,),
                                    lambda: self.prefill(st, width, k, sampling, gen, tree), sampled)
            g_step = self._graph(("step",) + self.step_key(b, capacity, k, sampling, tree),
                                 (lambda: self.tree_step(st, tree, sampling, gen))
                                 if tree else (lambda: self.step(st, k, sampling, gen)), sampled)
            if sampled:  # the caller's generator decides the stream (one draw from it per call)
                seed = torch.randint(0, 2 ** 62, (1,), generator=generator, device=generator.device
                                     if generator is not None else "cpu")
                gen.manual_seed(int(seed))
            run_prefill, run_step = g_prefill.replay, g_step.replay
        else:
            run_prefill = lambda: self.prefill(st, width, k, sampling, generator, tree)  # noqa: E731
            run_step = ((lambda: self.tree_step(st, tree, sampling, generator)) if tree else  # noqa: E731
                        (lambda: self.step(st, k, sampling, generator)))

        from tqdm import tqdm

        bar = tqdm(total=b * max_new_tokens, desc=f"decode k={k} b={b}", unit="tok", file=sys.stderr,
                   disable=not progress, leave=False, dynamic_ncols=True)
        streamed = [0] * b
        stream = callback is not None or progress

        def flush() -> None:
            """Hand the tokens emitted since the last flush to the callback and the bar (a host sync)."""
            lens = st.out_len.tolist()
            for s, (n_out, row) in enumerate(zip(lens, st.out.tolist())):
                new = _finished(row[:min(n_out, max_new_tokens)], eod)[0][streamed[s]:]
                if new:
                    streamed[s] += len(new)
                    bar.update(len(new))
                    if callback is not None:
                        callback(s, new)

        # Each step gives every live sequence at least one token: budget - 1 steps always suffice.
        max_steps = max_new_tokens - 1
        if self.graphs and not stream:
            # No sync after the prefill: the step graphs are queued right behind it (a step of finished
            # sequences changes nothing, and the loop sees the stop flag a few launches later). The
            # prefill's time comes from events once everything is done.
            start, prefilled = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            host_s = time.perf_counter() - t0
            run_prefill()
            prefilled.record()
            self._run_graph_loop(run_step, st, max_steps)
            prefilled.synchronize()
            stats.prefill_s = host_s + start.elapsed_time(prefilled) / 1e3
        else:
            run_prefill()
            done = bool(st.all_done)  # the one sync before the loop: the prefill may already finish everything
            stats.prefill_s = time.perf_counter() - t0
        if stream or not self.graphs:
            steps = 0
            while not done and steps < max_steps:
                run_step()
                steps += 1
                if not self.graphs or steps % self.STREAM_EVERY == 0:
                    if stream:
                        flush()
                    done = bool(st.all_done)
        if stream:
            flush()

        out_len, out = st.out_len.tolist(), st.out.tolist()
        outputs, by_eod = [], []
        for n_out, row in zip(out_len, out):
            tokens, hit = _finished(row[:min(n_out, max_new_tokens)], eod)
            outputs.append(tokens)
            by_eod.append(hit)
            stats.tokens += len(tokens) + int(hit)  # an EOD counts: the forward produced it
        stats.forwards = int(st.forwards)
        stats.seq_forwards = int(st.seq_forwards)
        if k > 1:
            stats.verify_steps = stats.seq_forwards - b
            stats.proposed = st.proposed[: k - 1].tolist()
            stats.accepted = st.accepted[: k - 1].tolist()
        stats.wall_s = time.perf_counter() - t0
        bar.close()
        return GenerationOutput(tokens=outputs, stats=stats, finished_by_eod=by_eod)

    def _run_graph_loop(self, run_step, st: _State, max_steps: int) -> None:
        """Replay the step graph until every sequence is done, without stalling the GPU: after each launch
        the stop flag is copied to pinned host memory asynchronously, and the host reads the flag of the
        step POLL_LAG launches back (waiting for it only when the queue is that far ahead). A finished
        batch costs at most POLL_LAG wasted forwards."""
        ring = 2 * (self.POLL_LAG + 1)
        flags = torch.zeros(ring, dtype=torch.bool, pin_memory=True)
        events = [torch.cuda.Event() for _ in range(ring)]
        launched = checked = 0
        while launched < max_steps:
            run_step()
            slot = launched % ring
            flags[slot].copy_(st.all_done, non_blocking=True)
            events[slot].record()
            launched += 1
            while checked < launched and (launched - checked > self.POLL_LAG or events[checked % ring].query()):
                events[checked % ring].synchronize()
                if bool(flags[checked % ring]):
                    return
                checked += 1


def _finished(tokens: list, eod: Optional[int]) -> tuple:
    """(tokens cut before the first EOD, whether an EOD was met)."""
    if eod is not None and eod in tokens:
        return tokens[: tokens.index(eod)], True
    return tokens, False


_DECODERS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def default_attention(device: torch.device) -> str:
    """The decode attention a decoder gets unless told: split-KV flash-decoding on CUDA where Triton is (the
    memory-efficient SDPA kernel runs one thread block per KV head, latency-bound at small batch), else
    SDPA."""
    if torch.device(device).type == "cuda" and flash_decoding_kernels.available(device):
        return "flash_decoding"
    return "sdpa"


def default_layer_kernels(device: torch.device) -> str:
    """The layer programs a decoder gets unless told: torch's, on every device for now. The Triton GEMV kernels
    (``layer_kernels="triton"``) are to become the CUDA default once a GPU run has timed them against torch's
    programs: they are checked on the CPU through Triton's interpreter and compile for sm_90 without register
    spills, but have not yet run on a GPU (docs/inference.md)."""
    return "torch"


def decoder_for(model, graphs: Optional[bool] = None, compile: Optional[bool] = None,
                gemv: Optional[bool] = None, attention: Optional[str] = None,
                layer_kernels: Optional[str] = None) -> Decoder:
    """The model's decoder (kept across calls, so graphs are captured once), rebuilt if the model's
    weights moved or the options changed (``gemv`` / ``attention`` / ``layer_kernels`` None keep the current
    decoder's)."""
    dec = _DECODERS.get(model)
    want_graphs = model.embedding.weight.device.type == "cuda" if graphs is None else graphs
    want_compile = want_graphs if compile is None else compile
    want_gemv = (dec.gemv if dec is not None else False) if gemv is None else (gemv and want_compile)
    if attention is None:
        attention = dec.attention if dec is not None else default_attention(model.embedding.weight.device)
    want_attention = _Programs.attention_for(attention, want_compile)
    if layer_kernels is None:
        layer_kernels = dec.layer_kernels if dec is not None else default_layer_kernels(model.embedding.weight.device)
    if (dec is None or dec.signature != Decoder._signature(model) or dec.graphs != want_graphs
            or dec.compile != want_compile or dec.gemv != want_gemv or dec.attention != want_attention
            or dec.layer_kernels != layer_kernels):
        dec = _DECODERS[model] = Decoder(model, graphs=want_graphs, compile=want_compile, gemv=want_gemv,
                                         attention=want_attention, layer_kernels=layer_kernels)
    return dec


def check_request(model, prompts, max_new_tokens: int, heads: int, sampling: SamplingParams,
                  tree: Optional[DraftTree] = None) -> None:
    """Every generation argument range-checked, one sentence each."""
    n_heads = model.mtp.n_heads
    if tree is not None:
        if not isinstance(tree, DraftTree):
            raise InputError(f"tree must be a DraftTree (megatron_mtp.inference.tree), got {type(tree).__name__}.")
        if tree.heads > n_heads:
            raise InputError(f"the draft tree is {tree.depth} deep, which needs {tree.heads} heads; the model has "
                             f"{n_heads} (mtp.n_heads): use a tree of depth at most {n_heads - 1}.")
        if heads not in (1, tree.heads):
            raise InputError(f"heads={heads} disagrees with the draft tree, which uses {tree.heads} heads: leave "
                             f"heads out when giving a tree.")
        if tree.ranks > model.cfg.vocab_size:
            raise InputError(f"the draft tree takes {tree.ranks} candidates per head, more than the vocabulary's "
                             f"{model.cfg.vocab_size} tokens.")
    if isinstance(heads, bool) or not isinstance(heads, int) or not 1 <= heads <= n_heads:
        raise InputError(f"speculative heads must lie in 1..{n_heads} (the model's mtp.n_heads), got {heads}.")
    if not prompts:
        raise InputError("give at least one prompt (a batch of size 0 has nothing to decode).")
    if any(len(p) == 0 for p in prompts):
        raise InputError("every prompt needs at least one token.")
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise InputError(f"max_new_tokens must be an integer of at least 1, got {max_new_tokens}.")
    vocab = model.cfg.vocab_size
    bad = [t for p in prompts for t in p if not 0 <= int(t) < vocab]
    if bad:
        raise InputError(f"prompt token id {bad[0]} lies outside the vocabulary 0..{vocab - 1}.")
    longest, limit = max(len(p) for p in prompts), model.cfg.max_seq_length
    if longest + max_new_tokens > limit:
        raise InputError(f"a prompt of {longest} tokens plus max_new_tokens {max_new_tokens} exceeds the model's "
                         f"max_seq_length {limit}: shorten the prompt or lower max_new_tokens.")
    sampling.validate()


@torch.no_grad()
def generate(
    model,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int,
    sampling: Optional[SamplingParams] = None,
    heads: int = 1,
    eod: Optional[int] = None,
    pad_id: int = 0,
    generator: Optional[torch.Generator] = None,
    progress: bool = False,
    callback: Optional[Callable[[int, list], None]] = None,
    graphs: Optional[bool] = None,
    compile: Optional[bool] = None,
    gemv: Optional[bool] = None,
    attention: Optional[str] = None,
    layer_kernels: Optional[str] = None,
    tree: Optional[DraftTree] = None,
) -> GenerationOutput:
    """Generate up to ``max_new_tokens`` for each prompt (lists of token ids, any lengths).

    ``heads`` = 1 is plain decoding with head 1; ``heads`` = k > 1 is self-speculative decoding drafting
    with heads 2..k. Stops a sequence at ``eod`` (not included in its output) or at the budget.
    ``callback(b, new_tokens)`` is called as tokens of sequence b are accepted (streaming: the decoder
    then reads the device every few steps). ``graphs`` / ``compile`` (default: on for CUDA models) pick
    CUDA-graph replay and the compiled step programs; the eager path gives the same tokens. ``gemv`` (default
    off; kept once set) compiles one-row matmuls as fused Triton reductions (see ``_Programs``); ``attention``
    picks the decode attention (default: kept once set, else ``default_attention``): ``"flash_decoding"``
    (split-KV Triton kernels, ``ops.decode_attention``), ``"sdpa"``, or for a compiled decoder ``"fused"`` or
    ``"flex"`` (``Decoder``); ``layer_kernels`` the layer programs of a decode step (default: kept once set,
    else ``default_layer_kernels``): ``"triton"`` (four GEMV kernels a layer carrying the norm, RoPE, cache write,
    SwiGLU and residual, ``ops.decode_gemv``; a prefill keeps torch's) or ``"torch"``. ``tree`` verifies a draft
    tree of each head's top candidates instead of one draft per head (``inference.tree``; the output stays
    plain greedy's, or distributed as plain sampling; ``heads`` is then the tree's).
    The model runs in eval mode (no dropout) and gets its previous mode back afterwards.
    """
    sampling = sampling or SamplingParams()
    check_request(model, prompts, max_new_tokens, heads, sampling, tree)
    was_training = model.training
    model.eval()
    try:
        with attention_backends(model.embedding.weight.device):
            dec = decoder_for(model, graphs, compile, gemv, attention, layer_kernels)
            return dec.generate(prompts, max_new_tokens, sampling, heads, eod, pad_id, generator, progress,
                                callback, tree)
    finally:
        model.train(was_training)


def attention_backends(device: torch.device):
    """Attention kernels for decoding: the memory-efficient kernel takes the additive mask (flash takes
    none); math is the fallback for dtypes and shapes it does not serve."""
    if device.type != "cuda":
        return nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH])
