"""What every experiment shares: training one model through the project's loop, loading it back,
running many jobs concurrently (several small models share one GPU), and writing results.

A job is a plain dict (it crosses process boundaries); an experiment module provides ``prepare``,
``jobs``, ``run_job`` and ``summarize`` (see ``megatron_mtp/experiments/__main__.py``).
"""
from __future__ import annotations

import concurrent.futures as futures
import datetime
import importlib
import json
import math
import multiprocessing
import os
import platform
import statistics
import sys
import time
import traceback
from typing import Callable, Iterable, Optional

import torch

from megatron_mtp.config import load_config
from megatron_mtp.data.preprocess import output_prefix_for, preprocess
from megatron_mtp.inference.loading import load_model
from megatron_mtp.io_utils import atomic_save_path, atomic_write_text
from megatron_mtp.training.loop import train

CONFIG_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
                          "configs", "experiments")


def base_config_path(experiment: str) -> str:
    return os.path.join(CONFIG_DIR, f"{experiment}.yaml")


def model_overrides(hidden: int, layers: int, heads: int, kv_heads: Optional[int] = None) -> dict:
    """A Llama-style shape: the FFN follows Llama's 8/3 rule; num_layers counts head layers too."""
    return {"model.hidden_size": hidden, "model.num_layers": layers, "model.num_attention_heads": heads,
            "model.num_kv_heads": kv_heads or heads, "model.ffn_hidden_size": None}


def device_overrides(device: str) -> dict:
    # bf16 autocast with fp32 master weights on the GPU (the stack's default there), fp32 on the CPU.
    return {"train.device": device, "train.dtype": "bfloat16" if device == "cuda" else "float32"}


def schedule_overrides(spec: dict, iters_key: str = "iters") -> dict:
    """A size's schedule: steps, micro-batch, warm-up and peak learning rate (cosine decay to a tenth of it),
    the same for every n of a comparison."""
    return {"train.iters": spec[iters_key], "train.micro_batch_size": spec["batch"],
            "optimizer.warmup_iters": spec["warmup"], "optimizer.lr": spec["lr"], "optimizer.min_lr": spec["lr"] / 10}


def shared_state(out_dir: str, size: str, device: str, spec: dict, **extra) -> dict:
    """What every job of a run reads (``prepare``'s result): where to write, the size's settings, and the
    experiment's prepared data in ``extra``."""
    return {"out_dir": out_dir, "size": size, "device": device, "spec": spec, **extra}


def prepare_task(out_dir: str, size: str, device: str, spec: dict, write_dataset: Callable[..., dict], *args,
                 **extra) -> dict:
    """Write a task's JSONL files under ``out_dir/data`` with ``write_dataset(data_dir, *args, seed=0)`` (one
    dataset for every seed and n: the runs differ only in what is compared) and tokenise its training split
    into .bin/.idx with the byte tokenizer, once, before the runs. Returns ``shared_state`` with the dataset's
    info (``dataset``) and the training split's prefix (``train_prefix``)."""
    data_dir = os.path.join(out_dir, "data")
    info = write_dataset(data_dir, *args, seed=0)
    preprocess(info["paths"]["train"], os.path.join(data_dir, "train"), tokenizer_type="byte", append_eod=True,
               progress=False)
    return shared_state(out_dir, size, device, spec, dataset=info,
                        train_prefix=output_prefix_for(os.path.join(data_dir, "train"), "text"), **extra)


def model_jobs(models: Iterable[str], ns: Iterable[int], seeds: list) -> list:
    """One job per (seed, model, n), seed-major: a time budget that cuts the last jobs cuts whole seeds,
    never one n of a comparison."""
    return [{"model": name, "n": n, "seed": seed} for seed in seeds for name in models for n in ns]


def model_job_trainings(job: dict, spec: dict) -> list:
    """(num_layers, n, steps, tokens per step, hidden) of every training a ``model_jobs`` job runs — one, at the
    size's schedule: what the GPU script's time plan counts (``calibrate.worker_work``)."""
    hidden, layers, _ = spec["models"][job["model"]]
    return [(layers, job["n"], spec["iters"], spec["batch"] * spec["seq"], hidden)]


def ok_runs(results: list) -> list:
    return [r for r in results if r["status"] == "ok"]


def runs_by_model_and_n(results: list, models: Iterable[str], ns: Iterable[int]) -> list:
    """[(row, runs)]: the finished runs grouped by (model, n) in the size's order, ``row`` holding the
    group's model, n and seeds; a group with no finished run is left out."""
    ok = ok_runs(results)
    groups = []
    for model in models:
        for n in ns:
            runs = [r for r in ok if r["job"]["model"] == model and r["job"]["n"] == n]
            if runs:
                groups.append(({"model": model, "n": n, "seeds": [r["job"]["seed"] for r in runs]}, runs))
    return groups


