"""``python -m megatron_mtp.experiments run EXPERIMENT ...``: train, evaluate, write results, table, plots."""
from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
import time

from megatron_mtp.experiments import EXPERIMENTS, common
from megatron_mtp.experiments.calibrate import calibrate, fit_scale


SCALED_KEYS = ("iters", "pretrain_iters", "finetune_iters", "eval_every", "warmup")


def scale_schedule(spec: dict, scale: float) -> dict:
    """The size's schedule with every step count multiplied by ``scale`` (at least 1 step each): how a GPU
    script fits the runs into the time it has, the same factor for every n so the comparison stays matched."""
    return {k: max(1, round(v * scale)) if k in SCALED_KEYS else v for k, v in spec.items()}


def run(experiment: str, size: str, device: str, seeds: list, workers: int, out_dir: str,
        time_budget_s: float = 0.0, iters_scale: float = 1.0) -> dict:
    """Prepare data, run every job, write ``results.json`` (after every finished job), ``results.md`` and the
    plots under ``out_dir``; return the results."""
    module = importlib.import_module(f"megatron_mtp.experiments.{experiment}")
    if size not in module.SIZES:
        raise SystemExit(f"--size must be one of {', '.join(module.SIZES)} for {experiment}, got {size!r}.")
    start = time.time()
    os.makedirs(out_dir, exist_ok=True)
    shared = module.prepare(out_dir, size, device)
    shared["spec"] = scale_schedule(shared["spec"], iters_scale)
    jobs = module.jobs(size, seeds)
    deadline = start + time_budget_s if time_budget_s else None
    header = {"experiment": experiment, "size": size, "seeds": seeds, "workers": workers, "iters_scale": iters_scale,
              "environment": common.environment(device), "settings": shared.get("spec"), "jobs": len(jobs)}
    path = os.path.join(out_dir, "results.json")

    def save(results: list, final: bool = False) -> dict:
        data = {**header, "complete": final, "wall_s": time.time() - start,
                "summary": module.summarize(results, shared), "runs": results}
        common.write_json(path, data)
        return data

    save([])
    results = common.run_jobs(f"megatron_mtp.experiments.{experiment}", jobs, shared, workers, deadline, save)
    data = save(results, final=True)
    report(out_dir)
    return data


def report(out_dir: str) -> dict:
    """Write ``results.md`` (the table) and the plots from ``results.json``: at the end of a run, or later
    for a run that was killed (the JSON is rewritten after every finished job)."""
    path = os.path.join(out_dir, "results.json")
    with open(path) as stream:
        data = json.load(stream)
    module = importlib.import_module(f"megatron_mtp.experiments.{data['experiment']}")
    summary = module.summarize(data["runs"], {"spec": data["settings"]})
    table = module.table(summary)
    env = data["environment"]
    done = sum(r["status"] == "ok" for r in data["runs"])
    not_done = [r["job"] for r in data["runs"] if r["status"] != "ok"]
    lines = [f"{data['experiment']} ({data['size']}, {env['device']} {env.get('gpu', '')}, {env['date']}, "
             f"{data['wall_s']:.0f} s wall): {done}/{data['jobs']} runs completed", "", table]
    if not_done or done < data["jobs"]:
        lines += ["", f"not completed: {len(not_done)} failed or cut {not_done}, "
                      f"{data['jobs'] - len(data['runs'])} never finished"]
    common.write_text(os.path.join(out_dir, "results.md"), "\n".join(lines) + "\n")
    try:
        plots = module.plot(summary, out_dir)
    except ImportError as exc:  # e.g. no matplotlib on a GPU image: plot later with `report`
        plots = [f"none ({exc})"]
    print("\n".join(lines), flush=True)
    print(f"results: {path}; plots: {', '.join(plots)}", flush=True)
    return summary


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m megatron_mtp.experiments",
                                     description="Reproduce the paper's small-scale comparisons (docs/reproduction.md).")
    sub = parser.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run", help="train and evaluate one experiment's models")
    r.add_argument("experiment", choices=EXPERIMENTS)
    r.add_argument("--size", default="smoke", help="smoke (CI, seconds), cpu (this CPU, minutes), small (one GPU, minutes) or, for polynomial and "
                   "finetune, run3 (run 3's schedule, docs/reproduction.md)")
    r.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    r.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    r.add_argument("--jobs", type=int, default=1, help="runs trained concurrently (processes)")
    r.add_argument("--out", default=None, help="output directory (default runs/experiments/EXPERIMENT-SIZE)")
    r.add_argument("--time-budget-s", type=float, default=0.0,
                   help="runs not started within this many seconds are skipped and reported as cut (0 = none)")
    r.add_argument("--iters-scale", type=float, default=1.0,
                   help="multiply every step count of the size's schedule (the same for every n)")
    rep = sub.add_parser("report", help="rewrite results.md and the plots from an output directory's results.json")
    rep.add_argument("out", help="the experiment's output directory")
    cal = sub.add_parser("calibrate", help="median training-step time with JOBS small runs sharing the device")
    cal.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    cal.add_argument("--jobs", type=int, default=1)
    cal.add_argument("--steps", type=int, default=60)
    cal.add_argument("--size", default="small", help="whose polynomial model and batch to time")
    cal.add_argument("--out", default=os.path.join("runs", "experiments", "calibrate"))
    fit = sub.add_parser("fit", help="the --iters-scale that fits experiments into a time budget, from a calibration")
    fit.add_argument("calibration", help="calibration.json written by `calibrate`")
    fit.add_argument("--budget-s", type=float, required=True, help="seconds of the device for all the runs")
    fit.add_argument("--size", default="small")
    fit.add_argument("--plan", nargs="+", required=True, metavar="EXPERIMENT:SEEDS:WORKERS",
                     help="e.g. polynomial:0,1,2:9 bytes:0,1,2:6")
    args = parser.parse_args(argv)
    if args.command == "calibrate":
        print(json.dumps(calibrate(args.out, args.device, args.jobs, args.steps, args.size)), flush=True)
        return 0
    if args.command == "fit":
        with open(args.calibration) as stream:
            calibration = json.load(stream)
        if not calibration.get("step_time_s"):
            raise SystemExit(f"{args.calibration} has no step time (every calibration run failed); see its log.")
        plan = {}
        for item in args.plan:
            parts = item.split(":")
            try:
                name, seeds, workers = parts[0], [int(s) for s in parts[1].split(",")], int(parts[2])
            except (IndexError, ValueError):
                name = None
            if name not in EXPERIMENTS or len(parts) != 3 or workers < 1:
                raise SystemExit(f"--plan items look like polynomial:0,1,2:9 (experiment of {', '.join(EXPERIMENTS)}, "
                                 f"seeds, workers), got {item!r}.")
            plan[name] = (seeds, workers)
        print(json.dumps(fit_scale(calibration, args.budget_s, args.size, plan)), flush=True)
        return 0
    if args.command == "report":
        report(args.out)
        return 0
    out = args.out or os.path.join("runs", "experiments", f"{args.experiment}-{args.size}")
    data = run(args.experiment, args.size, args.device, args.seeds, args.jobs, out, args.time_budget_s,
               args.iters_scale)
    return 0 if all(r["status"] == "ok" for r in data["runs"]) else 1


if __name__ == "__main__":
    sys.exit(main())
