"""Training under tensor parallelism follows the single-process run.

10 steps of ``megatron_mtp.training.loop.train`` (the local engine: TP only) on a tiny preprocessed dataset,
at TP=1 and at TP=2 without and with sequence parallelism (grouped-query attention with one KV group per
rank, 2 heads, 2 micro-batches of gradient accumulation, clipping and AdamW): the loss, every head's loss
and the grad norm in ``metrics.jsonl`` agree with TP=1's within 1e-4 at every step, float32 on CPU.
"""
import numpy as np
import torch

from dist_utils import run_distributed
from megatron_mtp.config import config_from_dict
from megatron_mtp.data.indexed_dataset import IndexedDatasetBuilder
from megatron_mtp.training.metrics import read_metrics

STEPS, VOCAB, TOL = 10, 100, 1e-4


def write_dataset(prefix: str) -> str:
    """Documents counting up from a random start with a stride of 1 to 3 (mod the vocabulary): learnable in
    a few steps, so the curves move and a wrong gradient would show."""
    rng = np.random.default_rng(0)
    with IndexedDatasetBuilder(prefix, np.uint16) as builder:
        for _ in range(60):
            start, stride, length = rng.integers(0, VOCAB), rng.integers(1, 4), rng.integers(20, 60)
            builder.add_document((start + stride * np.arange(length)) % VOCAB)
        builder.finalize()
    return prefix


def run_config(prefix: str, run_dir: str, cache_dir: str, tp: int, sequence_parallel: bool) -> dict:
    return {
        "model": {"vocab_size": VOCAB, "hidden_size": 64, "num_layers": 4, "num_attention_heads": 4,
                  "num_kv_heads": 2, "ffn_hidden_size": 128, "max_seq_length": 64,
                  "make_vocab_size_divisible_by": 8},
        "mtp": {"n_heads": 2},
        "parallel": {"tp": tp, "sequence_parallel": sequence_parallel},
        "data": {"paths": [prefix], "seq_length": 16, "split": "1,0,0", "cache_dir": cache_dir},
        "optimizer": {"lr": 3e-3, "min_lr": 3e-4, "warmup_iters": 2},
        "train": {"iters": STEPS, "micro_batch_size": 2, "grad_accum": 2, "seed": 1234, "run_dir": run_dir,
                  "device": "cpu", "dtype": "float32"},
        "logging": {"interval": 1, "tensorboard": False, "plot": False},
        "checkpoint": {"save": False},
    }


def _train_worker(rank, world_size, configs):
    from megatron_mtp.training.loop import train

    torch.set_num_threads(1)
    for config in configs:  # several runs share one process group (spawning costs seconds)
        train(config_from_dict(config))


def test_tp2_follows_tp1_loss_curve(tmp_path):
    prefix = write_dataset(str(tmp_path / "data" / "tiny"))
    cache = str(tmp_path / "cache")
    runs = {name: str(tmp_path / name) for name in ("tp1", "tp2", "tp2_sp")}
    run_distributed(_train_worker, 1, [run_config(prefix, runs["tp1"], cache, 1, False)])
    run_distributed(_train_worker, 2, [run_config(prefix, runs["tp2"], cache, 2, False),
                                       run_config(prefix, runs["tp2_sp"], cache, 2, True)])
    reference = read_metrics(runs["tp1"])
    assert [r["step"] for r in reference] == list(range(1, STEPS + 1))
    assert reference[-1]["loss"] < 0.95 * reference[0]["loss"]  # it learns (9.25 -> 8.42)
    for name in ("tp2", "tp2_sp"):
        records = read_metrics(runs[name])
        assert [r["step"] for r in records] == list(range(1, STEPS + 1)), name
        for ref, got in zip(reference, records):
            for key in ("loss", "loss_head_1", "loss_head_2"):
                assert abs(got[key] - ref[key]) <= TOL, (name, ref["step"], key, got[key], ref[key])
            assert abs(got["grad_norm"] - ref["grad_norm"]) <= TOL * ref["grad_norm"], (name, ref["step"])
