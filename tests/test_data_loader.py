"""Data-parallel micro-batches: rank slices, resumption from consumed_samples, exhaustion."""
import numpy as np
import pytest
import torch

from megatron_mtp.data.errors import DataError
from megatron_mtp.data.loader import MicroBatchIterator

SEQ = 4


class NumberedSamples:
    """Sample i is [i, i, ..., i]: batches show exactly which global samples they hold."""

    def __init__(self, n):
        self.n = n

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        if not 0 <= i < self.n:
            raise IndexError(i)
        return np.full(SEQ + 1, i, dtype=np.int64)


def sample_ids(batch):
    return batch[:, 0].tolist()


def test_rank_slices_are_disjoint_and_cover_the_global_batch():
    dataset, mbs, dp = NumberedSamples(1000), 3, 4
    iterators = [MicroBatchIterator(dataset, mbs, rank, dp) for rank in range(dp)]
    for step in range(5):
        batches = [next(it) for it in iterators]
        assert all(b.dtype == torch.long and b.shape == (mbs, SEQ + 1) for b in batches)
        ids = [sample_ids(b) for b in batches]
        assert sum(ids, []) == list(range(step * mbs * dp, (step + 1) * mbs * dp))
        assert all(ids[r] == list(range(step * 12 + r * mbs, step * 12 + (r + 1) * mbs)) for r in range(dp))
    assert all(it.consumed_samples == 5 * mbs * dp for it in iterators)


def test_resume_from_consumed_samples_replays_the_same_stream():
    dataset = NumberedSamples(1000)
    uninterrupted = MicroBatchIterator(dataset, 2, 1, 3)
    reference = [sample_ids(next(uninterrupted)) for _ in range(7)]
    first = MicroBatchIterator(dataset, 2, 1, 3)
    seen = [sample_ids(next(first)) for _ in range(3)]
    checkpoint = first.state_dict()
    resumed = MicroBatchIterator(dataset, 2, 1, 3, consumed_samples=checkpoint["consumed_samples"])
    seen += [sample_ids(next(resumed)) for _ in range(4)]
    assert seen == reference


def test_resume_with_real_dataset_is_identical(tmp_path):
    from megatron_mtp.data.builder import build_datasets
    from megatron_mtp.data.indexed_dataset import IndexedDatasetBuilder

    with IndexedDatasetBuilder(str(tmp_path / "c"), np.uint16) as builder:
        for doc in np.split(np.arange(3000) % 250, [100, 700, 1200, 2000]):
            builder.add_document(doc)
        builder.finalize()
    train, _, _ = build_datasets([str(tmp_path / "c")], SEQ, "1,0,0", 1, (200, 0, 0), str(tmp_path / "cache"))
    full = [next(MicroBatchIterator(train, 2, 0, 2, consumed_samples=k * 4)) for k in range(10)]
    it = MicroBatchIterator(train, 2, 0, 2)
    straight = [next(it) for _ in range(10)]
    assert all(torch.equal(a, b) for a, b in zip(full, straight))


def test_exhaustion_and_bad_layouts_are_clear():
    it = MicroBatchIterator(NumberedSamples(10), 2, 0, 2)
    next(it), next(it)
    with pytest.raises(DataError, match="exhausted: it holds 10 samples and 8 were consumed"):
        next(it)
    with pytest.raises(DataError, match="not a multiple"):
        MicroBatchIterator(NumberedSamples(10), 2, 0, 2, consumed_samples=3)
    with pytest.raises(DataError, match="invalid data-parallel"):
        MicroBatchIterator(NumberedSamples(10), 2, 2, 2)
