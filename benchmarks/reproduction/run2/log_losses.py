"""Training losses of the 2026-12-07 16:42 UTC H100 run (run 2) from its experiment logs, for the runs that
were stopped before they finished (docs/reproduction.md, "Run 2").

Every process of an experiment writes its loop's log lines into one file, so a line carries no run name; in
this run (iters, number of heads, peak memory) names each (model, n) uniquely: the table below, checked
against the finished runs' final losses in results.json. (A finetune of the n = 4 model logs four heads with
n' = 4 and with n' = 1; in this run every seed's n' = 4 finetune, which comes first, was still running when the
run was stopped, so the 4-head finetuning lines are n' = 4.) The loss is the loop's mean over its 100-step
logging window; the seeds of one (model, n) see the same schedule and their own data order.

    mkdir /tmp/run2 && tar -xzf benchmarks/reproduction/run2/repro_results.tar.gz -C /tmp/run2
    python benchmarks/reproduction/run2/log_losses.py /tmp/run2 benchmarks/reproduction/run2
writes training_losses.json and training_losses.png (needs matplotlib) into the second directory.
"""
import json
import os
import re
import statistics
import sys

GROUPS = {
    "polynomial": {(1200, 1, "0.64"): ("1.1M", 1), (1200, 2, "0.55"): ("1.1M", 2), (1200, 4, "0.35"): ("1.1M", 4),
                   (1200, 1, "1.41"): ("5.0M", 1), (1200, 2, "1.22"): ("5.0M", 2), (1200, 4, "0.83"): ("5.0M", 4)},
    "induction": {(3000, 1, "0.44"): ("0.7M", 1), (3000, 2, "0.35"): ("0.7M", 2),
                  (3000, 1, "1.00"): ("3.4M", 1), (3000, 2, "0.81"): ("3.4M", 2)},
    "bytes": {(1000, 1, "1.20"): ("8.2M", 1), (1000, 8, "0.53"): ("8.2M", 8)},
    "finetune": {(400, 1, "1.41"): ("pretrain", 1), (400, 4, "0.83"): ("pretrain", 4),
                 (800, 1, "1.41"): ("finetune (n'=n)", 1), (800, 4, "0.83"): ("finetune (n'=n)", 4)},
}
LINE = re.compile(r"^step\s+(\d+)/(\d+) \| loss \S+ \| heads ([\d. ]+) \|.* mem ([\d.]+) GiB")


def parse(path: str, groups: dict) -> dict:
    out = {}
    with open(path) as stream:
        for line in stream:
            m = LINE.match(line)
            if not m:
                continue
            step, iters, heads, mem = int(m[1]), int(m[2]), [float(v) for v in m[3].split()], m[4]
            name = groups.get((iters, len(heads), mem))
            if name is None:
                raise SystemExit(f"{path}: no (model, n) for iters {iters}, {len(heads)} heads, {mem} GiB: {line}")
            out.setdefault(f"{name[0]} n={name[1]}", {}).setdefault(step, []).append(heads)
    return out


def summary(curves: dict) -> dict:
    result = {}
    for label, steps in curves.items():
        result[label] = [{"step": s, "runs": len(v), "loss_head_1": statistics.fmean(h[0] for h in v),
                          "std": statistics.stdev([h[0] for h in v]) if len(v) > 1 else 0.0}
                         for s, v in sorted(steps.items())]
    return result


# The induction stories' entropy per byte under their own generator (megatron_mtp/tasks/induction.py, 6-12
# sentences): the loss floor of a perfect model, and the floor of one that guesses every repeated name's second
# letter (1/26): a head-1 loss below the second shows copying from the context. Computed by summing the
# generator's choices' log-probabilities over 4000 stories (docs/reproduction.md).
INDUCTION_FLOOR, NO_COPY_FLOOR = 0.42, 0.74

PANELS = (("polynomial", "polynomial arithmetic (1 op.)", None),
          ("induction", "induction stories", (INDUCTION_FLOOR, NO_COPY_FLOOR)),
          ("bytes", "byte-level code (stdlib)", None),
          ("finetune", "code pretraining, then polynomial finetuning", None))


def plot(data: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(12, 8))
    for ax, (exp, title, floors) in zip(axes.flat, PANELS):
        for label, pts in data[exp].items():
            xs = [p["step"] for p in pts]
            mean = [p["loss_head_1"] for p in pts]
            std = [p["std"] for p in pts]
            runs = max(p["runs"] for p in pts)
            line, = ax.plot(xs, mean, marker="o", ms=2, label=f"{label} ({runs} run{'s' if runs > 1 else ''})")
            ax.fill_between(xs, [m - s for m, s in zip(mean, std)], [m + s for m, s in zip(mean, std)],
                            color=line.get_color(), alpha=0.15)
        if floors:
            ax.axhline(floors[1], color="grey", ls=":", label="no-copy floor")
            ax.axhline(floors[0], color="black", ls=":", label="generator floor")
        ax.set_ylim(top=min(ax.get_ylim()[1], 2.6))
        ax.set_title(f"{title}: head-1 training loss")
        ax.set_xlabel("step")
        ax.set_ylabel("nats per byte (100-step window mean ± std)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main(root: str, out_dir: str) -> None:
    data = {exp: summary(parse(os.path.join(root, exp, f"{exp}.log"), groups)) for exp, groups in GROUPS.items()}
    with open(os.path.join(out_dir, "training_losses.json"), "w") as stream:
        json.dump(data, stream, indent=1)
    plot(data, os.path.join(out_dir, "training_losses.png"))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
