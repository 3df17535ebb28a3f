"""From the config to the training and validation micro-batch iterators.

``data.paths`` empty means the embedded default corpus: the Python standard library's source files on this
machine, tokenised once (byte level) into ``.bin/.idx`` under the cache directory. Rank 0 builds shared
files (corpus, sample indexes) first; the other ranks wait at a barrier and then read the cache.
"""
from __future__ import annotations

import os

import torch.distributed as dist

from megatron_mtp.data.errors import DataError


def default_cache_dir(cfg) -> str:
    return cfg.data.cache_dir or os.environ.get("MTP_DATA_CACHE") or os.path.join(
        os.path.expanduser("~"), ".cache", "megatron_mtp")


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def resolve_paths(cfg, cache_dir: str, is_builder: bool) -> list:
    """``data.paths`` as [weight, prefix, ...]; the stdlib corpus when empty."""
    from megatron_mtp.data.code_corpus import ensure_stdlib_corpus

    paths = list(cfg.data.paths)
    if not paths:
        if cfg.data.tokenizer_type != "byte":
            raise DataError("the embedded default corpus is byte-level: set data.tokenizer_type byte or give data.paths.")
        if is_builder:
            ensure_stdlib_corpus(cache_dir)
        _barrier()
        paths = [1.0, ensure_stdlib_corpus(cache_dir)["train_prefix"]]
    if len(paths) == 1:
        paths = [1.0, paths[0]]
    return paths


def build_train_iterators(cfg, dp_rank: int, dp_size: int, is_builder: bool) -> tuple:
    """(train iterator, validation iterator or None) yielding [micro_batch, seq_length + 1] int64 batches."""
    from megatron_mtp.data.builder import build_datasets
    from megatron_mtp.data.loader import MicroBatchIterator

    t = cfg.train
    cache_dir = default_cache_dir(cfg)
    paths = resolve_paths(cfg, cache_dir, is_builder)
    train_samples = max(1, t.iters) * t.global_batch_size
    evals = (t.iters // t.eval_interval + 1) if t.eval_interval else 0
    valid_samples = evals * t.eval_iters * t.micro_batch_size * dp_size
    index_cache = os.path.join(cache_dir, "index")
    kwargs = dict(paths=paths, seq_length=cfg.data.seq_length, split=cfg.data.split, seed=t.seed,
                  num_samples=(train_samples, valid_samples, 0), cache_dir=index_cache,
                  vocab_size=cfg.model.vocab_size)
    if is_builder:  # build and cache the sample indexes once, before the other ranks read them
        build_datasets(**kwargs)
    _barrier()
    train_ds, valid_ds, _ = build_datasets(**kwargs)
    train_iter = MicroBatchIterator(train_ds, t.micro_batch_size, dp_rank, dp_size)
    valid_iter = MicroBatchIterator(valid_ds, t.micro_batch_size, dp_rank, dp_size) if valid_ds is not None and valid_samples else None
    return train_iter, valid_iter
