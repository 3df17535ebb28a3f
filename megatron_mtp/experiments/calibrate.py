"""How long one training step takes when ``workers`` small runs share the device, and how far a size's
schedules must be scaled to fit a time budget: the GPU script measures the first, then asks for the second.

``python -m megatron_mtp.experiments calibrate --device cuda --jobs 24 --steps 45`` trains the polynomial
experiment's largest ``--size`` model (n = 4) in ``jobs`` concurrent processes at that size's batch and prints
the median step time of the last third of the steps. The runs wait for each other before training (a file
barrier): processes start seconds apart, and a run that times its steps before the others have started
measures a quieter device than the real runs will share.

Small models are bound by kernel launches and memory traffic more than by arithmetic, and the runs take turns
on one GPU: the device's time for one step is about ``step_time_s / workers``. ``step_cost`` models it as the
number of layers (plus a fixed part for the embedding and the optimizer, and a third of a layer per head's
loss) times a fixed share per layer plus a share that grows with the tokens x width of the step: fitted to the
per-process step times of 33 concurrent runs on an H100 (docs/reproduction.md, run 2: within ~25 % for every
experiment, where the layer count alone was off by up to 2x). ``SLACK`` covers that and the end of the run.
``fit_scale`` sums every planned training's steps x cost per worker and returns the schedule factor that fits
the last worker's finish into the budget.
"""
from __future__ import annotations

import importlib
import os
import statistics
import time

from megatron_mtp.experiments import common, polynomial
from megatron_mtp.training.metrics import read_metrics

# The per-step cost model: a transformer layer is 1; the embedding, gradient clipping and the optimizer
# about one more; each head's norm, unembedding and loss (forward and backward) about a third of a layer.
FIXED_COST, HEAD_COST = 1.0, 0.3
# Per layer, a fixed part (launches, small kernels) worth LAUNCH_SHARE of a step of REFERENCE_WORK tokens x
# hidden (128 x 128 tokens at width 256), plus a part in proportion to tokens x hidden. Run 2 on an H100:
# 0.4 fits the 1.1M-8.2M models at 8k-16k tokens a step.
LAUNCH_SHARE, REFERENCE_WORK = 0.4, 16384 * 256
# The runs do not keep the device equally busy to the end (the last ones run with fewer peers, each bound
# by its own launches), and every training has its own start-up, checkpoint and evaluation: plan the device
# time at this multiple.
SLACK = 1.3


def step_cost(layers: int, n: int, tokens: int, hidden: int) -> float:
    """Device work of one training step (cost units) of a ``layers``-layer, ``n``-head model of width
    ``hidden`` on ``tokens`` tokens (micro-batch x sequence)."""
    return (layers + FIXED_COST + HEAD_COST * n) * (LAUNCH_SHARE + tokens * hidden / REFERENCE_WORK)


def calibration_model(size: str) -> str:
    models = polynomial.SIZES[size]["models"]
    return max(models, key=lambda name: (models[name][1], models[name][0]))  # most layers, then widest


def calibrate(out_dir: str, device: str, workers: int, steps: int, size: str = "small") -> dict:
    shared = polynomial.prepare(out_dir, "smoke", device)
    shared["spec"] = {**polynomial.SIZES[size], "iters": steps}
    shared["steps"], shared["workers"] = steps, workers
    barrier = os.path.join(out_dir, "barrier")
    for name in os.listdir(barrier) if os.path.isdir(barrier) else []:  # a previous calibration's marks
        os.remove(os.path.join(barrier, name))
    model = calibration_model(size)
    jobs = [{"model": model, "n": 4, "seed": i} for i in range(workers)]
    results = common.run_jobs(__name__, jobs, shared, workers, None, lambda _: None)
    times = [r["step_time_s"] for r in common.ok_runs(results)]
    hidden, layers, _ = polynomial.SIZES[size]["models"][model]
    summary = {"workers": workers, "steps": steps, "size": size, "model": model, "layers": layers, "n": 4,
               "hidden": hidden,
               "batch": shared["spec"]["batch"], "seq": shared["spec"]["seq"],
               "step_time_s": statistics.median(times) if times else None, "step_times_s": times,
               "failed": [r.get("error") for r in results if r["status"] != "ok"],
               "environment": common.environment(device)}
    common.write_json(os.path.join(out_dir, "calibration.json"), summary)
    return summary


