"""Turning logits into next tokens: greedy, or sampling with temperature, top-k and top-p (nucleus).

Everything is batched over leading dimensions and vectorised over the vocabulary (no Python loops over
tokens). ``probabilities`` is the one place the filters are applied, so the target distribution p (head 1)
and the draft distribution q (heads 2..k) of speculative sampling are processed identically.
Sampling draws with an explicit ``torch.Generator`` (reproducible; no host sync: the exponential-race
trick argmax(p / E), E ~ Exp(1), samples from p).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch

from megatron_mtp.errors import InputError


@dataclass
class SamplingParams:
    greedy: bool = True
    temperature: float = 1.0
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1.0 = off

    def __post_init__(self):
        self.validate()

    def validate(self) -> None:
        """Range checks, one sentence each (NaN fails every comparison, so each test is written to pass
        only for valid values)."""
        if self.greedy:
            return
        if not (math.isfinite(self.temperature) and self.temperature > 0):
            raise InputError(f"temperature must be a positive finite number for sampling, got {self.temperature}; "
                             f"use greedy decoding for temperature 0.")
        if not (0.0 < self.top_p <= 1.0):
            raise InputError(f"top_p must lie in (0, 1], got {self.top_p}.")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 0:
            raise InputError(f"top_k must be a non-negative integer (0 = off), got {self.top_k}.")

    def describe(self) -> str:
        if self.greedy:
            return "greedy"
        return f"sampling (temperature {self.temperature}, top-k {self.top_k or 'off'}, top-p {self.top_p})"


def probabilities(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """[..., V] logits -> [..., V] float32 probabilities after temperature, top-k and top-p."""
    x = logits.float() / params.temperature
    vocab = x.size(-1)
    if params.top_k and params.top_k < vocab:
        kth = torch.topk(x, params.top_k, dim=-1).values[..., -1:]
        x = x.masked_fill(x < kth, float("-inf"))
    probs = torch.softmax(x, dim=-1)
    if params.top_p < 1.0:
        sorted_p, order = torch.sort(probs, dim=-1, descending=True)
        # Keep the smallest prefix whose mass reaches top_p: a token stays if the mass before it is < top_p.
        before = torch.cumsum(sorted_p, dim=-1) - sorted_p
        keep_sorted = before < params.top_p
        keep = torch.zeros_like(keep_sorted).scatter(-1, order, keep_sorted)
        probs = probs * keep
        probs = probs / probs.sum(-1, keepdim=True)
    return probs


def sample(probs: torch.Tensor, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """One token per row of ``probs`` [..., V] -> [...] (int64), exactly distributed as the row."""
    e = torch.empty_like(probs).exponential_(generator=generator).clamp_(min=1e-30)
    return (probs / e).argmax(dim=-1)


def next_tokens(logits: torch.Tensor, params: SamplingParams, generator: Optional[torch.Generator] = None) -> tuple:
    """(tokens [...], probabilities [..., V] or None under greedy) for logits [..., V]."""
    if params.greedy:
        return logits.argmax(dim=-1), None
    probs = probabilities(logits, params)
    return sample(probs, generator), probs
