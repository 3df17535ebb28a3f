"""How long one training step takes when ``workers`` small runs share the device, measured before the real
runs so a GPU script can size their schedules (``--iters-scale``) to the time it has.

``python -m megatron_mtp.experiments calibrate --device cuda --jobs 16 --steps 60`` trains the polynomial
experiment's 6.6M model (8 layers, n = 4) in ``jobs`` concurrent processes and prints the median step time of
the last logging window (steady state: start-up and the first steps are outside it).
"""
from __future__ import annotations

import os
import statistics

from megatron_mtp.experiments import common, polynomial
from megatron_mtp.training.metrics import read_metrics


def calibrate(out_dir: str, device: str, workers: int, steps: int) -> dict:
    shared = polynomial.prepare(out_dir, "smoke", device)
    shared["spec"] = {**polynomial.SIZES["small"], "iters": steps}
    shared["steps"] = steps
    jobs = [{"model": "6.6M", "n": 4, "seed": i} for i in range(workers)]
    results = common.run_jobs(__name__, jobs, shared, workers, None, lambda _: None)
    times = [r["step_time_s"] for r in common.ok_runs(results)]
    summary = {"workers": workers, "steps": steps, "step_time_s": statistics.median(times) if times else None,
               "step_times_s": times, "environment": common.environment(device)}
    common.write_json(os.path.join(out_dir, "calibration.json"), summary)
    return summary


def run_job(job: dict, shared: dict) -> dict:
    run_dir = os.path.join(shared["out_dir"], "runs", f"calibrate-{job['seed']}")
    window = max(1, shared["steps"] // 3)
    common.train_model("polynomial", run_dir, {**polynomial.training_overrides(shared, job["model"], job["n"], job["seed"]),
                                               "logging.interval": window, "checkpoint.save": False})
    return {"step_time_s": read_metrics(run_dir)[-1]["step_time_s"]}