BARRIER_TIMEOUT_S = 60.0  # a run that crashed before the barrier must not hold the others for long


def wait_for_peers(barrier_dir: str, me: int, workers: int, timeout_s: float = BARRIER_TIMEOUT_S) -> None:
    """Mark this run ready and wait until all ``workers`` are (or ``timeout_s`` passed: then time anyway)."""
    os.makedirs(barrier_dir, exist_ok=True)
    open(os.path.join(barrier_dir, f"ready-{me}"), "w").close()
    deadline = time.time() + timeout_s
    while len(os.listdir(barrier_dir)) < workers and time.time() < deadline:
        time.sleep(0.1)


def run_job(job: dict, shared: dict) -> dict:
    run_dir = os.path.join(shared["out_dir"], "runs", f"calibrate-{job['seed']}")
    wait_for_peers(os.path.join(shared["out_dir"], "barrier"), job["seed"], shared["workers"])
    window = max(1, shared["steps"] // 3)
    common.train_model("polynomial", run_dir, {**polynomial.training_overrides(shared, job["model"], job["n"], job["seed"]),
                                               "logging.interval": window, "checkpoint.save": False})
    return {"step_time_s": read_metrics(run_dir)[-1]["step_time_s"]}


def worker_work(experiment: str, size: str, seeds: list, workers: int) -> list:
    """Each worker's steps x ``step_cost`` at the size's unscaled schedule (``job_trainings``: (layers, n, steps,
    tokens, hidden) of each training of a job), the jobs dealt out in turn (the
    pool hands the next job to the next free worker; an experiment's jobs cost about the same)."""
    module = importlib.import_module(f"megatron_mtp.experiments.{experiment}")
    spec = module.SIZES[size]
    totals = [0.0] * max(1, min(workers, len(module.jobs(size, seeds))))
    for i, job in enumerate(module.jobs(size, seeds)):
        trainings = module.job_trainings(job, spec)
        totals[i % len(totals)] += sum(steps * step_cost(layers, n, tokens, hidden)
                                       for layers, n, steps, tokens, hidden in trainings)
    return totals


def shared_device_seconds(work: list, unit_s: float) -> float:
    """When every worker has finished ``work`` (cost units each), the device shared equally by the workers
    still running and doing ``1 / unit_s`` units a second in all: the last worker's finishing time."""
    elapsed, done, remaining = 0.0, 0.0, len(work)
    for w in sorted(work):
        elapsed += (w - done) * remaining * unit_s
        done, remaining = w, remaining - 1
    return elapsed


def fit_scale(calibration: dict, budget_s: float, size: str, plan: dict) -> dict:
    """The schedule factor (at most 1) that fits ``plan`` ({experiment: (seeds, workers)}) into ``budget_s``
    seconds, given a ``calibrate`` result: one device shared by every worker of every experiment."""
    cost = step_cost(calibration["layers"], calibration["n"], calibration["batch"] * calibration["seq"],
                     calibration["hidden"])
    unit_s = calibration["step_time_s"] / calibration["workers"] / cost
    work = {name: worker_work(name, size, seeds, workers) for name, (seeds, workers) in plan.items()}
    needed_s = SLACK * shared_device_seconds([w for ws in work.values() for w in ws], unit_s)
    return {"scale": round(min(1.0, budget_s / needed_s), 3), "needed_s_at_scale_1": needed_s, "unit_s": unit_s,
            "worker_work": work, "budget_s": budget_s}
