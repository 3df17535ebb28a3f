"""DeepSpeed layout runs shared by tests/test_deepspeed_engine.py and tests/test_pipeline.py: configs, one
spawned process group per world size running its layouts through ``training.loop.train``, the single-process
baselines (run once a session) and the comparisons against them."""
import os

import pytest
import torch

os.environ.setdefault("DS_ACCELERATOR", "cpu")

from dist_utils import run_distributed  # noqa: E402
from megatron_mtp.config import config_from_dict  # noqa: E402
from megatron_mtp.training.metrics import read_metrics  # noqa: E402

STEPS, TOL, CKPT_TOL = 10, 1e-4, 1e-6
GLOBAL_BATCH, SEQ = 8, 16
EVAL_BATCHES = 2  # global eval micro-batches of 4 samples each


# ---------------------------------------------------------------------------------------------------------
# Configs


def make_config(data: dict, run_dir: str, micro_batch_size: int, **sections) -> dict:
    """The tiny run: 2 trunk + 4 head layers, hidden 32, GQA 4/2 heads, vocab 64, sequence 16, global batch 8,
    warm-up then cosine decay over 10 steps, clipping at 0.5 (active at every step)."""
    config = {
        "model": {"vocab_size": data["vocab_size"], "hidden_size": 32, "num_layers": 6, "num_attention_heads": 4,
                  "num_kv_heads": 2, "ffn_hidden_size": 64, "max_seq_length": 32,
                  "make_vocab_size_divisible_by": 8},
        "mtp": {"n_heads": 4},
        "parallel": {},
        "data": {"paths": [data["prefix"]], "seq_length": SEQ, "split": "1,0,0", "cache_dir": data["cache_dir"]},
        "optimizer": {"lr": 1e-2, "min_lr": 1e-3, "warmup_iters": 2, "decay_iters": STEPS, "clip_grad": 0.5},
        "train": {"iters": STEPS, "micro_batch_size": micro_batch_size, "global_batch_size": GLOBAL_BATCH,
                  "seed": 1234, "run_dir": run_dir, "device": "cpu", "dtype": "float32"},
        "logging": {"interval": 1, "tensorboard": False, "plot": False},
        "checkpoint": {"save": False},
    }
    for section, values in sections.items():
        config[section].update(values)
    return config


def eval_batches(vocab: int) -> list:
    gen = torch.Generator().manual_seed(99)
    return [torch.randint(0, vocab, (4, SEQ + 1), generator=gen) for _ in range(EVAL_BATCHES)]


# ---------------------------------------------------------------------------------------------------------
# The worker: train, then dump parameters by init key and evaluate fixed batches


def _gather_params(engine) -> dict:
    """Full (TP-unsharded) parameters of this rank's model by init key."""
    import torch.distributed as dist

    from megatron_mtp.parallel import state
    from megatron_mtp.parallel.layers import unshard

    s = state.get_state()
    out = {}
    for p in engine.model.parameters():
        key = getattr(p, "init_key", None)
        if key is None:
            continue
        t = p.detach().float().cpu().contiguous()
        if s.tp > 1 and getattr(p, "partition_dim", -1) >= 0:
            shards = [torch.empty_like(t) for _ in range(s.tp)]
            dist.all_gather(shards, t, group=s.tp_group)
            t = unshard(shards, p)
        out.setdefault(key, t)
    return out


def _layout_worker(rank, world_size, jobs, out_dir):
    torch.set_num_threads(1)
    from megatron_mtp.checkpoint import manager
    from megatron_mtp.parallel import state
    from megatron_mtp.training.loop import train

    engines = []
    original_init = manager.CheckpointManager.__init__

    def recording_init(self, cfg, engine, rank_):
        engines.append(engine)
        original_init(self, cfg, engine, rank_)

    manager.CheckpointManager.__init__ = recording_init  # the loop hands every engine to its manager
    from megatron_mtp.training import deepspeed_engine

    gpu_only_bf16 = deepspeed_engine._is_bf16
    for job in jobs:
        cfg = config_from_dict(job["config"])
        # DeepSpeed's bf16 mode (bf16 weights, fp32 master copy and accumulation) is meant for GPUs; CPU runs
        # it too, which lets CI check the bf16 optimizer's bookkeeping against the pipeline schedule.
        deepspeed_engine._is_bf16 = (lambda device, dtype: dtype == torch.bfloat16) if job.get("ds_bf16") \
            else gpu_only_bf16
        train(cfg)
        engine = engines[-1]
        s = state.get_state()
        name = job["name"]
        params = _gather_params(engine)
        if s.tp_rank == 0:
            torch.save(params, os.path.join(out_dir, f"{name}.params.pp{s.pp_rank}.dp{s.dp_rank}.pt"))
        if job.get("eval"):
            mbs = cfg.train.micro_batch_size
            batches = [b[s.dp_rank * mbs:(s.dp_rank + 1) * mbs] for b in eval_batches(cfg.model.vocab_size)]
            heads = engine.eval_step(batches)
            if rank == world_size - 1:
                torch.save(heads.detach().float().cpu(), os.path.join(out_dir, f"{name}.eval.pt"))
        engine = None
        engines.clear()


