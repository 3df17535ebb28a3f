"""Finetuning with n' (paper section 3.6, Fig. 4): pretrain compute-matched n = 4 and n = 1 byte models on the
code corpus, then finetune on polynomial arithmetic (``megatron_mtp.tasks.polynomial``, in-domain operations):
the n = 4 model with n' = 4 (all heads) and with n' = 1 (next-token only: ``mtp.loss_weights [1, 0, 0, 0]``,
the extra heads kept but given no loss), the n = 1 model with n' = 1 (the baseline). All finetunes see the
same data in the same order with the same schedule; evaluation is greedy exact match, head 1.
"""
from __future__ import annotations

import os

from megatron_mtp.data.code_corpus import ensure_stdlib_corpus
from megatron_mtp.experiments import common, polynomial
from megatron_mtp.tasks.polynomial import write_dataset

VARIANTS = ((4, 4), (4, 1), (1, 1))  # (pretraining n, finetuning n')
SIZES = {
    "smoke": {"max_docs": 12, "data": {"train": 300, "test": 8, "in_ops": (1, 2), "ood_ops": (3, 3)},
              "model": (32, 5, 2), "pretrain_iters": 3, "finetune_iters": 3, "batch": 4, "seq": 64, "warmup": 1,
              "lr": 1e-3},
    "cpu": {"max_docs": None, "data": {"train": 50_000, "test": 200, "in_ops": (1, 1), "ood_ops": (2, 2)},
            "model": (128, 6, 4), "pretrain_iters": 300, "finetune_iters": 600, "batch": 32, "seq": 128,
            "warmup": 40, "lr": 3e-3},
    # Run 3's schedule (docs/reproduction.md), kept so its command can be re-run: the polynomial experiment's
    # run-3 schedule (32 x 128-byte batches) after the code pretraining.
    "run3": {"max_docs": None, "data": {"train": 200_000, "test": 500, "in_ops": (1, 1), "ood_ops": (2, 2)},
             "model": (128, 6, 4), "pretrain_iters": 300, "pretrain_batch": 16, "pretrain_seq": 256,
             "finetune_iters": 1500, "batch": 32, "seq": 128, "warmup": 60, "lr": 3e-3},
    # The polynomial experiment's task and schedule (its smaller model, 128 x 128-byte batches) after a short
    # code pretraining, so the finetunes compare with experiment 1's from-scratch runs of the same model.
    "small": {"max_docs": None, "data": {"train": 200_000, "test": 500, "in_ops": (1, 1), "ood_ops": (2, 2)},
              "model": (128, 6, 4), "pretrain_iters": 300, "pretrain_batch": 16, "pretrain_seq": 256,
              "finetune_iters": 2000, "batch": 128, "seq": 128, "warmup": 60, "lr": 3e-3},
}


def prepare(out_dir: str, size: str, device: str) -> dict:
    spec = SIZES[size]
    corpus = ensure_stdlib_corpus(os.path.join(out_dir, "corpus"), max_docs=spec["max_docs"])
    d = spec["data"]
    # Pretraining reads the code corpus (``corpus``), finetuning the task's training split (``train_prefix``).
    shared = common.prepare_task(out_dir, size, device, spec, write_dataset, d["train"], d["test"], d["in_ops"],
                                 d["ood_ops"], corpus=corpus)
    return {**shared, "baseline": polynomial.baseline(shared["dataset"]["paths"])}


def jobs(size: str, seeds: list) -> list:
    # One job per (seed, variant), each pretraining its own checkpoint: the two n = 4 jobs of a seed train the
    # same pretraining (same config, seed and data order; equal up to floating-point non-determinism on a GPU)
    # instead of sharing one, so that the three finetunes of a seed run side by side, none waiting for another.
    return [{"pretrain_n": n, "n_prime": n_prime, "seed": seed} for seed in seeds for n, n_prime in VARIANTS]


def job_trainings(job: dict, spec: dict) -> list:
    """(num_layers, n, steps, tokens per step, hidden) of the pretraining and the finetune a job runs."""
    hidden, layers, _ = spec["model"]
    pre_batch, pre_seq = pretraining_shape(spec)
    return [(layers, job["pretrain_n"], spec["pretrain_iters"], pre_batch * pre_seq, hidden),
            (layers, job["pretrain_n"], spec["finetune_iters"], spec["batch"] * spec["seq"], hidden)]


def pretraining_shape(spec: dict) -> tuple:
    """(micro-batch, sequence length) of the code pretraining: code wants a longer context than the task's
    short expressions; by default the finetuning's."""
    return spec.get("pretrain_batch", spec["batch"]), spec.get("pretrain_seq", spec["seq"])


