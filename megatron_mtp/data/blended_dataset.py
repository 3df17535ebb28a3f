"""Blending several datasets by weight, with Megatron's largest-error-first schedule.

At each sample the blend picks the dataset whose achieved count lags its target share the most
(``weight * samples_so_far - count``), so after any prefix of n samples each dataset's count is
within about one sample of ``weight * n``: the proportions hold at every step, not only on average.
"""
from __future__ import annotations

from typing import Optional, Sequence

import numpy as np

from megatron_mtp.data.errors import DataError
from megatron_mtp.data.index_cache import cached_arrays


def normalize_weights(weights: Sequence[float]) -> np.ndarray:
    weights = np.asarray(weights, dtype=np.float64)
    if len(weights) == 0 or np.any(~np.isfinite(weights)) or np.any(weights < 0) or weights.sum() <= 0:
        raise DataError(f"blend weights must be non-negative numbers with a positive sum, got {list(weights)}")
    return weights / weights.sum()


def build_blending_indices(weights: Sequence[float], num_samples: int) -> tuple[np.ndarray, np.ndarray]:
    """Return ``(dataset_index, dataset_sample_index)``: sample i is sample ``dataset_sample_index[i]``
    of dataset ``dataset_index[i]``.

    The schedule is inherently sequential (each pick depends on all earlier ones); it is a tight loop
    over plain Python floats, under a microsecond per sample for a few datasets, and the result is cached on disk.
    """
    weights = [float(w) for w in normalize_weights(weights)]
    counts = [0] * len(weights)
    # Python lists, not numpy, inside the loop: element access on lists is several times faster.
    chosen = [0] * num_samples
    within = [0] * num_samples
    others = range(1, len(weights))
    for i in range(num_samples):
        drawn = i if i > 1 else 1  # Megatron's convention: sample 0 is scored as if one had been drawn
        best, best_error = 0, weights[0] * drawn - counts[0]
        for d in others:
            error = weights[d] * drawn - counts[d]
            if error > best_error:  # strict: ties go to the first dataset, as in Megatron
                best, best_error = d, error
        chosen[i] = best
        within[i] = counts[best]
        counts[best] += 1
    dataset_index = np.array(chosen, dtype=np.int16)
    dataset_sample_index = np.array(within, dtype=np.int64)
    return dataset_index, dataset_sample_index


class BlendedDataset:
    """Samples drawn from ``datasets`` in the proportions of ``weights``; ``len`` is ``num_samples``.

    Build the blending indices first (``blending_indices``) to know how many samples each component
    dataset must provide; ``build_datasets`` does that.
    """

    def __init__(self, datasets: Sequence, dataset_index: np.ndarray, dataset_sample_index: np.ndarray):
        self.datasets = list(datasets)
        self.dataset_index = dataset_index
        self.dataset_sample_index = dataset_sample_index
        needed = np.bincount(dataset_index, minlength=len(self.datasets))
        for dataset, count in zip(self.datasets, needed):
            if count > len(dataset):
                raise DataError(f"the blend needs {count} samples from {dataset} but it only has {len(dataset)}")

    def __len__(self) -> int:
        return len(self.dataset_index)

    @property
    def seq_length(self) -> int:
        return self.datasets[0].seq_length

    def __getitem__(self, idx: int) -> np.ndarray:
        dataset = self.datasets[int(self.dataset_index[idx])]
        return dataset[int(self.dataset_sample_index[idx])]

    def __repr__(self) -> str:
        return f"BlendedDataset({len(self.datasets)} datasets, samples={len(self)})"


def blending_indices(weights: Sequence[float], num_samples: int, cache_dir: Optional[str], name: str):
    """``build_blending_indices``, cached under ``cache_dir`` by weights and size."""
    normalized = normalize_weights(weights)
    description = {"class": "BlendedDataset", "weights": [float(w) for w in normalized], "num_samples": num_samples}
    return cached_arrays(
        cache_dir,
        f"blend-{name}",
        description,
        ("dataset_index", "dataset_sample_index"),
        lambda: build_blending_indices(normalized, num_samples),
    )