def run_layouts(world_size: int, jobs: list, out_dir: str) -> dict:
    """Run ``jobs`` ([{"name", "config", "eval"?}]) in one process group of ``world_size``; return per job
    {"metrics": [...], "params": {init_key: tensor}, "params_by_rank": {(pp, dp): {...}}, "eval": tensor}."""
    os.makedirs(out_dir, exist_ok=True)
    run_distributed(_layout_worker, world_size, jobs, out_dir)
    results = {}
    for job in jobs:
        name = job["name"]
        by_rank = {}
        for file in os.listdir(out_dir):
            if file.startswith(f"{name}.params."):
                _, _, pp, dp, _ = file.rsplit(".", 4)
                by_rank[(int(pp[2:]), int(dp[2:]))] = torch.load(os.path.join(out_dir, file))
        merged = {}
        for (pp, dp), params in sorted(by_rank.items()):
            for key, value in params.items():
                if key in merged and dp == 0:  # a tied copy on another stage must be the same tensor
                    torch.testing.assert_close(value, merged[key], rtol=0, atol=TOL, msg=f"{name} {key} copies")
                merged.setdefault(key, value)
        eval_path = os.path.join(out_dir, f"{name}.eval.pt")
        results[name] = {
            "metrics": read_metrics(job["config"]["train"]["run_dir"]),
            "params": merged,
            "params_by_rank": by_rank,
            "eval": torch.load(eval_path) if os.path.exists(eval_path) else None,
            "run_dir": job["config"]["train"]["run_dir"],
        }
    return results


_BASELINES: dict = {}


def baseline(data: dict, root: str) -> dict:
    """The single-process references (untied and tied embeddings), run once per session."""
    key = data["prefix"]
    if key not in _BASELINES:
        base = os.path.join(root, "baseline")
        jobs = [{"name": name, "eval": True,
                 "config": make_config(data, os.path.join(base, name), 4, model=model)}
                for name, model in (("base", {}), ("base_tied", {"tie_embeddings": True}))]
        _BASELINES[key] = run_layouts(1, jobs, base)
    return _BASELINES[key]


# ---------------------------------------------------------------------------------------------------------
# Comparisons


HEAD_KEYS = ["loss"] + [f"loss_head_{i}" for i in range(1, 5)]


def assert_same_curve(got: list, ref: list, name: str, tol: float = TOL, steps=None) -> None:
    steps = steps or list(range(1, STEPS + 1))
    assert [r["step"] for r in got] == steps, (name, [r["step"] for r in got])
    by_step = {r["step"]: r for r in ref}
    for record in got:
        want = by_step[record["step"]]
        for key in HEAD_KEYS:
            assert abs(record[key] - want[key]) <= tol, (name, record["step"], key, record[key], want[key])
        assert abs(record["grad_norm"] - want["grad_norm"]) <= tol * max(1.0, want["grad_norm"]), \
            (name, record["step"], record["grad_norm"], want["grad_norm"])
        assert record["lr"] == pytest.approx(want["lr"], rel=1e-12)


def assert_same_params(got: dict, ref: dict, name: str) -> None:
    assert set(got) == set(ref), (name, sorted(set(got) ^ set(ref)))
    for key in ref:
        torch.testing.assert_close(got[key], ref[key], rtol=0, atol=TOL, msg=f"{name}: parameter {key}")


def check_layout(results: dict, ref: dict, name: str, against: str = "base") -> None:
    assert_same_curve(results[name]["metrics"], ref[against]["metrics"], name)
    assert_same_params(results[name]["params"], ref[against]["params"], name)
    if results[name]["eval"] is not None:
        torch.testing.assert_close(results[name]["eval"], ref[against]["eval"], rtol=0, atol=TOL)


# ---------------------------------------------------------------------------------------------------------
# Two processes: DP=2 with ZeRO 1 and 2, activation checkpointing, resume; PP=2 (tests/test_pipeline.py
# checks those results: one process group of two serves both files)


def two_process_jobs(data: dict, root: str) -> list:
    def job(name, mbs, eval_=False, **sections):
        return {"name": name, "eval": eval_, "config": make_config(data, os.path.join(root, name), mbs, **sections)}

    resume = dict(parallel={"pp": 2, "zero_stage": 1}, model={"tie_embeddings": True})
    source = os.path.join(root, "resume_source")
    return [
        job("dp2_zero1", 2, eval_=True, parallel={"zero_stage": 1}),
        job("dp2_zero2", 2, parallel={"zero_stage": 2}),
        job("dp2_zero1_ckpt", 2, parallel={"zero_stage": 1}, train={"activation_checkpointing": "full"}),
        job("pp2", 4, eval_=True, parallel={"pp": 2}),
        job("pp2_tied", 4, parallel={"pp": 2, "pipeline_partition": "type:TransformerLayer"},
            model={"tie_embeddings": True}),
        job("pp2_ckpt", 4, parallel={"pp": 2}, train={"activation_checkpointing": "full"}),
        dict(job("pp2_zero1_bf16", 4, parallel={"pp": 2, "zero_stage": 1}, train={"dtype": "bfloat16"}),
             ds_bf16=True),
        # resume: 10 steps saving DeepSpeed checkpoints (ZeRO-1 shards, pipeline layer files, tied copies) at
        # steps 5 and 10; then a new run loads step 5 and continues to step 10
        job("resume_source", 4, checkpoint={"save": True, "interval": 5}, **resume),
        job("resume", 4, checkpoint={"save": False, "load": os.path.join(source, "checkpoints", "step_00000005")},
            **resume),
    ]


_TWO: dict = {}


def two_process_results(data: dict, root: str) -> dict:
    if data["prefix"] not in _TWO:
        _TWO[data["prefix"]] = run_layouts(2, two_process_jobs(data, os.path.join(root, "two")),
                                           os.path.join(root, "two"))
    return _TWO[data["prefix"]]
