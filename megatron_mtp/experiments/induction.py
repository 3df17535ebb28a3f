"""Induction (paper section 4.1, Fig. 7): n = 1 vs n = 2 on stories with recurring two-token names.

Induction success = head 1's accuracy on the second token of a name that already appeared in the story
(``megatron_mtp.tasks.induction``), measured on held-out stories every ``eval_every`` steps of training.
"""
from __future__ import annotations

import os

import torch

from megatron_mtp.experiments import common
from megatron_mtp.tasks.induction import induction_hits, write_dataset
from megatron_mtp.tasks.io import read_jsonl

NS = (1, 2)
SIZES = {
    "smoke": {"data": {"train": 200, "test": 4, "sentences": (2, 3)}, "models": {"xs": (32, 3, 2)}, "iters": 4,
              "eval_every": 2, "batch": 4, "seq": 64, "warmup": 1, "lr": 1e-3},
    "cpu": {"data": {"train": 10_000, "test": 200, "sentences": (4, 8)}, "models": {"0.7M": (128, 3, 4)},
            "iters": 1000, "eval_every": 100, "batch": 32, "seq": 128, "warmup": 40, "lr": 3e-3},
    # Stories of 6-12 short sentences (~150 bytes, rarely more than 256) fit the 256-byte context, so nearly every
    # repeat can be copied from it; evaluation cuts a story at the context length.
    "small": {"data": {"train": 60_000, "test": 300, "sentences": (6, 12)},
              "models": {"0.7M": (128, 3, 4), "3.4M": (256, 4, 8)}, "iters": 1200, "eval_every": 150,
              "batch": 32, "seq": 256, "warmup": 60, "lr": 3e-3},
}


def prepare(out_dir: str, size: str, device: str) -> dict:
    spec = SIZES[size]
    d = spec["data"]
    return common.prepare_task(out_dir, size, device, spec, write_dataset, d["train"], d["test"],
                               d["sentences"])


def jobs(size: str, seeds: list) -> list:
    return common.model_jobs(SIZES[size]["models"], NS, seeds)


job_trainings = common.model_job_trainings  # one training per (model, n, seed) job


def induction_success(model, tokenizer, stories: list, max_len: int, batch_size: int = 32) -> float:
    """Head 1's accuracy on repeated names' second tokens over ``stories`` (one story per sequence), each
    story cut to its first ``max_len`` tokens: the training context length, so no prediction is made at a
    position the model never trained at."""
    device = model.embedding.weight.device
    hits = total = 0
    for start in range(0, len(stories), batch_size):
        chunk = stories[start: start + batch_size]
        encoded = [tokenizer.encode(s["text"])[:max_len] for s in chunk]
        width = max(len(e) for e in encoded)
        # Right padding: the model is causal, so pads after a story never affect its predictions.
        batch = torch.tensor([e + [tokenizer.pad] * (width - len(e)) for e in encoded], device=device)
        predicted = model.logits(batch)[0].argmax(-1).tolist()
        for tokens, pred, story in zip(encoded, predicted, chunk):
            h, t = induction_hits(pred, tokens, [p for p in story["repeats"] if p < len(tokens)])
            hits, total = hits + h, total + t
    return hits / max(1, total)


def run_job(job: dict, shared: dict) -> dict:
    spec = shared["spec"]
    hidden, layers, heads = spec["models"][job["model"]]
    run_dir = os.path.join(shared["out_dir"], "runs", f"{job['model']}-n{job['n']}-s{job['seed']}")
    overrides = {**common.model_overrides(hidden, layers, heads), **common.device_overrides(shared["device"]),
                 "mtp.n_heads": job["n"], "data.paths": [shared["train_prefix"]], "data.seq_length": spec["seq"],
                 "data.cache_dir": os.path.join(shared["out_dir"], "cache"), **common.schedule_overrides(spec),
                 "train.seed": job["seed"]}
    stories = read_jsonl(shared["dataset"]["paths"]["test"])
    curve = []

    def evaluate(step: int) -> None:
        _, model, tokenizer = common.load_trained(run_dir, shared["device"])
        curve.append({"step": step, "induction_success": induction_success(model, tokenizer, stories, spec["seq"])})
        # The curve so far, in the run directory: a run stopped before its last segment still leaves it.
        common.write_json(os.path.join(run_dir, "curve.json"), {"job": job, "curve": curve})

    common.train_in_segments("induction", run_dir, overrides, spec["eval_every"], evaluate)
    return {"curve": curve, "final_induction_success": curve[-1]["induction_success"]}


def summarize(results: list, shared: dict) -> dict:
    rows = []
    for row, runs in common.runs_by_model_and_n(results, shared["spec"]["models"], NS):
        steps = [p["step"] for p in runs[0]["curve"]]
        curve = [{"step": s, **common.mean_std([p["induction_success"] for r in runs for p in r["curve"]
                                                if p["step"] == s])} for s in steps]
        rows.append({**row, "curve": curve, "final": common.mean_std([r["final_induction_success"] for r in runs]),
                     "best": common.mean_std([max(p["induction_success"] for p in r["curve"]) for r in runs])})
    return {"rows": rows, "chance": 1 / 26}


def table(summary: dict) -> str:
    lines = ["| model | n | seeds | induction success at the end (%) | best over the curve (%) | curve (step: mean %) |",
             "|---|---|---|---|---|---|"]
    for r in summary["rows"]:
        curve = ", ".join(f"{p['step']}: {100 * p['mean']:.0f}" for p in r["curve"] if p["mean"] is not None)
        lines.append(f"| {r['model']} | {r['n']} | {len(r['seeds'])} | {common.fmt(r['final'], 1, True)} | "
                     f"{common.fmt(r['best'], 1, True)} | {curve} |")
    return "\n".join(lines)


def plot(summary: dict, out_dir: str) -> list:
    plt = common.pyplot()
    models = list(dict.fromkeys(r["model"] for r in summary["rows"]))
    fig, axes = plt.subplots(1, max(1, len(models)), figsize=(5 * max(1, len(models)), 4), sharey=True, squeeze=False)
    for ax, model in zip(axes[0], models):
        for r in (r for r in summary["rows"] if r["model"] == model):
            pts = [p for p in r["curve"] if p["mean"] is not None]
            xs = [p["step"] for p in pts]
            mean = [100 * p["mean"] for p in pts]
            std = [100 * p["std"] for p in pts]
            ax.plot(xs, mean, marker="o", ms=3, label=f"n={r['n']} ({len(r['seeds'])} seeds)")
            ax.fill_between(xs, [m - s for m, s in zip(mean, std)], [m + s for m, s in zip(mean, std)], alpha=0.2)
        ax.axhline(100 * summary["chance"], color="grey", ls=":", label="chance (1/26)")
        ax.set_title(f"induction, model {model}")
        ax.set_xlabel("training step")
        ax.grid(alpha=0.3)
        ax.legend()
    axes[0][0].set_ylabel("induction success (%), mean ± std")
    path = common.savefig(fig, os.path.join(out_dir, "induction.png"))
    plt.close(fig)
    return [path]
