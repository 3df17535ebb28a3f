"""Byte-level code (paper section 3.3): compute-matched n = 1 vs n = 8 byte models on the embedded code
corpus (the Python standard library's source). Measured: held-out bits per byte of head 1, and bytes per
forward of greedy self-speculative decoding with k = 1..8 heads (paper Table S3: 6.4x with 8 heads at 7B).
"""
from __future__ import annotations

import json
import os

from megatron_mtp.data.code_corpus import ensure_stdlib_corpus
from megatron_mtp.eval.perplexity import evaluate_perplexity, perplexity_windows
from megatron_mtp.experiments import common
from megatron_mtp.inference import generate

NS = (1, 8)
SIZES = {
    "smoke": {"max_docs": 12, "models": {"xs": (32, 9, 2)}, "iters": 4, "batch": 4, "seq": 64, "warmup": 1,
              "lr": 1e-3, "eval_windows": 4, "prompts": 2, "prompt_bytes": 16, "new_bytes": 8},
    "cpu": {"max_docs": None, "models": {"1.1M": (96, 9, 4)}, "iters": 300, "batch": 16, "seq": 128,
            "warmup": 30, "lr": 2e-3, "eval_windows": 100, "prompts": 8, "prompt_bytes": 64, "new_bytes": 64},
    "small": {"max_docs": None, "models": {"8.2M": (256, 10, 8)}, "iters": 500, "batch": 32, "seq": 256,
              "warmup": 60, "lr": 2e-3, "eval_windows": 400, "prompts": 32, "prompt_bytes": 128, "new_bytes": 128},
}


def prepare(out_dir: str, size: str, device: str) -> dict:
    spec = SIZES[size]
    corpus = ensure_stdlib_corpus(os.path.join(out_dir, "corpus"), max_docs=spec["max_docs"])
    return common.shared_state(out_dir, size, device, spec, corpus=corpus)


def jobs(size: str, seeds: list) -> list:
    return common.model_jobs(SIZES[size]["models"], NS, seeds)


job_trainings = common.model_job_trainings  # one training per (model, n, seed) job


