"""Packing, shuffling, caching and splitting of GPT samples, and the top-level builder's checks."""
import os
import time

import numpy as np
import pytest

from megatron_mtp.data.builder import build_datasets, parse_split, split_document_ranges
from megatron_mtp.data.errors import DataError
from megatron_mtp.data.gpt_dataset import GPTDataset, build_sample_indices
from megatron_mtp.data.indexed_dataset import IndexedDataset, IndexedDatasetBuilder

SEQ = 16


def unique_token_corpus(prefix, num_docs=40, seed=0, first_token=0):
    """Documents of random lengths whose tokens are all distinct, so each can be traced in samples."""
    lengths = np.random.default_rng(seed).integers(1, 120, num_docs)
    tokens = np.arange(first_token, first_token + lengths.sum())
    with IndexedDatasetBuilder(str(prefix), np.int32) as builder:
        for doc in np.split(tokens, np.cumsum(lengths)[:-1]):
            builder.add_document(doc)
        builder.finalize()
    return str(prefix), tokens


def all_samples(dataset):
    return [dataset[i] for i in range(len(dataset))]


def test_one_epoch_covers_every_token_once(tmp_path):
    prefix, tokens = unique_token_corpus(tmp_path / "c")
    num_samples = (len(tokens) - 1) // SEQ  # exactly one epoch
    dataset = GPTDataset(IndexedDataset(prefix), (0, 40), num_samples, SEQ, seed=1)
    samples = all_samples(dataset)
    assert all(s.dtype == np.int64 and s.shape == (SEQ + 1,) for s in samples)
    seen = np.concatenate([s[:-1] for s in samples])  # the last token is the next sample's first
    assert len(np.unique(seen)) == len(seen) == num_samples * SEQ
    assert len(tokens) - len(seen) <= SEQ  # only the final partial sample's tokens are unused

    # In stream order each sample's last token is the next sample's first (Megatron's overlap).
    stream = [samples[i] for i in np.argsort(dataset.shuffle_index)]
    assert all(a[-1] == b[0] for a, b in zip(stream, stream[1:]))


def test_documents_shuffled_within_each_epoch(tmp_path):
    prefix, tokens = unique_token_corpus(tmp_path / "c")
    epochs = 3
    num_samples = (epochs * len(tokens) - 1) // SEQ
    dataset = GPTDataset(IndexedDataset(prefix), (0, 40), num_samples, SEQ, seed=3)
    order = np.asarray(dataset.document_index).reshape(epochs, 40)
    assert all(sorted(row) == list(range(40)) for row in order)  # each epoch: every document once
    assert len({tuple(row) for row in order}) == epochs  # ... in a fresh order
    counts = np.bincount(np.concatenate([s[:-1] for s in all_samples(dataset)]), minlength=len(tokens))
    assert counts.max() == epochs and counts.min() >= epochs - 1
    # Samples are served epoch by epoch: the first epoch's worth repeats no token, except for the
    # one sample that runs from the end of epoch 1 into the start of epoch 2.
    first_epoch = np.concatenate([dataset[i][:-1] for i in range(len(tokens) // SEQ)])
    assert (np.bincount(first_epoch) > 1).sum() <= SEQ


def test_same_seed_same_samples_and_cache_reuse(tmp_path):
    prefix, _ = unique_token_corpus(tmp_path / "c")
    cache = str(tmp_path / "cache")
    fresh = GPTDataset(IndexedDataset(prefix), (0, 40), 200, SEQ, seed=7, cache_dir=cache)
    files = sorted(os.listdir(cache))
    assert sum(name.endswith(".npy") for name in files) == 3
    cached = GPTDataset(IndexedDataset(prefix), (0, 40), 200, SEQ, seed=7, cache_dir=cache)
    assert isinstance(cached.sample_index, np.memmap)  # loaded, not rebuilt
    in_memory = GPTDataset(IndexedDataset(prefix), (0, 40), 200, SEQ, seed=7)
    for i in range(200):
        assert np.array_equal(fresh[i], cached[i]) and np.array_equal(fresh[i], in_memory[i])
    other_seed = GPTDataset(IndexedDataset(prefix), (0, 40), 200, SEQ, seed=8, cache_dir=cache)
    assert not all(np.array_equal(fresh[i], other_seed[i]) for i in range(200))
    assert sorted(os.listdir(cache)) != files  # a different key, not an overwrite


def test_sample_index_scales_to_1e8_tokens():
    lengths = np.random.default_rng(0).integers(1, 4000, 100_000)  # ~2e8 tokens
    start = time.perf_counter()
    _, sample_index, shuffle_index = build_sample_indices(lengths, 100_000_000 // 2048, 2048, np.random.default_rng(0))
    assert time.perf_counter() - start < 10
    assert len(shuffle_index) == 100_000_000 // 2048 and sample_index.shape == (len(shuffle_index) + 1, 2)


def test_split_ratios():
    assert parse_split("969,30,1") == pytest.approx([0.969, 0.030, 0.001])
    assert parse_split("1") == [1.0, 0.0, 0.0]
    assert split_document_ranges(1000, parse_split("969,30,1")) == [(0, 969), (969, 999), (999, 1000)]
    assert split_document_ranges(10, parse_split("1,1,1"))[-1][1] == 10
    with pytest.raises(DataError, match="comma-separated"):
        parse_split("a,b")


def test_build_datasets_splits_documents(tmp_path):
    prefix, _ = unique_token_corpus(tmp_path / "c")
    train, valid, test = build_datasets([prefix], SEQ, "8,1,1", seed=0, num_samples=(50, 10, 10), cache_dir=None)
    assert (len(train), len(valid), len(test)) == (50, 10, 10)
    train_tokens = set(np.concatenate(all_samples(train)).tolist())
    valid_tokens = set(np.concatenate(all_samples(valid)).tolist())
    assert not train_tokens & valid_tokens  # splits are disjoint document ranges
    _, valid, test = build_datasets([prefix], SEQ, "1,0,0", 0, (5, 5, 5), None)
    assert valid is None and test is None
    _, valid, _ = build_datasets([prefix], SEQ, "9,1,0", 0, (5, 0, 0), None)
    assert valid is None


def test_token_ids_beyond_vocab_fail_early(tmp_path):
    prefix, tokens = unique_token_corpus(tmp_path / "c")
    cache = str(tmp_path / "cache")
    with pytest.raises(DataError, match=rf"holds token id {tokens.max()} but the model's vocab_size is 100"):
        build_datasets([prefix], SEQ, "1,0,0", 0, (5, 0, 0), cache, vocab_size=100)
    assert any(name.startswith("max-token") for name in os.listdir(cache))  # the max is cached
    build_datasets([prefix], SEQ, "1,0,0", 0, (5, 0, 0), cache, vocab_size=int(tokens.max()) + 1)


def test_empty_split_is_clear(tmp_path):
    prefix, _ = unique_token_corpus(tmp_path / "c", num_docs=3)
    with pytest.raises(DataError, match="valid split of .* is empty"):
        build_datasets([prefix], SEQ, "98,2,0", 0, (5, 5, 0), None)
