"""Helpers shared by the checkpoint, reshard and export tests: a tiny corpus and model, in-process training
with a stop signal, the metrics and final state of a run, and the four-rank DeepSpeed scenario (run once per
session and reused)."""
from __future__ import annotations

import functools
import json
import os
import signal
import socket
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ITERS, STOP = 20, 10


# ---------------------------------------------------------------------------------------------------------
# a tiny run


def make_corpus(directory: str) -> str:
    """A tiny byte-level indexed dataset (random 'documents'); returns its prefix."""
    from megatron_mtp.data.indexed_dataset import IndexedDatasetBuilder

    prefix = os.path.join(directory, "corpus")
    if os.path.exists(prefix + ".idx"):
        return prefix
    rng = np.random.default_rng(0)
    with IndexedDatasetBuilder(prefix, dtype=np.uint16) as builder:
        for _ in range(40):
            doc = rng.integers(32, 127, size=int(rng.integers(20, 200)))
            builder.add_document(np.append(doc, 256))
        builder.finalize()
    return prefix


def tiny_overrides(run_dir: str, data_dir: str, **extra) -> list:
    """A 4-layer (2 trunk + 2 heads) model small enough for CPU tests in seconds."""
    prefix = make_corpus(data_dir)
    values = {
        "model.vocab_size": 258, "model.hidden_size": 32, "model.num_layers": 4, "model.num_attention_heads": 4,
        "model.num_kv_heads": 2, "model.ffn_hidden_size": 64, "model.make_vocab_size_divisible_by": 8,
        "model.max_seq_length": 64, "mtp.n_heads": 2, "data.seq_length": 16, "data.paths": f"[{prefix}]",
        "data.split": "100,0,0", "data.cache_dir": os.path.join(data_dir, "cache"),
        "train.iters": ITERS, "train.micro_batch_size": 2, "train.grad_accum": 2, "train.seed": 7,
        "train.device": "cpu", "train.dtype": "float32", "train.run_dir": run_dir,
        "optimizer.lr": 1e-2, "optimizer.min_lr": 1e-3, "optimizer.warmup_iters": 3,
        "logging.interval": 1, "logging.tensorboard": False, "logging.plot": False,
        "checkpoint.interval": 0, "checkpoint.keep_last": 3,
    }
    values.update(extra)
    out = []
    for key, value in values.items():
        out += [f"--{key}", str(value)]
    return out


def losses(run_dir: str) -> list:
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        records = [json.loads(line) for line in f if line.strip()]
    return [(r["step"], r["loss"], r["loss_head_1"], r["loss_head_2"]) for r in records]


def final_state(run_dir: str) -> tuple:
    """(canonical weights, canonical Adam state) of the run's latest checkpoint."""
    from megatron_mtp.checkpoint.formats import open_checkpoint
    from megatron_mtp.checkpoint.manager import resolve_checkpoint

    reader = open_checkpoint(resolve_checkpoint(run_dir))
    return reader.weights(), reader.optimizer_state(), reader.step


def assert_bitwise(a: dict, b: dict, what: str) -> None:
    assert a.keys() == b.keys(), what
    for key in a:
        assert torch.equal(a[key], b[key]), f"{what}: {key} differs by {(a[key] - b[key]).abs().max()}"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]



def _train_in_process(args: list, stop_after: int = 0) -> dict:
    """Run the training loop here; ``stop_after`` k sends SIGUSR1 to ourselves during step k."""
    from megatron_mtp.config import load_config
    from megatron_mtp.training import local_engine, loop

    config = None
    if args[:1] == ["--config"]:
        config, args = args[1], args[2:]
    cfg = load_config(config, args)
    saved = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGUSR1)}
    original = local_engine.LocalEngine.train_step

    def train_step(self, micro_batches, step):
        result = original(self, micro_batches, step)
        if stop_after and step + 1 == stop_after:
            os.kill(os.getpid(), signal.SIGUSR1)
        return result

    local_engine.LocalEngine.train_step = train_step
    try:
        return loop.train(cfg)
    finally:
        local_engine.LocalEngine.train_step = original
        for s, handler in saved.items():
            signal.signal(s, handler)



