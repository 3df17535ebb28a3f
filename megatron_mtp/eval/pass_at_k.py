"""The unbiased pass@k estimator (Chen et al. 2021, "Evaluating Large Language Models Trained on Code").

With n samples of which c are correct, pass@k = 1 - C(n - c, k) / C(n, k): the probability that at least
one of k samples drawn without replacement from the n is correct. The binomials overflow quickly, so it
is computed as the product 1 - prod_{i = n-c+1}^{n} (1 - k / i), which is exact in exact arithmetic and
stable in floating point.
"""
from __future__ import annotations

from typing import Iterable, Sequence, Union

import numpy as np


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k for one problem with ``n`` samples, ``c`` of them correct (requires k <= n)."""
    if not 0 <= c <= n:
        raise ValueError(f"need 0 <= correct <= samples, got correct={c}, samples={n}.")
    if not 1 <= k <= n:
        raise ValueError(f"pass@{k} needs at least k={k} samples per problem, got {n}.")
    if n - c < k:  # every k-subset contains a correct sample
        return 1.0
    return float(1.0 - np.prod(1.0 - k / np.arange(n - c + 1, n + 1, dtype=np.float64)))


def estimate_pass_at_k(num_samples: Union[int, Sequence[int]], num_correct: Sequence[int], k: int) -> np.ndarray:
    """pass@k per problem; ``num_samples`` is one count for all problems or one per problem."""
    correct = list(num_correct)
    samples = [num_samples] * len(correct) if isinstance(num_samples, (int, np.integer)) else list(num_samples)
    if len(samples) != len(correct):
        raise ValueError(f"{len(samples)} sample counts for {len(correct)} problems.")
    return np.array([pass_at_k(int(n), int(c), k) for n, c in zip(samples, correct)])


def mean_pass_at_k(num_samples, num_correct, ks: Iterable[int]) -> dict:
    """{"pass@k": mean over problems} for every k not larger than the smallest sample count."""
    correct = list(num_correct)
    smallest = num_samples if isinstance(num_samples, (int, np.integer)) else min(num_samples)
    return {f"pass@{k}": float(estimate_pass_at_k(num_samples, correct, k).mean())
            for k in ks if k <= smallest}
