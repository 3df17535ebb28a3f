"""Blending by weight: proportions, Megatron's largest-error-first order, and build_datasets with a blend."""
import numpy as np
import pytest

from megatron_mtp.data.blended_dataset import build_blending_indices
from megatron_mtp.data.builder import build_datasets, parse_blend
from megatron_mtp.data.errors import DataError
from megatron_mtp.data.indexed_dataset import IndexedDataset, IndexedDatasetBuilder

SEQ = 8


def corpus(prefix, first_token, num_docs=30):
    """Documents whose tokens lie in [first_token, first_token + 1000): a sample tells its source."""
    rng = np.random.default_rng(first_token)
    with IndexedDatasetBuilder(str(prefix), np.uint16) as builder:
        for _ in range(num_docs):
            builder.add_document(first_token + rng.integers(0, 1000, rng.integers(5, 60)))
        builder.finalize()
    return str(prefix)


def test_largest_error_first_order():
    dataset_index, sample_index = build_blending_indices([1, 3], 8)
    # Worked by hand from Megatron's rule: error_d = w_d * max(i, 1) - count_d, largest error wins,
    # ties go to the first dataset (at i=4 both errors are exactly 0).
    assert dataset_index.tolist() == [1, 0, 1, 1, 0, 1, 1, 1]
    assert sample_index.tolist() == [0, 0, 1, 2, 1, 3, 4, 5]


def test_proportions_hold_at_every_prefix():
    weights = np.array([0.2, 0.3, 0.5])
    dataset_index, _ = build_blending_indices(weights, 10_000)
    counts = np.cumsum(np.eye(3)[dataset_index], axis=0)
    expected = np.arange(1, 10_001)[:, None] * weights
    assert np.abs(counts - expected).max() <= 1.5  # never more than about one sample behind


def test_blended_datasets_draw_in_proportion(tmp_path):
    prefixes = [corpus(tmp_path / f"c{i}", 1000 * i) for i in range(3)]
    paths = [0.2, prefixes[0], "0.3", prefixes[1], 0.5, prefixes[2]]  # weights may be strings (YAML)
    train, valid, _ = build_datasets(paths, SEQ, "9,1,0", seed=5, num_samples=(10_000, 200, 0),
                                     cache_dir=str(tmp_path / "cache"))
    assert len(train) == 10_000
    sources = np.array([int(train[i][0]) // 1000 for i in range(len(train))])
    shares = np.bincount(sources, minlength=3) / len(sources)
    assert np.allclose(shares, [0.2, 0.3, 0.5], atol=0.01)
    assert all(len(set((train[i] // 1000).tolist())) == 1 for i in range(0, 10_000, 97))  # no mixing
    assert valid is not None and len(valid) == 200

    again, _, _ = build_datasets(paths, SEQ, "9,1,0", 5, (10_000, 200, 0), str(tmp_path / "cache"))
    assert all(np.array_equal(train[i], again[i]) for i in range(0, 10_000, 13))


def test_blend_list_format_errors():
    assert parse_blend(["only/prefix"]) == ([1.0], ["only/prefix"])
    with pytest.raises(DataError, match="odd number"):
        parse_blend([0.5, "a", 0.5])
    with pytest.raises(DataError, match="is not a number"):
        parse_blend(["a", 0.5, "b", 0.5])
    with pytest.raises(DataError, match="is a number, not a dataset prefix"):
        parse_blend([0.5, 0.5])
    with pytest.raises(DataError, match="empty"):
        parse_blend([])
    with pytest.raises(DataError, match="non-negative"):
        parse_blend([-1, "a", 2, "b"])


def test_megatron_blend_forms(tmp_path):
    """Megatron's --data-path forms: one "w1 p1 w2 p2" string, and prefixes without weights (by size)."""
    from megatron_mtp.config import load_config

    prefixes = [corpus(tmp_path / f"c{i}", 1000 * i, num_docs=n) for i, n in enumerate((20, 60))]
    text = f"0.25 {prefixes[0]} 0.75 {prefixes[1]}"
    assert parse_blend(text) == parse_blend([text]) == parse_blend([0.25, prefixes[0], 0.75, prefixes[1]])
    cfg = load_config(None, ["--data.paths", text])  # the string as the command line takes it
    assert parse_blend(cfg.data.paths) == ([0.25, 0.75], prefixes)
    assert parse_blend(f"{prefixes[0]} {prefixes[1]}") == parse_blend(prefixes) == (None, prefixes)

    train, _, _ = build_datasets(prefixes, SEQ, "1,0,0", seed=1, num_samples=(4000, 0, 0),
                                 cache_dir=str(tmp_path / "cache"))
    sizes = np.array([IndexedDataset(p).sequence_lengths.sum() for p in prefixes], dtype=float)
    sources = np.array([int(train[i][0]) // 1000 for i in range(len(train))])
    shares = np.bincount(sources, minlength=2) / len(sources)
    assert np.allclose(shares, sizes / sizes.sum(), atol=0.01), (shares, sizes / sizes.sum())