def heldout_prompts(heldout_jsonl: str, count: int, prompt_bytes: int, tokenizer) -> list:
    """``count`` prompts of ``prompt_bytes`` bytes, evenly spaced through the held-out files (deterministic)."""
    tokens = []
    with open(heldout_jsonl) as stream:
        for line in stream:
            tokens += tokenizer.encode(json.loads(line)["text"])
    stride = max(1, (len(tokens) - prompt_bytes) // count)
    return [tokens[i * stride: i * stride + prompt_bytes] for i in range(count)]


def speculative_stats(model, tokenizer, prompts: list, new_tokens: int, n: int) -> list:
    """Greedy decoding with k = 1..n heads: bytes per forward, and whether the output equals plain decoding's
    (greedy verification is lossless, so it should, up to floating-point ties)."""
    plain = None
    rows = []
    for k in range(1, n + 1):
        out = generate(model, prompts, max_new_tokens=new_tokens, heads=k, eod=tokenizer.eod, pad_id=tokenizer.pad)
        plain = out.tokens if k == 1 else plain
        same = sum(a == b for a, b in zip(out.tokens, plain)) / len(prompts)
        rows.append({"k": k, "bytes_per_forward": out.stats.tokens_per_forward, "same_as_plain": same,
                     "acceptance": out.stats.acceptance})
    return rows


def run_job(job: dict, shared: dict) -> dict:
    spec = shared["spec"]
    hidden, layers, heads = spec["models"][job["model"]]
    run_dir = os.path.join(shared["out_dir"], "runs", f"{job['model']}-n{job['n']}-s{job['seed']}")
    overrides = {**common.model_overrides(hidden, layers, heads), **common.device_overrides(shared["device"]),
                 "mtp.n_heads": job["n"], "data.paths": [shared["corpus"]["train_prefix"]],
                 "data.seq_length": spec["seq"], "data.cache_dir": os.path.join(shared["out_dir"], "cache"),
                 **common.schedule_overrides(spec), "train.seed": job["seed"]}
    summary = common.train_model("bytes", run_dir, overrides)
    _, model, tokenizer = common.load_trained(run_dir, shared["device"])
    windows = perplexity_windows(shared["corpus"]["heldout_prefix"], spec["seq"], max_samples=spec["eval_windows"],
                                 cache_dir=os.path.join(shared["out_dir"], "cache"))
    ppl = evaluate_perplexity(model, windows, batch_size=32, heads=job["n"])
    prompts = heldout_prompts(shared["corpus"]["heldout_jsonl"], spec["prompts"], spec["prompt_bytes"], tokenizer)
    return {"final_loss_head_1": summary["last"].get("loss_head_1"),
            "bits_per_byte_head_1": ppl["heads"][0]["bits_per_token"],
            "bits_per_byte_per_head": [h["bits_per_token"] for h in ppl["heads"]], "heldout_bytes": ppl["heads"][0]["tokens"],
            "speculative": speculative_stats(model, tokenizer, prompts, spec["new_bytes"], job["n"])}


def summarize(results: list, shared: dict) -> dict:
    rows = []
    for row, runs in common.runs_by_model_and_n(results, shared["spec"]["models"], NS):
        rows.append({**row, "bits_per_byte_head_1": common.mean_std([r["bits_per_byte_head_1"] for r in runs]),
                     "speculative": [{"k": k, **common.mean_std([r["speculative"][k - 1]["bytes_per_forward"]
                                                                   for r in runs]),
                                      "same_as_plain": common.mean_std([r["speculative"][k - 1]["same_as_plain"]
                                                                        for r in runs])}
                                     for k in range(1, row["n"] + 1)]})
    return {"rows": rows}


def table(summary: dict) -> str:
    ks = max((len(r["speculative"]) for r in summary["rows"]), default=1)
    head = " | ".join(f"k={k}" for k in range(1, ks + 1))
    lines = [f"| model | n | seeds | held-out bits/byte, head 1 | bytes per forward: {head} |",
             "|---|---|---|---|" + "---|" * ks]
    for r in summary["rows"]:
        cells = [common.fmt(s, 2) for s in r["speculative"]] + ["-"] * (ks - len(r["speculative"]))
        lines.append(f"| {r['model']} | {r['n']} | {len(r['seeds'])} | {common.fmt(r['bits_per_byte_head_1'], 3)} | "
                     + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(summary: dict, out_dir: str) -> list:
    plt = common.pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    labels, means, errs = [], [], []
    for r in summary["rows"]:
        labels.append(f"{r['model']} n={r['n']}")
        means.append(r["bits_per_byte_head_1"]["mean"] or 0)
        errs.append(r["bits_per_byte_head_1"]["std"] or 0)
        spec = [s for s in r["speculative"] if s["mean"] is not None]
        axes[1].errorbar([s["k"] for s in spec], [s["mean"] for s in spec], yerr=[s["std"] for s in spec],
                         marker="o", capsize=3, label=f"{r['model']} n={r['n']}")
    axes[0].bar(range(len(labels)), means, yerr=errs, capsize=4)
    axes[0].set_xticks(range(len(labels)), labels)
    axes[0].set_ylabel("held-out bits per byte (head 1)")
    axes[0].set_title("byte-level code: next-byte quality")
    axes[1].set_xlabel("heads used for self-speculative decoding (k)")
    axes[1].set_ylabel("bytes per forward (greedy)")
    axes[1].set_title("byte-level code: decoding speed-up")
    for ax in axes:
        ax.grid(alpha=0.3)
    axes[1].legend()
    path = common.savefig(fig, os.path.join(out_dir, "bytes.png"))
    plt.close(fig)
    return [path]
