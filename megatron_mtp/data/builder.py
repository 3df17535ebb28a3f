"""Top-level dataset construction: ``data.paths`` + split + sample counts -> train/valid/test datasets.

``paths`` takes Megatron's ``--data-path`` forms: a weighted blend ``[w1, p1, w2, p2, ...]`` or the same as
one string ``"w1 p1 w2 p2"``, or prefixes without weights (``[p1, p2]`` or ``"p1 p2"``), which are blended in
proportion to their sizes (tokens in each split), as Megatron does for an unweighted list. Every prefix is
split into train/valid/test by contiguous document ranges (ratios such as ``"969,30,1"``); each split of
the blend draws from the same split of every prefix.
"""
from __future__ import annotations

import json
import os
from typing import Optional, Sequence

import numpy as np

from megatron_mtp.data.blended_dataset import BlendedDataset, blending_indices, normalize_weights
from megatron_mtp.data.errors import DataError
from megatron_mtp.data.gpt_dataset import GPTDataset
from megatron_mtp.io_utils import atomic_write_text
from megatron_mtp.data.indexed_dataset import IndexedDataset, data_path

SPLIT_NAMES = ("train", "valid", "test")


def _is_number(value) -> bool:
    if isinstance(value, bool):
        return False
    try:
        float(value)
    except (TypeError, ValueError):
        return False
    return True


def parse_blend(paths) -> tuple[Optional[list[float]], list[str]]:
    """Megatron's blend forms -> ``(weights, prefixes)``; weights None means "in proportion to size".

    Strings are split at whitespace first, so ``"0.7 a 0.3 b"`` (one string, as Megatron's command line
    takes it) and ``[0.7, "a", 0.3, "b"]`` are the same blend.
    """
    items = []
    for entry in ([paths] if isinstance(paths, str) else list(paths)):
        items += entry.split() if isinstance(entry, str) else [entry]
    if not items:
        raise DataError("data.paths is empty; give [prefix], [prefix1, prefix2, ...] or [weight1, prefix1, "
                        "weight2, prefix2, ...]")
    numeric = [_is_number(item) for item in items]
    if not any(numeric):
        return (None if len(items) > 1 else [1.0]), [str(item) for item in items]
    if len(items) % 2:
        raise DataError(f"data.paths must alternate weight and prefix, got an odd number of entries: {items}")
    weights, prefixes = [], []
    for weight, prefix in zip(items[0::2], items[1::2]):
        if not _is_number(weight):
            raise DataError(f"data.paths must alternate weight and prefix, but {weight!r} (before {prefix!r}) "
                            f"is not a number; or give prefixes only, to blend them by size")
        if _is_number(prefix):
            raise DataError(f"data.paths must alternate weight and prefix, but {prefix!r} (after weight {weight!r}) "
                            f"is a number, not a dataset prefix")
        weights.append(float(weight))
        prefixes.append(str(prefix))
    normalize_weights(weights)  # validates
    return weights, prefixes


def blend_as_list(paths) -> list:
    """Any blend form -> the flat ``[w1, p1, w2, p2, ...]`` list, or the prefixes alone when unweighted."""
    weights, prefixes = parse_blend(paths)
    if weights is None:
        return prefixes
    return [item for pair in zip(weights, prefixes) for item in pair]


def parse_split(split: str) -> list[float]:
    """``"969,30,1"`` -> normalised [train, valid, test] ratios (missing entries are 0)."""
    try:
        ratios = [float(part) for part in str(split).replace("/", ",").split(",")]
    except ValueError:
        raise DataError(f"data split {split!r} must be comma-separated numbers such as '969,30,1'") from None
    if len(ratios) > 3 or any(r < 0 for r in ratios) or sum(ratios) <= 0:
        raise DataError(f"data split {split!r} must be up to three non-negative numbers with a positive sum, e.g. '969,30,1'")
    ratios += [0.0] * (3 - len(ratios))
    total = sum(ratios)
    return [r / total for r in ratios]