def train_model(experiment: str, run_dir: str, overrides: dict) -> dict:
    """Train with the project's loop (``megatron_mtp.training.loop.train``) from the experiment's base YAML
    plus ``overrides`` ({"section.key": value}); returns the loop's summary plus the parameter count."""
    args = []
    for key, value in {**overrides, "train.run_dir": run_dir}.items():
        args += [f"--{key}", json.dumps(value) if isinstance(value, (list, type(None))) else str(value)]
    cfg = load_config(base_config_path(experiment), args)
    return train(cfg)


def train_in_segments(experiment: str, run_dir: str, overrides: dict, every: int,
                      callback: Callable[[int], None]) -> None:
    """Train to ``train.iters`` in segments of ``every`` steps, calling ``callback(step)`` after each.

    Each segment is one call of the loop that stops at ``train.exit_interval`` with a checkpoint; the next
    call resumes from it (model, optimizer, data position and RNG), so the run is the uninterrupted one,
    observed at intervals, without a hook in the loop."""
    iters = int(overrides["train.iters"])
    step = 0
    while step < iters:
        summary = train_model(experiment, run_dir, {**overrides, "train.exit_interval": every})
        if summary["step"] <= step:
            raise RuntimeError(f"training in {run_dir} made no progress past step {step}")
        step = summary["step"]
        callback(step)


def load_trained(run_dir: str, device: str):
    """(cfg, model in eval mode, tokenizer) from a run directory's latest checkpoint, fp32 weights."""
    return load_model(run_dir, device=device, dtype=torch.float32)


def mean_std(values: list) -> dict:
    values = [v for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    if not values:
        return {"mean": None, "std": None, "n": 0}
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "n": len(values)}


def fmt(stat: dict, digits: int = 3, percent: bool = False) -> str:
    if stat["mean"] is None:
        return "-"
    scale = 100.0 if percent else 1.0
    text = f"{stat['mean'] * scale:.{digits}f}"
    if stat["n"] > 1:
        text += f" ± {stat['std'] * scale:.{digits}f}"
    return text


def environment(device: str) -> dict:
    info = {"date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "python": platform.python_version(), "host_cpus": os.cpu_count(), "device": device,
            "command": " ".join([os.path.basename(sys.executable), "-m", "megatron_mtp.experiments"] + sys.argv[1:])}
    info["torch"] = torch.__version__
    if device == "cuda" and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def write_text(path: str, text: str) -> None:
    atomic_write_text(path, text)


def write_json(path: str, data: dict) -> None:
    write_text(path, json.dumps(data, indent=1, default=str) + "\n")


def _run_one(module_name: str, job: dict, shared: dict, deadline: Optional[float]) -> dict:
    """One job in a worker process: one intra-op thread (many workers share the cores), then the
    experiment's ``run_job``. A failure is reported in the result, never raised across the pool."""
    torch.set_num_threads(1)
    start = time.time()
    if deadline is not None and start > deadline:
        return {"job": job, "status": "cut", "reason": "not started before the time budget ran out"}
    try:
        module = importlib.import_module(module_name)
        result = module.run_job(job, shared)
        return {"job": job, "status": "ok", "wall_s": time.time() - start, **result}
    except Exception as exc:  # reported per job: one broken run must not lose the others' results
        return {"job": job, "status": "failed", "wall_s": time.time() - start,
                "error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()[-4000:]}


def run_jobs(module_name: str, jobs: list, shared: dict, workers: int, deadline: Optional[float],
             on_result: Callable[[list], None]) -> list:
    """Run ``jobs`` (``workers`` at a time, in fresh spawned processes; in this process when 1) and call
    ``on_result(results_so_far)`` after each, so a killed run still leaves the finished jobs' results."""
    results: list = []
    if workers <= 1:
        for job in jobs:
            results.append(_run_one(module_name, job, shared, deadline))
            _report(results[-1])
            on_result(results)
        return results
    context = multiprocessing.get_context("spawn")
    with futures.ProcessPoolExecutor(max_workers=workers, mp_context=context) as pool:
        pending = [pool.submit(_run_one, module_name, job, shared, deadline) for job in jobs]
        for future in futures.as_completed(pending):
            results.append(future.result())
            _report(results[-1])
            on_result(results)
    return results


def _report(result: dict) -> None:
    job = ", ".join(f"{k}={v}" for k, v in result["job"].items() if not isinstance(v, (list, dict)))
    extra = f" ({result.get('error')})" if result["status"] == "failed" else ""
    print(f"[{result['status']}] {job} in {result.get('wall_s', 0):.1f}s{extra}", flush=True)
    if result["status"] == "failed":
        print(result.get("traceback", ""), file=sys.stderr, flush=True)


def savefig(fig, path: str) -> str:
    fig.tight_layout()
    atomic_save_path(path, lambda tmp: fig.savefig(tmp, dpi=110))
    return path


def pyplot():
    # matplotlib is optional (the GPU image has none): imported only when a plot is drawn.
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt
