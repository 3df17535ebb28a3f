#!/usr/bin/env python3
"""Two training runs of one model side by side (e.g. bf16 against ``train.fp8``): their loss curves and final
per-head losses from each run directory's ``metrics.jsonl``, into one JSON and optionally one plot.

"Final" is the mean over the last ``--tail`` logged records that both runs reached (each already the mean over ``logging.interval``
steps), so one noisy batch does not decide it; both runs see the same batches (same seed), so the difference
is the regime's, not the data's.

    python tools/compare_loss_runs.py runs/loss_bf16 runs/loss_fp8 --labels bf16,fp8 --output benchmarks/train_fp8_loss.json
    python tools/compare_loss_runs.py --from-json benchmarks/train_fp8_loss.json --plot docs/images/fp8_loss.png
"""
from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..")))

from megatron_mtp.io_utils import atomic_write_text  # noqa: E402
from megatron_mtp.training.metrics import read_metrics  # noqa: E402


def read_curve(run_dir: str) -> list:
    """The training records of ``run_dir`` (``read_metrics``), cut to the fields the comparison keeps."""
    kept = ("step", "loss", "tokens_per_s", "memory_gib", "grad_norm")
    return [{k: v for k, v in rec.items() if k in kept or k.startswith("loss_head_")} for rec in read_metrics(run_dir)]


def compare(curves: dict, tail: int, tolerance: float) -> dict:
    labels = list(curves)
    finals = {}
    common = min(recs[-1]["step"] for recs in curves.values())  # a run cut short: compare at the steps both reached
    for label, recs in curves.items():
        last = [r for r in recs if r["step"] <= common][-tail:]
        keys = [k for k in last[0] if k == "loss" or k.startswith("loss_head_")]
        finals[label] = {k: sum(r[k] for r in last) / len(last) for k in keys}
        finals[label]["steps"] = last[-1]["step"]
        finals[label]["tokens_per_s_mean"] = sum(r.get("tokens_per_s", 0) for r in last) / len(last)
    a, b = labels[0], labels[1]
    diffs = {k: (finals[b][k] - finals[a][k]) / finals[a][k] for k in finals[a] if k.startswith("loss")}
    # The absolute gap (nats) next to the relative one: a regime that adds the same noise to every head's logits
    # costs every head about the same nats, so the heads with the lowest loss show the largest relative gap.
    absolute = {k: finals[b][k] - finals[a][k] for k in diffs}
    return {"final_mean_of_last_records": tail, "final": finals,
            f"relative_difference_{b}_vs_{a}": diffs, f"absolute_difference_{b}_vs_{a}": absolute,
            "tolerance": tolerance, "within_tolerance": all(abs(v) <= tolerance for v in diffs.values())}


def _head_gaps(heads: dict) -> dict:
    a, b = list(heads)[:2]
    return {f"relative_difference_{b}_vs_{a}": {k: (heads[b][k] - heads[a][k]) / heads[a][k] for k in heads[a]},
            f"absolute_difference_{b}_vs_{a}": {k: heads[b][k] - heads[a][k] for k in heads[a]}}


def compare_evals(evals: dict) -> dict:
    """Per-head held-out losses of each run's final checkpoint (``mtp-eval-perplexity --output`` files), and the
    second run's differences to the first."""
    heads = {label: {f"loss_head_{h['head']}": h["loss"] for h in ev["heads"]} for label, ev in evals.items()}
    return {"heads": heads, "samples": {label: ev.get("samples") for label, ev in evals.items()}, **_head_gaps(heads)}


def compare_validation(valids: dict) -> dict:
    """Each run's last validation record (the run's own regime, e.g. FP8 GEMMs for an FP8 run) at the last step
    both validated at, and the second run's differences to the first; {} when a run never validated."""
    if len(valids) < 2 or not all(valids.values()):
        return {}
    common = min(recs[-1]["step"] for recs in valids.values())
    last = {label: [r for r in recs if r["step"] <= common] for label, recs in valids.items()}
    if not all(last.values()):
        return {}
    heads = {label: {k[len("valid_"):]: v for k, v in recs[-1].items() if k.startswith("valid_loss_head_")}
             for label, recs in last.items()}
    return {"step": common, "heads": heads, **_head_gaps(heads)}


def plot(payload: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curves = payload["curves"]
    heads = sorted(k for k in next(iter(curves.values()))[0] if k.startswith("loss_head_"))
    fig, ax = plt.subplots(figsize=(8, 4.5))
    styles = ["-", "--", ":"]
    for j, (label, recs) in enumerate(curves.items()):
        steps = [r["step"] for r in recs]
        for i, h in enumerate(heads):
            ax.plot(steps, [r[h] for r in recs], styles[j % 3], color=f"C{i}", label=f"{label} head {h[-1]}")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats/byte)")
    ax.set_title(payload.get("title", "loss per head"))
    ax.legend(ncol=2, fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", nargs="*", help="two run directories")
    ap.add_argument("--labels", default="a,b")
    ap.add_argument("--tail", type=int, default=5, help="records averaged for the final losses")
    ap.add_argument("--tolerance", type=float, default=0.01)
    ap.add_argument("--title", default=None)
    ap.add_argument("--meta", default=None, help="JSON object of extra fields (device, command, ...)")
    ap.add_argument("--output", default=None)
    ap.add_argument("--eval", default=None, help="label=path,label=path: mtp-eval-perplexity --output files of "
                    "each run's final checkpoint (e.g. both evaluated with bf16 GEMMs), compared per head")
    ap.add_argument("--from-json", default=None, help="re-read an earlier --output instead of run directories")
    ap.add_argument("--plot", default=None, help="PNG of both runs' per-head curves (needs matplotlib)")
    args = ap.parse_args(argv)
    if args.from_json:
        with open(args.from_json) as f:
            payload = json.load(f)
    else:
        if len(args.runs) != 2:
            ap.error("give two run directories (or --from-json)")
        labels = args.labels.split(",")
        curves = {label: read_curve(run) for label, run in zip(labels, args.runs)}
        for label, recs in curves.items():
            if not recs:
                ap.error(f"run {label} logged no training records")
        payload = {"title": args.title or f"{labels[0]} vs {labels[1]}", "runs": dict(zip(labels, args.runs)),
                   **(json.loads(args.meta) if args.meta else {}),
                   **compare(curves, args.tail, args.tolerance), "curves": curves}
        validation = compare_validation({label: read_metrics(run, "valid") for label, run in zip(labels, args.runs)})
        if validation:
            payload["validation_own_regime"] = validation
        if args.eval:
            evals = {}
            for item in args.eval.split(","):
                label, _, path = item.partition("=")
                try:
                    with open(path) as f:
                        evals[label] = json.load(f)
                except (OSError, ValueError) as exc:
                    print(f"--eval {label}: {path} unreadable ({type(exc).__name__}); left out", file=sys.stderr)
            if len(evals) >= 2:
                payload["held_out_eval"] = compare_evals(evals)
        if args.output:
            atomic_write_text(args.output, json.dumps(payload, indent=1))
    print(json.dumps({k: v for k, v in payload.items() if k != "curves"}, indent=1))
    if args.plot:
        plot(payload, args.plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())
