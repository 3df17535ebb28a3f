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

So every forward emits a + 1 tokens per sequence and sequences move on at their own pace.

Greedy verification accepts the longest prefix of drafts equal to head 1's argmax, which makes the output
identical to plain greedy decoding. Sampling uses speculative sampling with rejection (Leviathan et al.
2023; Chen et al. 2023): draft x of head i, drawn from q = head i's distribution, is accepted with
probability min(1, p(x) / q(x)), p = head 1's distribution at that position; at the first rejection the
token is resampled from norm(max(0, p - q)), and if all drafts pass, a bonus token is drawn from p. Each
draft is drawn independently of the tokens before it given the committed prefix, so the output is
distributed exactly as plain sampling from head 1. Temperature, top-k and top-p are applied to p and q
alike (``sampling.probabilities``).

Host syncs: one small transfer per forward (accepted counts and the emitted tokens) — which the loop needs
anyway to stop at EOD or the token budget.
"""
from __future__ import annotations

import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

import torch

from megatron_mtp.inference.kv_cache import KVCache
from megatron_mtp.inference.sampling import SamplingParams, next_tokens, probabilities, sample


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
    accepted = (pred[:, :-1] == drafts).long().cumprod(dim=1).sum(dim=1)
    return accepted, pred.gather(1, accepted[:, None])[:, 0]


def verify_sampled(p: torch.Tensor, q: torch.Tensor, drafts: torch.Tensor,
                   generator: Optional[torch.Generator]) -> tuple:
    """Speculative sampling with rejection.

    p [b, k, V]: head 1's (filtered) distributions at the k inputs; q [b, k-1, V]: the distributions the
    drafts [b, k-1] were drawn from. Returns (accepted a [b], next token [b]).
    """
    b, k = p.shape[0], p.shape[1]
    pd = p[:, :-1].gather(-1, drafts[..., None])[..., 0]
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
# The decoding loop


def _left_pad(prompts: Sequence[Sequence[int]], pad_id: int, device) -> tuple:
    lengths = [len(p) for p in prompts]
    width = max(lengths)
    rows = [[pad_id] * (width - len(p)) + list(p) for p in prompts]
    return torch.tensor(rows, dtype=torch.long, device=device), [width - n for n in lengths], width


def _draft(model, z, cos, sin, cache, mask, index, k, sampling, generator) -> tuple:
    """Drafts of heads 2..k at input ``index`` [b] -> (tokens [b, k-1], their distributions [b, k-1, V] or None).

    Every head layer runs over all inputs (its KV cache needs them); the final norm, unembedding and
    token choice then run once for the k-1 selected rows together."""
    if k == 1:
        return z.new_zeros((z.size(0), 0), dtype=torch.long), None
    states = torch.stack([model.head_states(i, z, cos, sin, cache, mask, index=index) for i in range(1, k)], 1)
    return next_tokens(model.unembed(states), sampling, generator)


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
) -> GenerationOutput:
    """Generate up to ``max_new_tokens`` for each prompt (lists of token ids, any lengths).

    ``heads`` = 1 is plain decoding with head 1; ``heads`` = k > 1 is self-speculative decoding drafting
    with heads 2..k. Stops a sequence at ``eod`` (not included in its output) or at the budget.
    ``callback(b, new_tokens)`` is called as tokens of sequence b are accepted (streaming).
    The model runs in eval mode (no dropout) and gets its previous mode back afterwards.
    """
    was_training = model.training
    model.eval()
    try:
        with attention_backends(model.embedding.weight.device):
            return _generate(model, prompts, max_new_tokens, sampling, heads, eod, pad_id, generator, progress,
                             callback)
    finally:
        model.train(was_training)


def attention_backends(device: torch.device):
    """Attention kernels for decoding. Every step attends over a new key length with an explicit mask;
    cuDNN's attention builds a new execution plan for every new shape (milliseconds of host time per
    layer per step on an H100), so on CUDA decoding uses the memory-efficient and math kernels."""
    if device.type != "cuda":
        return nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH])


def _generate(model, prompts, max_new_tokens, sampling, heads, eod, pad_id, generator, progress,
              callback) -> GenerationOutput:
    sampling = sampling or SamplingParams()
    n_heads = model.mtp.n_heads
    if not 1 <= heads <= n_heads:
        raise ValueError(f"speculative heads must lie in 1..{n_heads} (the model's mtp.n_heads), got {heads}.")
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token.")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be at least 1, got {max_new_tokens}.")
    device = model.embedding.weight.device
    k, b = heads, len(prompts)
    stats = DecodeStats(heads=k, batch_size=b, prompt_tokens=sum(len(p) for p in prompts))
    outputs = [[] for _ in range(b)]
    by_eod = [False] * b
    active = [True] * b
    active_dev = torch.ones(b, dtype=torch.long, device=device)

    from tqdm import tqdm

    bar = tqdm(total=b * max_new_tokens, desc=f"decode k={k} b={b}", unit="tok", file=sys.stderr,
               disable=not progress, leave=False, dynamic_ncols=True)

    def emit(seq: int, new: list) -> int:
        """Append accepted tokens to sequence ``seq`` honouring EOD and the budget; return how many were
        generated (an EOD counts: the forward produced it, though the output leaves it out)."""
        room = max_new_tokens - len(outputs[seq])
        new = new[:room]
        produced = len(new)
        if eod is not None and eod in new:
            new = new[: new.index(eod)]
            produced = len(new) + 1
            by_eod[seq] = True
            active[seq] = False
        outputs[seq].extend(new)
        if len(outputs[seq]) >= max_new_tokens:
            active[seq] = False
        if callback is not None and new:
            callback(seq, new)
        return produced

    t0 = time.perf_counter()
    # ---- prefill: the left-padded prompts in one forward --------------------------------------------
    tokens, pads, width = _left_pad(prompts, pad_id, device)
    # Room for the budget plus one forward of k slots past it (finished sequences may have committed
    # up to k slots beyond their last emitted token).
    cache = KVCache(b, width + max_new_tokens + 2 * k, device, start=pads)
    mask, pos = cache.attention_mask(width), cache.positions(width)
    z, cos, sin = model.trunk_hidden(tokens, pos, cache, mask)
    last = torch.full((b,), width - 1, dtype=torch.long, device=device)
    y, _ = next_tokens(model.head_logits(0, z, cos, sin, cache, mask, index=last), sampling, generator)
    drafts, q = _draft(model, z, cos, sin, cache, mask, last, k, sampling, generator)
    cache.advance(width)
    stats.forwards += 1
    stats.seq_forwards += b
    emitted = sum(emit(s, [t]) for s, t in enumerate(y.tolist()))
    stats.tokens += emitted
    bar.update(emitted)
    stats.prefill_s = time.perf_counter() - t0

    # ---- decode: one forward per step, k tokens per sequence ------------------------------------------
    while any(active):
        inputs = torch.cat([y[:, None], drafts], dim=1)  # [b, k]
        mask, pos = cache.attention_mask(k), cache.positions(k)
        z, cos, sin = model.trunk_hidden(inputs, pos, cache, mask)
        if k == 1:
            y, _ = next_tokens(model.head_logits(0, z, cos, sin, cache, mask, index=None)[:, 0], sampling, generator)
            accepted = torch.zeros(b, dtype=torch.long, device=device)
        else:
            logits1 = model.head_logits(0, z, cos, sin, cache, mask, index=None)  # [b, k, V]
            if sampling.greedy:
                accepted, y = verify_greedy(logits1, drafts)
            else:
                accepted, y = verify_sampled(probabilities(logits1, sampling), q, drafts, generator)
            old_drafts = drafts
            drafts, q = _draft(model, z, cos, sin, cache, mask, accepted, k, sampling, generator)
        # The one host sync of the step: accepted counts, the drafts they cover and the new token.
        packed = torch.cat([accepted[:, None], y[:, None]] + ([old_drafts] if k > 1 else []), 1).tolist()
        # Commit y and the accepted drafts; the other slots are rolled back. Finished sequences stay put.
        cache.advance((accepted + 1) * active_dev, [row[0] + 1 if on else 0 for row, on in zip(packed, active)])
        stats.forwards += 1
        emitted, was_active = 0, list(active)
        for s, row in enumerate(packed):
            if not was_active[s]:
                continue
            a = row[0]
            stats.seq_forwards += 1
            if k > 1:
                stats.verify_steps += 1
                for i in range(min(a + 1, k - 1)):
                    stats.proposed[i] += 1
                for i in range(a):
                    stats.accepted[i] += 1
            emitted += emit(s, row[2: 2 + a] + [row[1]])
        stats.tokens += emitted
        bar.update(emitted)
        if stats.forwards % 8 == 0:
            bar.set_postfix(tok_per_fwd=f"{stats.tokens_per_forward:.2f}", refresh=False)
        if active != was_active:
            active_dev = torch.tensor([int(x) for x in active], dtype=torch.long, device=device)
    stats.wall_s = time.perf_counter() - t0
    bar.close()
    return GenerationOutput(tokens=outputs, stats=stats, finished_by_eod=by_eod)
