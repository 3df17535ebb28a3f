"""From the config to the training and validation micro-batch iterators.

``data.paths`` empty means the embedded default corpus: the Python standard library's source files on this
machine, tokenised once (with the run's tokenizer, byte level by default) into ``.bin/.idx`` under the cache
directory. Rank 0 builds shared files (corpus, sample indexes) first; the other ranks wait at a barrier and
then read the cache. Every prefix's tokenizer record must match the run's tokenizer.
"""
from __future__ import annotations

import os

import numpy as np
import torch.distributed as dist

from megatron_mtp.data.builder import (blend_as_list, build_datasets, parse_blend, parse_split,
                                       split_document_ranges)
from megatron_mtp.data.code_corpus import ensure_stdlib_corpus
from megatron_mtp.data.errors import DataError
from megatron_mtp.data.indexed_dataset import IndexedDataset
from megatron_mtp.data.loader import MicroBatchIterator
from megatron_mtp.data.tokenizers import (build_tokenizer, check_data_tokenizer, locate_tokenizer_model,
                                          resolve_config_tokenizer)


def default_cache_dir(cfg) -> str:
    return cfg.data.cache_dir or os.environ.get("MTP_DATA_CACHE") or os.path.join(
        os.path.expanduser("~"), ".cache", "megatron_mtp")


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def default_corpus(cfg, cache_dir: str, is_builder: bool) -> dict:
    """The embedded stdlib corpus tokenised with the config's tokenizer (built once, by the builder rank)."""
    model = locate_tokenizer_model(cfg.data.tokenizer_model, cfg.train.run_dir)
    kwargs = dict(tokenizer_type=cfg.data.tokenizer_type, tokenizer_model=model,
                  # BPE is CPU-bound (about a CPU-second per MB); bytes are not worth a worker pool.
                  workers=1 if not model else max(1, min(8, (os.cpu_count() or 1))))
    if is_builder:
        ensure_stdlib_corpus(cache_dir, **kwargs)
    _barrier()
    return ensure_stdlib_corpus(cache_dir, **kwargs)


def resolve_paths(cfg, cache_dir: str, is_builder: bool) -> list:
    """``data.paths`` as a flat blend list (``[w1, p1, ...]``, or prefixes alone when unweighted); the stdlib
    corpus when empty."""
    if not cfg.data.paths:
        return [default_corpus(cfg, cache_dir, is_builder)["train_prefix"]]
    return blend_as_list(cfg.data.paths)


def prepare_data_config(cfg):
    """Settle what the data decides in the config before a run writes anything: the tokenizer (type and
    ``model.vocab_size``, see ``resolve_config_tokenizer``) and the blend's form. Returns the tokenizer."""
    cfg.data.tokenizer_model = locate_tokenizer_model(cfg.data.tokenizer_model, cfg.train.run_dir)
    tokenizer = resolve_config_tokenizer(cfg)
    if cfg.data.paths:
        # Absolute prefixes: the run's config.yaml then names its data from any working directory (evaluation).
        weights, prefixes = parse_blend(cfg.data.paths)
        prefixes = [os.path.abspath(prefix) for prefix in prefixes]
        cfg.data.paths = prefixes if weights is None else [x for pair in zip(weights, prefixes) for x in pair]
        check_data_tokenizers(prefixes, tokenizer, warn=False)  # a mix-up stops the run before it writes
    return tokenizer


def validation_split(cfg, seq_length: int, max_samples: int):
    """(windows, description) to score a trained run on: its validation split. ``cfg`` is a loaded run's config
    (its tokenizer path already located, see ``checkpoint.merge.locate_run_tokenizer``).

    With ``data.paths`` that is the valid share (``data.split``) of every prefix, blended as in training,
    at most one epoch of it; with the embedded corpus, its held-out files (never trained on).
    """
    cache_dir = default_cache_dir(cfg)
    if not cfg.data.paths:
        prefix = default_corpus(cfg, cache_dir, is_builder=True)["heldout_prefix"]
        paths, split, description = [prefix], "0,1,0", f"{prefix} (the embedded corpus's held-out files)"
    else:
        paths, split = cfg.data.paths, cfg.data.split
        description = f"the validation split ({split}) of {' '.join(str(p) for p in paths)}"
    ratios = parse_split(split)
    if ratios[1] == 0:
        raise DataError(f"the run has no validation split (data.split {split!r}); pass --data PREFIX")
    available = 0
    for prefix in parse_blend(paths)[1]:
        dataset = IndexedDataset(prefix)
        begin, end = split_document_ranges(dataset.document_count, ratios)[1]
        bounds = dataset.document_indices
        tokens = int(dataset.sequence_lengths[bounds[begin]:bounds[end]].sum(dtype=np.int64))
        available += max(0, (tokens - 1) // seq_length)
    if available < 1:
        raise DataError(f"{description} holds too few tokens for one window of {seq_length + 1}; lower --seq-length "
                        f"or pass --data PREFIX")
    samples = min(available, max_samples) if max_samples else available
    _, valid, _ = build_datasets(paths, seq_length, split, cfg.train.seed, (0, samples, 0),
                                 os.path.join(cache_dir, "index"))
    return valid, description


def check_data_tokenizers(prefixes, tokenizer, warn: bool) -> None:
    """Refuse data a different tokenizer made; say once which prefixes carry no record to check."""
    present = [prefix for prefix in prefixes if os.path.isfile(f"{prefix}.idx")]  # a missing one fails later, named
    unchecked = [prefix for prefix in present if not check_data_tokenizer(prefix, tokenizer)]
    if unchecked and warn:
        print(f"WARNING: {', '.join(unchecked)} carry no tokenizer record (made by Megatron-LM or an older "
              f"megatron_mtp): only their largest token id is checked against model.vocab_size.", flush=True)


def build_train_iterators(cfg, dp_rank: int, dp_size: int, is_builder: bool, tokenizer=None) -> tuple:
    """(train iterator, validation iterator or None) yielding [micro_batch, seq_length + 1] int64 batches.

    ``tokenizer`` (the run's) is checked against every prefix's tokenizer record; None builds it from the config.
    """
    t = cfg.train
    cache_dir = default_cache_dir(cfg)
    paths = resolve_paths(cfg, cache_dir, is_builder)
    if tokenizer is None:
        tokenizer = build_tokenizer(cfg.data.tokenizer_type,
                                    locate_tokenizer_model(cfg.data.tokenizer_model, cfg.train.run_dir))
    check_data_tokenizers(parse_blend(paths)[1], tokenizer, warn=is_builder)
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
