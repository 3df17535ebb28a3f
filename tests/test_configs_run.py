"""Every config under configs/ starts as written: its tokenizer, vocabulary and data resolve (no training)."""
import glob
import os

import numpy as np
import pytest

from megatron_mtp.config import load_config, validate_layout
from megatron_mtp.data.builder import build_datasets, check_vocab, parse_blend
from megatron_mtp.data.indexed_dataset import IndexedDataset
from megatron_mtp.data.pipeline import check_data_tokenizers, prepare_data_config, resolve_paths

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = sorted(glob.glob(os.path.join(REPO, "configs", "*.yaml")))


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("data_cache"))


@pytest.mark.parametrize("path", CONFIGS, ids=[os.path.basename(p) for p in CONFIGS])
def test_config_data_resolves_as_written(path, cache_dir):
    cfg = load_config(path, ["--data.cache_dir", cache_dir])
    tokenizer = prepare_data_config(cfg)
    assert cfg.model.vocab_size >= tokenizer.vocab_size
    validate_layout(cfg, cfg.parallel.tp * cfg.parallel.pp)  # one data-parallel replica of its own layout
    paths = resolve_paths(cfg, cache_dir, is_builder=True)
    prefixes = parse_blend(paths)[1]
    check_data_tokenizers(prefixes, tokenizer, warn=False)
    for prefix in prefixes:
        check_vocab(IndexedDataset(prefix), cfg.model.vocab_size, None)
    # A few samples of the config's own length and split: the corpus is long enough for its sequences.
    train, valid, _ = build_datasets(paths, cfg.data.seq_length, cfg.data.split, cfg.train.seed, (4, 2, 0),
                                     os.path.join(cache_dir, "index"), vocab_size=cfg.model.vocab_size)
    assert train[0].shape == (cfg.data.seq_length + 1,) and int(np.max(train[3])) < tokenizer.vocab_size