def split_document_ranges(num_documents: int, ratios: Sequence[float]) -> list[tuple[int, int]]:
    """Contiguous ``[begin, end)`` document ranges, rounded as Megatron rounds them, covering all documents."""
    bounds = [0]
    for ratio in ratios:
        bounds.append(bounds[-1] + int(round(ratio * num_documents)))
    excess = bounds[-1] - num_documents
    bounds = [bounds[0]] + [b - excess for b in bounds[1:]]
    return [(bounds[i], bounds[i + 1]) for i in range(len(ratios))]


def max_token_id(dataset: IndexedDataset, cache_dir: Optional[str]) -> int:
    """Largest token id in the dataset's .bin, cached next to the sampling indices."""
    if cache_dir is None:
        return dataset.max_token()
    stat = os.stat(data_path(dataset.path_prefix))
    key = f"{dataset.fingerprint()}-{stat.st_size}-{stat.st_mtime_ns}"
    path = os.path.join(cache_dir, f"max-token-{key}.json")
    if os.path.isfile(path):
        try:
            with open(path) as stream:
                return int(json.load(stream)["max_token"])
        except (ValueError, KeyError, OSError):
            pass
    value = dataset.max_token()
    os.makedirs(cache_dir, exist_ok=True)
    atomic_write_text(path, json.dumps({"prefix": dataset.path_prefix, "max_token": value}))
    return value


def check_vocab(dataset: IndexedDataset, vocab_size: int, cache_dir: Optional[str]) -> None:
    largest = max_token_id(dataset, cache_dir)
    if largest >= vocab_size:
        raise DataError(
            f"{dataset.path_prefix}.bin holds token id {largest} but the model's vocab_size is {vocab_size}: "
            f"preprocess it with the model's tokenizer, or set the vocab size to at least {largest + 1}"
        )


def build_datasets(
    paths: list,
    seq_length: int,
    split: str,
    seed: int,
    num_samples: tuple[int, int, int],
    cache_dir: Optional[str],
    vocab_size: Optional[int] = None,
):
    """Return ``(train, valid, test)``; each yields int64 arrays of ``seq_length + 1`` tokens, or is None
    when its split ratio or its sample count is 0."""
    weights, prefixes = parse_blend(paths)
    ratios = parse_split(split)
    if len(num_samples) != 3 or any(int(n) < 0 for n in num_samples):
        raise DataError(f"num_samples must be three non-negative counts (train, valid, test), got {num_samples}")
    indexed = [IndexedDataset(prefix) for prefix in prefixes]
    if vocab_size is not None:
        for dataset in indexed:
            check_vocab(dataset, vocab_size, cache_dir)
    ranges = [split_document_ranges(dataset.document_count, ratios) for dataset in indexed]

    result = []
    for split_id, name in enumerate(SPLIT_NAMES):
        wanted = int(num_samples[split_id])
        if ratios[split_id] == 0 or wanted == 0:
            result.append(None)
            continue
        for dataset, split_ranges in zip(indexed, ranges):
            begin, end = split_ranges[split_id]
            if end <= begin:
                raise DataError(
                    f"the {name} split of {dataset.path_prefix} is empty ({dataset.document_count} documents, "
                    f"split {split!r}); use a larger corpus or set that split's ratio to 0"
                )
        if len(indexed) == 1:
            result.append(GPTDataset(indexed[0], ranges[0][split_id], wanted, seq_length, seed, name, cache_dir))
            continue
        split_weights = weights
        if split_weights is None:  # Megatron's unweighted list: each prefix in proportion to its size
            split_weights = [float(dataset.sequence_lengths[dataset.document_indices[begin]:
                                                            dataset.document_indices[end]].sum(dtype=np.int64))
                             for dataset, (begin, end) in ((d, r[split_id]) for d, r in zip(indexed, ranges))]
        dataset_index, dataset_sample_index = blending_indices(split_weights, wanted, cache_dir, name)
        needed = np.bincount(dataset_index, minlength=len(indexed))
        components = [
            # A component the blend never draws from still gets a 1-sample dataset, so indices stay aligned.
            GPTDataset(dataset, split_ranges[split_id], max(int(count), 1), seq_length, seed, f"{name}-{i}", cache_dir)
            for i, (dataset, split_ranges, count) in enumerate(zip(indexed, ranges, needed))
        ]
        result.append(BlendedDataset(components, dataset_index, dataset_sample_index))
    return tuple(result)
