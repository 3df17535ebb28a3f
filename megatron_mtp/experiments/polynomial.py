"""Algorithmic reasoning (paper section 4.2, Fig. 8): polynomial arithmetic over F7[X]/(X^5).

Compute-matched models with n = 1, 2, 4 heads (same num_layers, so equal parameters), two model sizes,
identical data order, initialisation seed and schedule per seed; exact-match accuracy of greedy decoding
(head 1, the stack's ``generate``) on in-domain and out-of-domain (more operations) test expressions.
"""
from __future__ import annotations

import os

from megatron_mtp.experiments import common
from megatron_mtp.inference import generate
from megatron_mtp.tasks.io import read_jsonl
from megatron_mtp.tasks.polynomial import prompt_and_answer, write_dataset

NS = (1, 2, 4)
SIZES = {
    # CI: the pipeline end to end in seconds, not the science.
    "smoke": {"data": {"train": 300, "test": 8, "in_ops": (1, 2), "ood_ops": (3, 3)},
              "models": {"xs": (32, 5, 2)}, "iters": 4, "batch": 4, "seq": 64, "warmup": 1},
    # This machine's CPU when no GPU is available: one small model pair, short runs (docs/reproduction.md).
    "cpu": {"data": {"train": 50_000, "test": 200, "in_ops": (1, 2), "ood_ops": (3, 4)},
            "models": {"0.3M": (64, 5, 4), "0.7M": (96, 6, 4)}, "iters": 300, "batch": 16, "seq": 128,
            "warmup": 30},
    # One H100 shared by ~16 concurrent runs for a few minutes (docs/reproduction.md says what was cut).
    "small": {"data": {"train": 200_000, "test": 500, "in_ops": (1, 3), "ood_ops": (4, 5)},
              "models": {"1.3M": (128, 6, 4), "6.6M": (256, 8, 8)}, "iters": 1200, "batch": 32, "seq": 256,
              "warmup": 100},
}


def prepare(out_dir: str, size: str, device: str) -> dict:
    """Write the task's JSONL files and tokenise the training split into .bin/.idx (once, before the runs)."""
    spec = SIZES[size]
    d = spec["data"]
    return common.prepare_task(out_dir, size, device, spec, write_dataset, d["train"], d["test"], d["in_ops"],
                               d["ood_ops"])


def jobs(size: str, seeds: list) -> list:
    return common.model_jobs(SIZES[size]["models"], NS, seeds)


def training_overrides(shared: dict, model: str, n: int, seed: int) -> dict:
    spec = shared["spec"]
    hidden, layers, heads = spec["models"][model]
    return {**common.model_overrides(hidden, layers, heads), **common.device_overrides(shared["device"]),
            "mtp.n_heads": n, "data.paths": [shared["train_prefix"]], "data.seq_length": spec["seq"],
            "data.cache_dir": os.path.join(shared["out_dir"], "cache"), "train.iters": spec["iters"],
            "train.micro_batch_size": spec["batch"], "optimizer.warmup_iters": spec["warmup"], "train.seed": seed}


def exact_match(model, tokenizer, samples: list, batch_size: int = 256) -> dict:
    """Greedy-decode the answer of every sample's prompt (head 1 only) and compare it exactly."""
    correct, by_ops = 0, {}
    for start in range(0, len(samples), batch_size):
        chunk = samples[start: start + batch_size]
        pairs = [prompt_and_answer(s["text"]) for s in chunk]
        out = generate(model, [tokenizer.encode(p) for p, _ in pairs], max_new_tokens=len(pairs[0][1]), heads=1,
                       eod=tokenizer.eod, pad_id=tokenizer.pad)
        for sample, (_, answer), tokens in zip(chunk, pairs, out.tokens):
            hit = tokenizer.decode(tokens) == answer
            correct += hit
            stats = by_ops.setdefault(str(sample["ops"]), [0, 0])
            stats[0] += hit
            stats[1] += 1
    return {"accuracy": correct / max(1, len(samples)), "samples": len(samples),
            "by_ops": {k: v[0] / v[1] for k, v in sorted(by_ops.items(), key=lambda kv: int(kv[0]))}}


def evaluate_run(run_dir: str, shared: dict) -> dict:
    _, model, tokenizer = common.load_trained(run_dir, shared["device"])
    paths = shared["dataset"]["paths"]
    return {"in_domain": exact_match(model, tokenizer, read_jsonl(paths["test_in"])),
            "out_of_domain": exact_match(model, tokenizer, read_jsonl(paths["test_ood"]))}


def run_job(job: dict, shared: dict) -> dict:
    run_dir = os.path.join(shared["out_dir"], "runs", f"{job['model']}-n{job['n']}-s{job['seed']}")
    summary = common.train_model("polynomial", run_dir, training_overrides(shared, job["model"], job["n"], job["seed"]))
    return {"final_loss": summary["last"].get("loss"), "final_loss_head_1": summary["last"].get("loss_head_1"),
            **evaluate_run(run_dir, shared)}


def summarize(results: list, shared: dict) -> dict:
    rows = []
    for row, runs in common.runs_by_model_and_n(results, shared["spec"]["models"], NS):
        rows.append({**row, "in_domain": common.mean_std([r["in_domain"]["accuracy"] for r in runs]),
                     "out_of_domain": common.mean_std([r["out_of_domain"]["accuracy"] for r in runs]),
                     "loss_head_1": common.mean_std([r["final_loss_head_1"] for r in runs])})
    return {"rows": rows}


def table(summary: dict) -> str:
    lines = ["| model | n | seeds | in-domain exact match (%) | out-of-domain exact match (%) | final train loss head 1 |",
             "|---|---|---|---|---|---|"]
    for r in summary["rows"]:
        lines.append(f"| {r['model']} | {r['n']} | {len(r['seeds'])} | {common.fmt(r['in_domain'], 1, True)} | "
                     f"{common.fmt(r['out_of_domain'], 1, True)} | {common.fmt(r['loss_head_1'], 3)} |")
    return "\n".join(lines)


def plot(summary: dict, out_dir: str) -> list:
    plt = common.pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
    models = list(dict.fromkeys(r["model"] for r in summary["rows"]))
    width = 0.8 / max(1, len(NS))
    for ax, key, title in ((axes[0], "in_domain", "in-domain"), (axes[1], "out_of_domain", "out-of-domain")):
        for j, n in enumerate(NS):
            rows = {r["model"]: r for r in summary["rows"] if r["n"] == n}
            xs = [i + (j - (len(NS) - 1) / 2) * width for i in range(len(models))]
            means = [100 * (rows[m][key]["mean"] or 0) if m in rows else 0 for m in models]
            errs = [100 * (rows[m][key]["std"] or 0) if m in rows else 0 for m in models]
            ax.bar(xs, means, width, yerr=errs, capsize=3, label=f"n={n}")
        ax.set_xticks(range(len(models)), models)
        ax.set_xlabel("model size")
        ax.set_title(f"polynomial arithmetic, {title}")
        ax.grid(alpha=0.3, axis="y")
    axes[0].set_ylabel("exact match (%), mean ± std over seeds")
    axes[0].legend()
    path = common.savefig(fig, os.path.join(out_dir, "polynomial.png"))
    plt.close(fig)
    return [path]
