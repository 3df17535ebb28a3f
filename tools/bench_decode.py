#!/usr/bin/env python3
"""Decoding benchmark: self-speculative decoding with k = 1..n heads against plain greedy decoding.

    # CPU: train the small config (~3-4 min), then benchmark
    python -m megatron_mtp.train --config configs/code_small_cpu.yaml
    python tools/bench_decode.py --load runs/code_small_cpu --device cpu

    # GPU, one command: trains configs/code_100m.yaml first when its run has no checkpoint
    python tools/bench_decode.py --train configs/code_100m.yaml --device cuda

Prompts are windows of the held-out files of the stdlib code corpus (``ensure_stdlib_corpus``), cut at
line starts. For every batch size (default 1 and 16) and every k, all k are run side by side (interleaved
per repeat) and the table reports tokens per forward, per-head acceptance, tokens/s and the speedup over
plain greedy (k = 1) measured in the same run, plus whether the greedy outputs equal plain greedy's.
Results: ``benchmarks/decode_<device>.json`` (device, date, command, rows) and ``decode_<device>.png``.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shlex
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def heldout_prompts(cfg, tokenizer, count: int, prompt_tokens: int, min_tail: int) -> list:
    """``count`` prompts of ``prompt_tokens`` tokens from held-out files, ending at a line start, taken
    round-robin over the files (several windows per file when there are fewer files than prompts)."""
    from megatron_mtp.data.code_corpus import ensure_stdlib_corpus
    from megatron_mtp.data.pipeline import default_cache_dir

    path = ensure_stdlib_corpus(default_cache_dir(cfg))["heldout_jsonl"]
    docs = []
    with open(path) as f:
        for line in f:
            record = json.loads(line)
            ids = tokenizer.encode(record["text"])
            if len(ids) >= prompt_tokens + min_tail:
                newline = tokenizer.encode("\n")
                starts = [i + 1 for i in range(prompt_tokens - 1, len(ids) - min_tail)
                          if ids[i: i + len(newline)] == newline]
                if starts:
                    docs.append((record.get("path", ""), ids, starts))
    if not docs:
        raise ValueError(f"no held-out file in {path} is longer than {prompt_tokens + min_tail} tokens; "
                         f"lower --prompt-tokens or --max-new-tokens.")
    docs.sort(key=lambda d: d[0])
    prompts, round_ = [], 0
    while len(prompts) < count:
        for _, ids, starts in docs:
            if len(prompts) == count:
                break
            # Spread the windows of one file over its length: window r sits at fraction (r + 0.5) / rounds.
            rounds = -(-count // len(docs))
            cut = starts[min(len(starts) - 1, int((round_ + 0.5) / rounds * len(starts)))]
            prompts.append(ids[cut - prompt_tokens: cut])
        round_ += 1
    return prompts


def run_config(model, prompts, batch_size, k, args, sampling, eod, pad, generator):
    from megatron_mtp.inference import generate

    outs, stats = [], []
    for start in range(0, len(prompts), batch_size):
        out = generate(model, prompts[start: start + batch_size], args.max_new_tokens, sampling, heads=k, eod=eod,
                       pad_id=pad, generator=generator, progress=False)
        outs += out.tokens
        stats.append(out.stats)
    return outs, stats


def aggregate(stats_list: list, k: int) -> dict:
    tokens = sum(s.tokens for s in stats_list)
    seq_forwards = sum(s.seq_forwards for s in stats_list)
    wall = sum(s.wall_s for s in stats_list)
    proposed = [sum(s.proposed[i] for s in stats_list) for i in range(k - 1)]
    accepted = [sum(s.accepted[i] for s in stats_list) for i in range(k - 1)]
    verify = sum(s.verify_steps for s in stats_list)
    return {
        "tokens": tokens, "forwards": sum(s.forwards for s in stats_list), "wall_s": wall,
        "tokens_per_forward": tokens / max(1, seq_forwards), "tokens_per_s": tokens / wall if wall else 0.0,
        "acceptance_per_head": {f"head_{i + 2}": (a / p if p else None) for i, (a, p) in enumerate(zip(accepted, proposed))},
        "acceptance_unconditional_per_head": {f"head_{i + 2}": (a / verify if verify else None)
                                              for i, a in enumerate(accepted)},
    }


def plot(result: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["rows"]
    batch_sizes = sorted({r["batch_size"] for r in rows})
    kmax = max(r["k"] for r in rows)
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    for bs in batch_sizes:
        full = [r for r in rows if r["batch_size"] == bs and r["k"] == kmax]
        if full and kmax > 1:
            acc = full[0]["acceptance_per_head"]
            heads = list(range(2, kmax + 1))
            ax1.plot(heads, [acc[f"head_{h}"] or 0 for h in heads], "o-", label=f"batch {bs}: given earlier accepted")
            unc = full[0]["acceptance_unconditional_per_head"]
            ax1.plot(heads, [unc[f"head_{h}"] or 0 for h in heads], "s--", alpha=0.6, label=f"batch {bs}: per forward")
        sel = sorted((r for r in rows if r["batch_size"] == bs), key=lambda r: r["k"])
        ax2.plot([r["k"] for r in sel], [r["speedup_vs_plain"] for r in sel], "o-", label=f"speedup, batch {bs}")
        ax2.plot([r["k"] for r in sel], [r["tokens_per_forward"] for r in sel], "x:", alpha=0.7,
                 label=f"tokens/forward, batch {bs}")
    ax1.set_xticks(list(range(2, max(kmax, 2) + 1)))
    ax1.set_xlabel("draft head")
    ax1.set_ylabel("acceptance rate")
    ax1.set_ylim(0, 1.02)
    ax1.set_title(f"Acceptance per head (k = {kmax}, greedy)")
    ax1.legend(fontsize=8)
    ax1.grid(alpha=0.3)
    ax2.axhline(1.0, color="grey", lw=0.8)
    ax2.set_xticks(sorted({r["k"] for r in rows}))
    ax2.set_xlabel("heads used (k)")
    ax2.set_ylabel("x plain greedy")
    ax2.set_title(f"Speedup vs k ({result['device']}, {result['dtype']})")
    ax2.legend(fontsize=8)
    ax2.grid(alpha=0.3)
    fig.suptitle(f"Self-speculative decoding: {result['model']['parameters'] / 1e6:.1f}M params, "
                 f"n={result['model']['n_heads']}, {result['date'][:10]}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def ensure_trained(config: str, overrides: list) -> str:
    """Train ``config`` (with overrides) unless its run directory already holds a checkpoint; return the run dir."""
    from megatron_mtp.checkpoint.manager import latest_checkpoint
    from megatron_mtp.config import load_config

    cfg = load_config(config, overrides)
    run_dir = cfg.train.run_dir if os.path.isabs(cfg.train.run_dir) else os.path.join(REPO, cfg.train.run_dir)
    root = os.path.join(run_dir, "checkpoints")
    if os.path.isdir(root) and latest_checkpoint(root):
        print(f"{run_dir} already holds a checkpoint: not training again", file=sys.stderr, flush=True)
        return run_dir
    cmd = [sys.executable, "-m", "megatron_mtp.train", "--config", config, *overrides]
    print(f"training: {shlex.join(cmd)}", file=sys.stderr, flush=True)
    t0 = time.time()
    subprocess.run(cmd + ["--train.run_dir", run_dir], check=True, cwd=REPO)
    print(f"training took {time.time() - t0:.0f}s", file=sys.stderr, flush=True)
    return run_dir


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--load", help="trained run directory or checkpoint")
    p.add_argument("--train", metavar="CONFIG", help="train this config first (unless its run has a checkpoint)")
    p.add_argument("--train-override", action="append", default=[], metavar="KEY=VALUE",
                   help="override for --train, e.g. train.iters=100 (repeatable)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float64"], default=None,
                   help="default: bfloat16 on cuda, float32 on cpu")
    p.add_argument("--ks", default=None, help="comma-separated k values (default 1..n)")
    p.add_argument("--batch-sizes", default="1,16")
    p.add_argument("--prompts-batch1", type=int, default=4, help="prompts decoded one by one at batch 1")
    p.add_argument("--prompt-tokens", type=int, default=256)
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--repeats", type=int, default=1, help="timing repeats (k interleaved within each)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--output-dir", default=os.path.join(REPO, "benchmarks"))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    command = "python " + shlex.join([os.path.relpath(sys.argv[0], REPO) if os.path.isabs(sys.argv[0]) else sys.argv[0]]
                                     + (argv if argv is not None else sys.argv[1:]))

    import torch
    from tqdm import tqdm

    from megatron_mtp.inference import ModelLoadError, SamplingParams, default_dtype, load_model

    if args.threads:
        torch.set_num_threads(args.threads)
    if bool(args.load) == bool(args.train):
        print("error: give exactly one of --load RUN and --train CONFIG.", file=sys.stderr)
        return 2
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("error: --device cuda was asked for but no CUDA device is visible; use --device cpu.", file=sys.stderr)
        return 2
    overrides = []
    for kv in args.train_override:
        if "=" not in kv:
            print(f"error: --train-override takes KEY=VALUE, got {kv!r}.", file=sys.stderr)
            return 2
        key, value = kv.split("=", 1)
        overrides += [f"--{key.lstrip('-')}", value]
    load = args.load or ensure_trained(args.train, overrides)
    dtype = getattr(torch, args.dtype) if args.dtype else default_dtype(args.device)
    try:
        cfg, model, tokenizer = load_model(load, device=args.device, dtype=dtype)
    except ModelLoadError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    n = cfg.mtp.n_heads
    ks = [int(k) for k in args.ks.split(",")] if args.ks else list(range(1, n + 1))
    if 1 not in ks:
        ks = [1] + ks
    if max(ks) > n or min(ks) < 1:
        print(f"error: --ks must lie in 1..{n}.", file=sys.stderr)
        return 2
    batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    sampling = SamplingParams(greedy=True)
    pad = tokenizer.pad if getattr(tokenizer, "pad", None) is not None else 0
    eod = tokenizer.eod
    all_prompts = heldout_prompts(cfg, tokenizer, max(batch_sizes + [args.prompts_batch1]), args.prompt_tokens,
                                  args.max_new_tokens)
    prompt_sets = {bs: all_prompts[: args.prompts_batch1 if bs == 1 else bs] for bs in batch_sizes}
    gen = torch.Generator(device=args.device).manual_seed(args.seed)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model {load}: {n_params / 1e6:.1f}M parameters, n={n} ({cfg.mtp.head_type} heads), {dtype} on "
          f"{args.device}, torch threads {torch.get_num_threads()}", file=sys.stderr)

    # Warm-up: every k once at every batch size (allocator, kernels, caches).
    for bs in batch_sizes:
        for k in ks:
            run_config(model, prompt_sets[bs][:bs], bs, k, argparse.Namespace(max_new_tokens=8), sampling, eod, pad, gen)
    runs = {(bs, k): [] for bs in batch_sizes for k in ks}
    outputs = {}
    total = len(batch_sizes) * len(ks) * args.repeats
    bar = tqdm(total=total, desc="bench_decode", unit="run", file=sys.stderr, disable=args.no_progress)
    for bs in batch_sizes:
        for rep in range(args.repeats):
            for k in ks:
                bar.set_postfix(batch=bs, k=k)
                if args.device.startswith("cuda"):
                    torch.cuda.synchronize()
                outs, stats = run_config(model, prompt_sets[bs], bs, k, args, sampling, eod, pad, gen)
                runs[(bs, k)] += stats
                outputs[(bs, k)] = outs
                bar.update(1)
    bar.close()

    rows = []
    for bs in batch_sizes:
        base = aggregate(runs[(bs, 1)], 1)
        for k in ks:
            agg = aggregate(runs[(bs, k)], k)
            same = sum(a == b for a, b in zip(outputs[(bs, k)], outputs[(bs, 1)]))
            rows.append({"batch_size": bs, "k": k, "prompts": len(prompt_sets[bs]), **agg,
                         "speedup_vs_plain": agg["tokens_per_s"] / base["tokens_per_s"] if base["tokens_per_s"] else None,
                         "identical_to_plain": f"{same}/{len(outputs[(bs, k)])}"})
    device_name = (torch.cuda.get_device_name() if args.device.startswith("cuda")
                   else (platform.processor() or platform.machine()))
    result = {
        "device": "cuda" if args.device.startswith("cuda") else "cpu",
        "device_name": device_name,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": command,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "dtype": str(dtype).replace("torch.", ""),
        "model": {"load": load, "parameters": n_params, "n_heads": n, "head_type": cfg.mtp.head_type,
                  "hidden_size": cfg.model.hidden_size, "num_layers": cfg.model.num_layers,
                  "vocab_size": cfg.model.vocab_size, "tokenizer": cfg.data.tokenizer_type},
        "settings": {"decoding": "greedy", "prompt_tokens": args.prompt_tokens, "max_new_tokens": args.max_new_tokens,
                     "prompts_batch1": args.prompts_batch1, "repeats": args.repeats, "ks": ks,
                     "batch_sizes": batch_sizes},
        "rows": rows,
    }
    os.makedirs(args.output_dir, exist_ok=True)
    json_path = os.path.join(args.output_dir, f"decode_{result['device']}.json")
    with open(json_path + ".tmp", "w") as f:
        json.dump(result, f, indent=1)
    os.replace(json_path + ".tmp", json_path)
    png_path = os.path.join(args.output_dir, f"decode_{result['device']}.png")
    try:
        plot(result, png_path)
    except ImportError:
        print("matplotlib is not installed: no plot written", file=sys.stderr)
        png_path = None

    header = f"{'batch':>5} {'k':>2} {'tok/fwd':>7} {'tok/s':>9} {'speedup':>7} {'same':>6}  acceptance per head (2..k)"
    print(header)
    for r in rows:
        acc = " ".join(f"{v:.2f}" if v is not None else "-" for v in r["acceptance_per_head"].values())
        print(f"{r['batch_size']:>5} {r['k']:>2} {r['tokens_per_forward']:>7.2f} {r['tokens_per_s']:>9.1f} "
              f"{(r['speedup_vs_plain'] or 0):>6.2f}x {r['identical_to_plain']:>6}  {acc}")
    print(f"wrote {json_path}" + (f" and {png_path}" if png_path else ""), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