def run_job(job: dict, shared: dict) -> dict:
    spec = shared["spec"]
    hidden, layers, heads = spec["model"]
    n, n_prime, seed = job["pretrain_n"], job["n_prime"], job["seed"]
    base = {**common.model_overrides(hidden, layers, heads), **common.device_overrides(shared["device"]),
            "mtp.n_heads": n, "data.seq_length": spec["seq"], "train.seed": seed,
            "data.cache_dir": os.path.join(shared["out_dir"], "cache")}
    name = f"n{n}-nprime{n_prime}-s{seed}"
    pre_dir = os.path.join(shared["out_dir"], "runs", f"pretrain-{name}")
    pre_batch, pre_seq = pretraining_shape(spec)
    pre = common.train_model("finetune", pre_dir, {**base, "data.paths": [shared["corpus"]["train_prefix"]],
                                                   **common.schedule_overrides(spec, "pretrain_iters"),
                                                   "train.micro_batch_size": pre_batch, "data.seq_length": pre_seq})
    ft_dir = os.path.join(shared["out_dir"], "runs", f"finetune-{name}")
    weights = None if n_prime == n else [1.0] + [0.0] * (n - 1)
    summary = common.train_model("finetune", ft_dir, {
        **base, "data.paths": [shared["train_prefix"]], **common.schedule_overrides(spec, "finetune_iters"),
        "checkpoint.load": os.path.join(pre_dir, "checkpoints"), "checkpoint.finetune": True,
        "mtp.loss_weights": weights})
    return {"pretrain_loss_head_1": pre["last"].get("loss_head_1"), "final_loss_head_1": summary["last"].get("loss_head_1"),
            "baseline": shared["baseline"], **polynomial.evaluate_run(ft_dir, shared)}


def summarize(results: list, shared: dict) -> dict:
    rows = []
    for pre_n, n_prime in VARIANTS:
        runs = [r for r in common.ok_runs(results) if (r["job"]["pretrain_n"], r["job"]["n_prime"]) == (pre_n, n_prime)]
        if runs:
            rows.append({"pretrain_n": pre_n, "n_prime": n_prime, "seeds": [r["job"]["seed"] for r in runs],
                         "pretrain_loss_head_1": common.mean_std([r["pretrain_loss_head_1"] for r in runs]),
                         "in_domain": polynomial.summarize_split(runs, "in_domain"),
                         "out_of_domain": polynomial.summarize_split(runs, "out_of_domain"),
                         "by_op": polynomial.summarize_by_op(runs),
                         "loss_head_1": common.mean_std([r["final_loss_head_1"] for r in runs])})
    return {"rows": rows, "baseline": polynomial.run_baseline(results)}


def table(summary: dict) -> str:
    lines = ["| pretraining n | finetuning n' | seeds | pretraining loss head 1 | in-domain exact match (%) | "
             "in-domain digits (%) | out-of-domain exact match (%) | out-of-domain digits (%) | "
             "in-domain exact by operation (mean %) | finetuning loss head 1 |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in summary["rows"]:
        lines.append(f"| {r['pretrain_n']} | {r['n_prime']} | {len(r['seeds'])} | "
                     f"{common.fmt(r['pretrain_loss_head_1'], 3)} | {polynomial.split_cells(r['in_domain'])} | "
                     f"{polynomial.split_cells(r['out_of_domain'])} | {polynomial.by_op_cell(r.get('by_op', {}))} | "
                     f"{common.fmt(r['loss_head_1'], 3)} |")
    return "\n".join(lines) + polynomial.baseline_line(summary.get("baseline"))


def plot(summary: dict, out_dir: str) -> list:
    plt = common.pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 4))
    rows = summary["rows"]
    labels = [f"n={r['pretrain_n']}, n'={r['n_prime']}" for r in rows]
    for j, (key, title) in enumerate((("in_domain", "in-domain"), ("out_of_domain", "out-of-domain"))):
        xs = [i + (j - 0.5) * 0.38 for i in range(len(rows))]
        ax.bar(xs, [100 * (r[key]["exact"]["mean"] or 0) for r in rows], 0.38,
               yerr=[100 * (r[key]["exact"]["std"] or 0) for r in rows], capsize=3, label=title)
    ax.set_xticks(range(len(rows)), labels)
    ax.set_ylabel("exact match (%), mean ± std over seeds")
    ax.set_title("finetuning on polynomial arithmetic after code pretraining")
    ax.grid(alpha=0.3, axis="y")
    ax.legend()
    path = common.savefig(fig, os.path.join(out_dir, "finetune.png"))
    plt.close(fig)
    return [path]