# ---------------------------------------------------------------------------------------------------------
# PP = 2 x TP = 2, four gloo ranks (DeepSpeed engine)

SCENARIO = textwrap.dedent(r'''
    import json, os, signal, sys
    import torch.distributed as dist
    from megatron_mtp.config import load_config
    from megatron_mtp.training import loop
    import megatron_mtp.training.deepspeed_engine as dse

    spec = json.loads(sys.argv[1])
    original = dse.DeepSpeedEngine.train_step
    STOP_AFTER = {"n": 0, "first": None}

    def train_step(self, micro_batches, step):
        if STOP_AFTER["first"] is None:
            STOP_AFTER["first"] = step
        result = original(self, micro_batches, step)
        n = STOP_AFTER["n"]
        if n and step + 1 - STOP_AFTER["first"] == n:
            os.kill(os.getpid(), signal.SIGUSR1)
        return result

    dse.DeepSpeedEngine.train_step = train_step

    def run(args, stop_after=0, config=None):
        STOP_AFTER.update(n=stop_after, first=None)
        cfg = load_config(config, args)
        return loop.train(cfg)

    run(spec["straight"])
    run(spec["split"], stop_after=spec["stop"])
    run(spec["split"])
    if spec.get("reshard"):
        if dist.get_rank() == 0:
            from megatron_mtp.checkpoint.reshard import reshard
            reshard(spec["reshard"]["load"], spec["reshard"]["output"], tp=1, pp=4)
        dist.barrier()
        run(spec["reshard"]["args"], stop_after=spec["reshard"]["steps"], config=spec["reshard"]["config"])
    print("SCENARIO DONE", flush=True)
''')


def _launch(world: int, script: str, arg: str, cwd: str, timeout: int = 600) -> list:
    port = free_port()
    procs = []
    for rank in range(world):
        env = dict(os.environ, RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                   LOCAL_WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
                   OMP_NUM_THREADS="1", PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
        for k in ("SLURM_PROCID", "SLURM_STEP_ID", "OMPI_COMM_WORLD_RANK"):
            env.pop(k, None)
        procs.append(subprocess.Popen([sys.executable, script, arg], cwd=cwd, env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, text=True))
    outs = []
    try:
        for p in procs:
            out, _ = p.communicate(timeout=timeout)
            outs.append((p.returncode, out))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    return outs


@functools.lru_cache(maxsize=None)
def run_ds_scenario(base: str) -> dict:
    """Four ranks, TP = 2 x PP = 2: 20 steps straight; 10 steps + SIGUSR1; resume to 20; then the step-10
    checkpoint resharded to TP = 1 x PP = 4 and continued for 2 steps. Returns the run directories."""
    pytest.importorskip("deepspeed")
    try:
        import megatron_mtp.training.deepspeed_engine  # noqa: F401
        import megatron_mtp.model.pipeline  # noqa: F401
    except ImportError as exc:
        pytest.skip(f"the DeepSpeed engine is not available yet ({exc})")
    data = os.path.join(base, "data")
    make_corpus(data)
    dirs = {name: os.path.join(base, name) for name in ("straight", "split", "resharded")}
    layout = {"parallel.tp": 2, "parallel.pp": 2}
    spec = {
        "straight": tiny_overrides(dirs["straight"], data, **layout),
        "split": tiny_overrides(dirs["split"], data, **layout),
        "stop": STOP,
        "reshard": {
            "load": os.path.join(dirs["split"], "checkpoints", "step_00000010"),
            "output": dirs["resharded"],
            "config": os.path.join(dirs["resharded"], "config.yaml"),
            "args": [a for pair in (("--data.cache_dir", os.path.join(data, "cache")), ("--logging.tensorboard", "false"),
                               ("--logging.plot", "false")) for a in pair],
            "steps": 2,
        },
    }
    script = os.path.join(base, "scenario.py")
    with open(script, "w") as f:
        f.write(SCENARIO)
    outs = _launch(4, script, json.dumps(spec), REPO)
    for rank, (rc, out) in enumerate(outs):
        assert rc == 0 and "SCENARIO DONE" in out, f"rank {rank} failed (exit {rc}):\n{out[-4000:]}"
    return dirs
