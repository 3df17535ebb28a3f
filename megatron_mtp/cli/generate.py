"""Generate text from a trained MTP model, with plain or self-speculative decoding.

    mtp-generate --load runs/tiny --prompt "def fibonacci(n):" --max-new-tokens 128 --greedy
    mtp-generate --load runs/tiny --prompt-file prompts.jsonl --max-new-tokens 64 \\
        --temperature 0.8 --top-p 0.95 --speculative --heads 4 --device cuda
    mtp-generate --load runs/code_100m_n8 --prompt "def parse(" --speculative --tree 32 --device cuda

The generated text goes to stdout (one block per prompt, headed ``### prompt i`` when there are several);
statistics — tokens per forward, per-head acceptance, tokens/s — go to stderr, with a tqdm progress bar.
``--compare`` also runs plain decoding (head 1 only) on the same prompts and reports the speedup.
``--tree`` verifies a draft tree of the heads' top candidates instead of one draft per head: a node
count (the tree is chosen from the heads' per-rank accuracies, measured on a plain greedy continuation of the
prompts) or explicit paths of ranks (``"0;1;0,0;1,0"``; docs/inference.md, draft trees).

``--load`` takes a training run directory, one of its ``step_*`` checkpoints (any TP/PP layout) or an
exported HuggingFace directory. ``--prompt-file``: a ``.jsonl`` file gives one prompt per line (field
``prompt`` or ``text``); any other file is one prompt. ``--prompt`` may be repeated.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import torch

from megatron_mtp.errors import InputError, UserError, report
from megatron_mtp.inference import SamplingParams, default_dtype, generate, load_model
from megatron_mtp.inference.generation import _Programs, decoder_for
from megatron_mtp.inference.tree import describe_accuracy, tree_for, tree_option


def read_prompts(args) -> list:
    prompts = list(args.prompt or [])
    if args.prompt_file:
        if not os.path.isfile(args.prompt_file):
            raise InputError(f"prompt file {args.prompt_file!r} does not exist.")
        with open(args.prompt_file, encoding="utf-8") as f:
            if args.prompt_file.endswith(".jsonl"):
                for n, line in enumerate(f, 1):
                    if not line.strip():
                        continue
                    try:
                        record = json.loads(line)
                    except json.JSONDecodeError:
                        raise InputError(f"line {n} of {args.prompt_file} is not JSON.") from None
                    text = record.get("prompt", record.get("text")) if isinstance(record, dict) else None
                    if not isinstance(text, str):
                        raise InputError(f"line {n} of {args.prompt_file} has no string field 'prompt' or 'text'.")
                    prompts.append(text)
            else:
                prompts.append(f.read())
    if not prompts:
        raise InputError("give a prompt with --prompt TEXT or --prompt-file FILE.")
    return prompts


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--load", required=True, help="run directory, step_* checkpoint or exported HF directory")
    p.add_argument("--prompt", action="append", help="prompt text (repeatable)")
    p.add_argument("--prompt-file", help=".jsonl (one prompt per line) or a text file (one prompt)")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--greedy", action="store_true", help="greedy decoding (the default without --temperature)")
    p.add_argument("--temperature", type=float, default=None, help="sample at this temperature")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--speculative", action="store_true", help="self-speculative decoding with the MTP heads")
    p.add_argument("--heads", type=int, default=None, help="heads used by --speculative (default: all n)")
    p.add_argument("--tree", default=None, metavar="NODES|PATHS",
                   help="with --speculative: verify a draft tree of NODES nodes, chosen from the heads' "
                        "accuracies on a plain greedy continuation of the prompts, or the tree of explicit PATHS "
                        "like '0;1;0,0;1,0' (ranks of heads 2, 3, ..)")
    p.add_argument("--dynamic-tree", action="store_true",
                   help="with --tree NODES: each step verifies the NODES paths its own draft probabilities favour, "
                        "from 4x as many calibrated candidates (a few percent more tokens per forward)")
    p.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float64"], default=None,
                   help="weights dtype (default: bfloat16 on cuda, float32 on cpu)")
    p.add_argument("--batch-size", type=int, default=16, help="prompts decoded together")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-stop-at-eod", action="store_true", help="keep generating past end-of-document")
    p.add_argument("--compare", action="store_true", help="also run plain decoding and report the speedup")
    p.add_argument("--no-compile", action="store_true",
                   help="on a GPU, capture CUDA graphs of the uncompiled step: no compile wait per new batch size "
                        "or --heads (tens of seconds), slower steps; for a few short generations")
    p.add_argument("--attention", choices=list(_Programs.ATTENTIONS), default=None,
                   help="the decode attention (default: flash_decoding on a GPU where Triton is, else sdpa; "
                        "docs/inference.md, The decoder)")
    p.add_argument("--layer-kernels", choices=list(_Programs.LAYER_KERNELS), default=None,
                   help="a decode step's layer programs: torch (cuBLAS GEMMs, the default) or triton (four GEMV "
                        "kernels a layer, opt-in until timed on a GPU)")
    p.add_argument("--no-progress", action="store_true")
    return p


def run(args) -> int:


    if args.greedy and args.temperature is not None:
        raise InputError("--greedy and --temperature exclude each other.")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise InputError("--device cuda was asked for but no CUDA device is visible; use --device cpu.")
    if args.max_new_tokens < 1:
        raise InputError("--max-new-tokens must be at least 1.")
    if args.batch_size < 1:
        raise InputError(f"--batch-size must be at least 1, got {args.batch_size}.")
    sampling = (SamplingParams(greedy=True) if args.temperature is None else
                SamplingParams(greedy=False, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p))
    prompts = read_prompts(args)
    dtype = getattr(torch, args.dtype) if args.dtype else default_dtype(args.device)
    cfg, model, tokenizer = load_model(args.load, device=args.device, dtype=dtype)
    n = cfg.mtp.n_heads
    heads = 1
    if args.speculative:
        heads = n if args.heads is None else args.heads  # 0 is an error, not "all heads"
        if not 1 <= heads <= n:
            raise InputError(f"--heads must lie in 1..{n} (this model has {n} heads), got {heads}.")
    elif args.heads is not None:
        raise InputError("--heads needs --speculative.")
    tree_option(args.tree, args.dynamic_tree, args.speculative)  # a malformed tree is reported before any decoding
    try:  # the decoder options checked once, before any decoding: one sentence if this machine lacks them
        decoder_for(model, compile=False if args.no_compile else None, attention=args.attention,
                    layer_kernels=args.layer_kernels)
    except ValueError as exc:
        raise InputError(f"{exc}") from None
    eod = None if args.no_stop_at_eod else tokenizer.eod
    pad = tokenizer.pad if getattr(tokenizer, "pad", None) is not None else 0
    encoded = [tokenizer.encode(p) or [tokenizer.eod] for p in prompts]
    print(f"model: {n} heads ({cfg.mtp.head_type}), {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M "
          f"parameters, {dtype} on {args.device}; {sampling.describe()}; "
          f"{'speculative with %d heads' % heads if heads > 1 else 'plain decoding'}", file=sys.stderr)

    def decode_all(k: int, seed: int, progress: bool = not args.no_progress, tree=None):
        gen = torch.Generator(device=args.device).manual_seed(seed)
        texts, stats = [], []
        for start in range(0, len(encoded), args.batch_size):
            out = generate(model, encoded[start: start + args.batch_size], args.max_new_tokens, sampling,
                           heads=1 if tree else k, eod=eod, pad_id=pad, generator=gen, progress=progress,
                           compile=False if args.no_compile else None, tree=tree)
            texts += [tokenizer.decode(t) for t in out.tokens]
            stats.append(out.stats)
        return texts, stats

    tree = None
    if args.tree is not None:
        tree = tree_for(model, args.tree, encoded[: args.batch_size], heads, args.dynamic_tree,
                        min(args.max_new_tokens, 64), lambda acc: print(describe_accuracy(acc), file=sys.stderr),
                        eod=eod, pad_id=pad, compile=False if args.no_compile else None)
        print(f"draft tree: {tree.describe()}; paths {tree.spec()}", file=sys.stderr)
    if args.compare:
        # Time warm decoders: the first call of each captures its CUDA graphs (and compiles) and fills
        # allocator caches; without this the speedup would compare a cold run against a warm one.
        decode_all(1, args.seed, progress=False)
        decode_all(heads, args.seed, progress=False, tree=tree)
    texts, stats = decode_all(heads, args.seed, tree=tree)
    for i, text in enumerate(texts):
        if len(texts) > 1:
            sys.stdout.write(f"### prompt {i}\n")
        sys.stdout.write(text + "\n")
    sys.stdout.flush()
    for s in stats:
        print(s.summary(), file=sys.stderr)
    if args.compare:
        plain_texts, plain_stats = decode_all(1, args.seed)
        spec_rate = sum(s.tokens for s in stats) / sum(s.wall_s for s in stats)
        plain_rate = sum(s.tokens for s in plain_stats) / sum(s.wall_s for s in plain_stats)
        same = sum(a == b for a, b in zip(texts, plain_texts))
        what = f"{'dynamic ' if tree.select else ''}draft tree of {tree.nodes} nodes" if tree else f"{heads} heads"
        print(f"plain decoding: {plain_rate:.1f} tokens/s; speculative ({what}): {spec_rate:.1f} tokens/s; "
              f"speedup {spec_rate / plain_rate:.2f}x; {same}/{len(texts)} outputs identical to plain"
              f"{'' if sampling.greedy else ' (sampling: equal in distribution, not sample by sample)'}",
              file=sys.stderr)
    return 0


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)

    try:
        return run(args)
    except UserError as exc:
        return report(exc)


if __name__ == "__main__":
    sys.exit(main())
