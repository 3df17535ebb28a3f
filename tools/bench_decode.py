#!/usr/bin/env python3
"""Decoding benchmark: our plain and self-speculative decoding (k = 1..n) against transformers on the same model.

    # CPU: train the small config (~3-4 min), then benchmark
    python -m megatron_mtp.train --config configs/code_small_cpu.yaml
    python tools/bench_decode.py --load runs/code_small_cpu --device cpu

    # GPU, one command: trains configs/code_100m.yaml first when its run has no checkpoint
    python tools/bench_decode.py --train configs/code_100m.yaml --device cuda
    # byte-level n = 8, batch 1, k = 1..8
    python tools/bench_decode.py --train configs/code_100m_n8.yaml --device cuda --batch-sizes 1 --peers none \
        --tag cuda_n8
    # the bandwidth regime: the 1.1B shape with random weights, forward time for 1..k tokens vs the HBM floor
    python tools/bench_decode.py --bandwidth configs/1b.yaml --device cuda --tag cuda_1b

Prompts are windows of the held-out files of the stdlib code corpus (``ensure_stdlib_corpus``), cut at
line starts. Every row decodes the same prompts greedily to a fixed budget (no stop at EOD unless
``--stop-at-eod``), after a full untimed warm-up run of that very row (graph capture, compilation, caches).

Rows: ours at every batch size and k; then, at batch 1 on the model exported to HuggingFace
(``megatron_mtp.checkpoint.export.export_hf``) and loaded by ``LlamaForCausalLM``, transformers'
``generate`` with its default (dynamic) cache, with ``cache_implementation="static"`` — which makes
``generate`` compile the forward with ``torch.compile(mode="reduce-overhead")``, transformers' documented
static-cache configuration — and with prompt-lookup decoding (``prompt_lookup_num_tokens``).
Results: ``benchmarks/decode_<tag>.json`` (device, date, command, rows; written after every row) and
``decode_<tag>.png``.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
from typing import Optional

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


PROMPT_POOL = 16  # held-out windows drawn per run (see main)
CALIBRATION_PROMPTS = 8  # further held-out windows whose greedy continuations choose the draft trees


def calibrate_trees(model, prompts, max_new_tokens, eod, pad, nodes: list, dynamic: list = ()) -> dict:
    """Draft trees for ``model``: its draft heads' per-rank accuracies measured on the greedy continuations of
    ``prompts`` (``inference.head_accuracy``), then for each of ``nodes`` the most probable paths
    (``DraftTree.from_accuracy``), and for each of ``dynamic`` a dynamic tree of that many nodes selected from
    ``inference.tree.DYNAMIC_CANDIDATES`` times as many candidates. Keyed by row name (``tree16``, ``dtree16``)."""
    from megatron_mtp.inference import DraftTree, continuation_accuracy

    accuracy = continuation_accuracy(model, prompts, max_new_tokens, ranks=TREE_RANKS, eod=eod, pad_id=pad)
    return {"accuracy_per_head_rank": accuracy, "calibration_prompts": len(prompts),
            "trees": {**{f"tree{n}": DraftTree.from_accuracy(accuracy, n) for n in nodes},
                      **{f"dtree{n}": DraftTree.from_accuracy(accuracy, n, dynamic=True) for n in dynamic}}}


TREE_RANKS = 8  # candidates per draft head a calibrated tree may take


def run_config(model, prompts, batch_size, k, max_new_tokens, eod, pad, generator, tree=None):
    from megatron_mtp.inference import generate

    outs, stats = [], []
    for start in range(0, len(prompts), batch_size):
        out = generate(model, prompts[start: start + batch_size], max_new_tokens, heads=k, eod=eod, pad_id=pad,
                       generator=generator, tree=tree)
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
    # The decode steps alone: wall time after the prefill per forward after the prefill's (the k-token step's
    # cost against the plain one's is what the speedup per token/forward hinges on).
    steps = sum(s.forwards - 1 for s in stats_list)
    step_s = sum(s.wall_s - s.prefill_s for s in stats_list)
    return {
        "tokens": tokens, "forwards": sum(s.forwards for s in stats_list), "wall_s": wall,
        "prefill_s": sum(s.prefill_s for s in stats_list), "ms_per_step": 1e3 * step_s / steps if steps else None,
        "tokens_per_forward": tokens / max(1, seq_forwards), "tokens_per_s": tokens / wall if wall else 0.0,
        "acceptance_per_head": {f"head_{i + 2}": (a / p if p else None)
                                for i, (a, p) in enumerate(zip(accepted, proposed))},
        "acceptance_unconditional_per_head": {f"head_{i + 2}": (a / verify if verify else None)
                                              for i, a in enumerate(accepted)},
    }


def common_prefix(a: list, b: list) -> dict:
    """How far two sets of outputs agree: identical outputs, and the mean share of each output before the
    first differing token (bf16 near-ties flip an argmax, after which the texts part ways)."""
    shares = []
    for x, y in zip(a, b):
        n = next((i for i, (u, v) in enumerate(zip(x, y)) if u != v), min(len(x), len(y)))
        shares.append(n / max(1, max(len(x), len(y))))
    return {"identical_to_plain": f"{sum(x == y for x, y in zip(a, b))}/{len(a)}",
            "common_prefix_share": sum(shares) / max(1, len(shares))}


def synchronize(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


# ---------------------------------------------------------------------------------------------------------
# Peers: transformers on the HF export of the same weights


def load_hf(export_dir: str, device: str, dtype):
    from transformers import AutoModelForCausalLM

    try:
        hf = AutoModelForCausalLM.from_pretrained(export_dir, dtype=dtype)
    except TypeError:  # transformers < 4.56 names it torch_dtype
        hf = AutoModelForCausalLM.from_pretrained(export_dir, torch_dtype=dtype)
    return hf.to(device).eval()


PEERS = {
    # name: (generate kwargs, description)
    "hf_default": ({}, "transformers generate, default (dynamic) cache"),
    "hf_static_compiled": ({"cache_implementation": "static"},
                           "transformers generate, cache_implementation='static' (generate compiles the forward "
                           "with torch.compile mode='reduce-overhead')"),
    "hf_prompt_lookup": (None, "transformers generate, prompt-lookup decoding (prompt_lookup_num_tokens)"),
}


def run_peer(hf, name: str, prompts: list, args, eod, pad) -> tuple:
    """(generated token lists, wall seconds) of one transformers configuration over ``prompts`` at batch 1."""
    import torch

    kwargs, _ = PEERS[name]
    if kwargs is None:
        kwargs = {"prompt_lookup_num_tokens": args.lookup_tokens}
    outs, wall = [], 0.0
    for prompt in prompts:
        ids = torch.tensor([prompt], device=args.device)
        synchronize(args.device)
        t0 = time.perf_counter()
        out = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=args.max_new_tokens,
                          do_sample=False, eos_token_id=eod, pad_token_id=pad, **kwargs)
        synchronize(args.device)
        wall += time.perf_counter() - t0
        outs.append(out[0, ids.size(1):].tolist())
    return outs, wall


# ---------------------------------------------------------------------------------------------------------
# The bandwidth regime


def time_call(fn, device: str, iters: int = 50, warmup: int = 5) -> float:
    """Median seconds of one ``fn()`` (a graph replay on CUDA, timed by CUDA events around each)."""
    import torch

    for _ in range(warmup):
        fn()
    times = []
    if device.startswith("cuda"):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    for _ in range(iters):
        if device.startswith("cuda"):
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def copy_bandwidth(device: str, nbytes: int = 1 << 30) -> float:
    """Device memory bandwidth in bytes/s measured by a large device-to-device copy (read + write)."""
    import torch

    src = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    t = time_call(lambda: dst.copy_(src), device, iters=20, warmup=3)
    del src, dst
    return 2 * nbytes / t


def kernel_profile(fn, device: str, steps: int = 10, top: int = 25) -> dict:
    """Where one ``fn()`` (a captured step) spends its time: torch.profiler over ``steps`` calls, the device
    kernels aggregated by name -> per step: calls, total and mean microseconds, plus the sum of kernel time
    against the step's wall time (the difference is the GPU idling between kernels: launch latency)."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    synchronize(device)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(steps):
            fn()
        end.record()
        end.synchronize()
    wall_us = 1e3 * start.elapsed_time(end) / steps
    kernels = {}
    for evt in prof.events():
        if evt.device_type != torch.autograd.DeviceType.CUDA or evt.device_time_total <= 0:
            continue
        row = kernels.setdefault(evt.name, [0, 0.0])
        row[0] += 1
        row[1] += evt.device_time_total
    rows = sorted(({"kernel": name[:120], "calls_per_step": c / steps, "us_per_step": t / steps,
                    "us_per_call": t / c} for name, (c, t) in kernels.items()), key=lambda r: -r["us_per_step"])
    busy = sum(r["us_per_step"] for r in rows)
    return {"steps": steps, "wall_us_per_step": wall_us, "kernel_us_per_step": busy,
            "kernels_per_step": sum(r["calls_per_step"] for r in rows), "top": rows[:top]}


def format_profile(title: str, prof: dict) -> str:
    lines = [f"{title}: {prof['wall_us_per_step']:.0f} us/step wall, {prof['kernel_us_per_step']:.0f} us in "
             f"{prof['kernels_per_step']:.0f} kernels ({100 * prof['kernel_us_per_step'] / max(1e-9, prof['wall_us_per_step']):.0f} % busy)",
             f"{'us/step':>8} {'calls':>6} {'us/call':>8}  kernel"]
    for r in prof["top"]:
        lines.append(f"{r['us_per_step']:>8.1f} {r['calls_per_step']:>6.1f} {r['us_per_call']:>8.2f}  {r['kernel']}")
    return "\n".join(lines)


def random_model(cfg, device: str, dtype, seed: int = 0):
    """An MTP model of ``cfg``'s shape with random weights (normal, std 0.02; norms 1), in eval mode: the
    bandwidth regime times it, and a decoder compiled on it serves a trained model of the same shape."""
    import torch

    from megatron_mtp.model.mtp_model import MTPModel

    with torch.device(device):
        model = MTPModel(cfg.model, cfg.mtp, dtype=dtype)
    g = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1:
                p.fill_(1.0)  # norms
            else:
                p.normal_(0.0, 0.02, generator=g)
    return model.eval()


# The decoder configurations --variants names: name -> (gemv, attention, layer_kernels); None is the decoder's
# default on the device (``generation.default_attention`` / ``default_layer_kernels``: the split-KV attention on
# CUDA with Triton, else sdpa; torch's layer programs). "default" is what users get.
DECODER_VARIANTS = {"default": (False, None, None), "sdpa": (False, "sdpa", "torch"),
                    "flash_decoding": (False, "flash_decoding", "torch"),
                    "triton_layers": (False, "flash_decoding", "triton"), "sdpa_triton": (False, "sdpa", "triton"),
                    "gemv": (True, "sdpa", "torch"), "flash_gemv": (True, "flash_decoding", "torch"),
                    "fused": (False, "fused", "torch"), "fused_gemv": (True, "fused", "torch"),
                    "flex": (False, "flex", "torch")}
# The decode attentions and layer programs by name (--attention, --layer-kernels, bench_decode_gpu.py's
# VARIANTS_N4), in the variants' order.
ATTENTIONS = tuple(dict.fromkeys(option[1] for option in DECODER_VARIANTS.values() if option[1]))
LAYER_KERNELS = tuple(dict.fromkeys(option[2] for option in DECODER_VARIANTS.values() if option[2]))


def decoder_options(variant: str, device: str) -> dict:
    """``decoder_for``'s keyword arguments (gemv, attention, layer_kernels) of a --variants entry on ``device``,
    the defaults resolved."""
    import torch

    from megatron_mtp.inference.generation import default_attention, default_layer_kernels

    gemv, attention, layer_kernels = DECODER_VARIANTS[variant]
    device = torch.device(device)
    return {"gemv": gemv, "attention": attention or default_attention(device),
            "layer_kernels": layer_kernels or default_layer_kernels(device)}


def counts(text: str, least: int) -> Optional[list]:
    """Comma-separated integers of at least ``least`` ("" -> []), or None where the text is not that."""
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        return None
    return values if all(v >= least for v in values) else None


def bandwidth_regime(args, command: str, save=None) -> dict:
    """Random weights of ``args.bandwidth``'s shape: per-forward time over 1..k tokens (trunk + head 1, the
    forward that verifies k tokens), the full speculative step of k heads, and plain decoding's tokens/s
    against the HBM floor: the bytes of the weights plain decoding reads per token / measured copy bandwidth.
    On CUDA, a kernel profile of the plain and the k = n step (``kernel_profile``)."""
    import torch

    from megatron_mtp.config import load_config

    cfg = load_config(args.bandwidth, [])
    dtype = getattr(torch, args.dtype) if args.dtype else torch.bfloat16
    model = random_model(cfg, args.device, dtype, args.seed)
    g = torch.Generator(device=args.device).manual_seed(args.seed + 1)
    n = cfg.mtp.n_heads
    ks = [int(k) for k in args.ks.split(",")] if args.ks else list(range(1, n + 1))
    bw = copy_bandwidth(args.device, (1 << 30) if args.device.startswith("cuda") else (1 << 26))
    size = lambda mod: sum(p.numel() * p.element_size() for p in mod.parameters())  # noqa: E731
    out_mod = model.output
    plain_bytes = (sum(size(layer) for layer in model.trunk) + size(out_mod.heads[0]) + size(out_mod.final_norm)
                   + (out_mod.output_weight.numel() * out_mod.output_weight.element_size()
                      if out_mod.output_weight is not None else size(model.embedding)))
    all_bytes = size(model)
    prompt = torch.randint(0, cfg.model.vocab_size, (1, args.prompt_tokens), generator=g, device=args.device)
    prompts = [prompt[0].tolist()]
    floor_tps = bw / plain_bytes
    variants = [v for v in (args.variants or ("gemv" if args.gemv else "default")).split(",") if v]
    options = DECODER_VARIANTS
    unknown = [v for v in variants if v not in options]
    if unknown:
        raise SystemExit(f"error: unknown --variants entry {unknown[0]!r}; choose from {', '.join(options)}.")
    results = {}
    for i, variant in enumerate(variants):
        # The first variant gets every k and token count; later ones the plain and the k = max(ks) rows.
        vks = ks if i == 0 else sorted({1, max(ks)})
        try:
            results[variant] = _bandwidth_variant(model, cfg, args, prompts, vks,
                                                  decoder_options(variant, args.device), g, full=i == 0)
        except Exception as exc:  # a later variant's failure must not lose the first one's numbers
            if i == 0:
                raise
            results[variant] = {"error": f"{type(exc).__name__}: {exc}"[:500]}
            print(f"warning: variant {variant} failed: {exc}", file=sys.stderr)
            continue
        plain = next(r for r in results[variant]["rows"] if r.get("kind") == "generate" and r["k"] == 1)
        results[variant]["plain_decode_tokens_per_s"] = plain["decode_tokens_per_s"]
        results[variant]["plain_fraction_of_floor"] = (plain["decode_tokens_per_s"] / floor_tps
                                                       if plain["decode_tokens_per_s"] else None)
        print(f"variant {variant}: plain decode {plain['decode_tokens_per_s']:.0f} tokens/s = "
              f"{100 * results[variant]['plain_fraction_of_floor']:.0f} % of the HBM floor", flush=True)
        if save is not None:  # after every variant: a run cut short keeps what it measured
            save(_bandwidth_result(args, cfg, model, dtype, bw, all_bytes, plain_bytes, ks, variants, results))
    return _bandwidth_result(args, cfg, model, dtype, bw, all_bytes, plain_bytes, ks, variants, results)


def _bandwidth_result(args, cfg, model, dtype, bw, all_bytes, plain_bytes, ks, variants, results) -> dict:
    first = results[variants[0]]
    floor_tps = bw / plain_bytes
    return {
        "mode": "bandwidth", "config": args.bandwidth, "parameters": sum(p.numel() for p in model.parameters()),
        "weights": "random (normal, std 0.02)", "dtype": str(dtype).replace("torch.", ""),
        "copy_bandwidth_GBps": bw / 1e9, "weight_bytes_all": all_bytes, "weight_bytes_plain_step": plain_bytes,
        "hbm_floor_ms_per_token": 1e3 * plain_bytes / bw, "hbm_floor_tokens_per_s": floor_tps,
        "hbm_floor_tokens_per_s_all_weights": bw / all_bytes,
        "plain_decode_tokens_per_s": first["plain_decode_tokens_per_s"],
        "plain_fraction_of_floor": first["plain_fraction_of_floor"],
        "variant": variants[0], "compiled": first["compiled"], "compile_error": first["compile_error"],
        "gemv": first["gemv"], "attention": first["attention"], "layer_kernels": first["layer_kernels"],
        "settings": {"prompt_tokens": args.prompt_tokens, "max_new_tokens": args.max_new_tokens, "ks": ks,
                     "variants": variants},
        "rows": first["rows"], "profiles": first["profiles"],
        "variants": {v: {key: val for key, val in r.items() if key != "profiles"} for v, r in results.items()},
        "variant_profiles": {v: r.get("profiles") for v, r in results.items() if v != variants[0]},
    }


def _bandwidth_variant(model, cfg, args, prompts, ks, options: dict, g, full: bool) -> dict:
    """One decoder configuration of the bandwidth regime: generate rows for ``ks``, forward times over
    1..max(ks) tokens (only 1 and max(ks) unless ``full``), the speculative steps, the kernel profiles (of the
    ``full`` variant)."""
    import torch

    from megatron_mtp.inference import SamplingParams, generate
    from megatron_mtp.inference.generation import attention_backends, decoder_for, head_logits

    n = cfg.mtp.n_heads
    rows = []
    dec = decoder_for(model, **options)
    # Plain and speculative decoding end to end (random weights: acceptance is near zero, so this times
    # the machinery, not the heads): warm, then timed.
    for k in ks:
        if k > n:
            continue
        generate(model, prompts, args.max_new_tokens, heads=k)
        synchronize(args.device)
        out = generate(model, prompts, args.max_new_tokens, heads=k)
        s = out.stats
        decode_s = s.wall_s - s.prefill_s
        rows.append({"kind": "generate", "k": k, "tokens": s.tokens, "forwards": s.forwards, "wall_s": s.wall_s,
                     "prefill_s": s.prefill_s, "tokens_per_s": s.tokens_per_s,
                     "decode_tokens_per_s": (s.tokens - 1) / decode_s if decode_s > 0 else None,
                     "ms_per_step": 1e3 * decode_s / max(1, s.forwards - 1)})
    # One forward over s tokens (trunk + head 1 unembedded at all s), and the whole speculative step with
    # s heads, each captured as a graph on the static cache holding the prompt, timed by replays.
    st = next(iter(dec._states.values()))
    cache = st.cache
    cuda = args.device.startswith("cuda")
    profiles = {}
    norm_w, eps, unembedding = dec._unembedding()
    kmax = max(k for k in ks if k <= n)
    # (and, for the first variant, the wider forwards a draft tree makes: --forward-tokens)
    sizes = sorted(set(range(1, max(ks) + 1)) | set(counts(args.forward_tokens, 1))) if full else sorted({1, max(ks)})
    with torch.no_grad(), attention_backends(torch.device(args.device)):
        for s in sizes:
            tokens = torch.randint(0, cfg.model.vocab_size, (1, s), generator=g, device=args.device)
            cache.lengths.fill_(args.prompt_tokens)

            def forward(s=s, tokens=tokens):
                h1, _ = dec._forward(st, tokens, 1)
                head_logits(h1, norm_w, eps, unembedding, cfg.model.vocab_size)

            fn = dec._capture(forward, False).replay if cuda else forward
            row = {"kind": "forward", "tokens": s, "ms": 1e3 * time_call(fn, args.device, iters=50 if cuda else 5)}
            if s <= n and s in ks:
                step = dec._graphs.get(("step",) + dec.step_key(1, st.capacity, s, SamplingParams()))
                step = step.replay if step is not None else (lambda s=s: dec.step(st, s, SamplingParams(), None))
                cache.lengths.fill_(args.prompt_tokens)
                st.done.zero_()
                st.budget.fill_(1 << 30)
                row["speculative_step_ms"] = 1e3 * time_call(step, args.device, iters=20 if cuda else 3)
                if cuda and s in (1, kmax) and args.profile and (full or s == 1):
                    try:
                        cache.lengths.fill_(args.prompt_tokens)
                        prof = kernel_profile(step, args.device)
                        prof["source"] = "CUDA graph replays"
                        if not prof["top"]:  # a profiler that does not see inside graphs: the same step uncaptured
                            cache.lengths.fill_(args.prompt_tokens)
                            prof = kernel_profile(lambda s=s: dec.step(st, s, SamplingParams(), None), args.device)
                            prof["source"] = "the step run uncaptured (graph kernels were not traced)"
                        profiles[f"step_k{s}"] = prof
                        print(format_profile(f"{dec.attention} attention, {dec.layer_kernels} layers, gemv "
                                             f"{dec.gemv}: step k={s} ({prof['source']})", prof), flush=True)
                    except Exception as exc:  # the profile explains; it must not cost the measurements
                        profiles[f"step_k{s}"] = {"error": f"{type(exc).__name__}: {exc}"[:300]}
                        print(f"warning: profile failed: {exc}", file=sys.stderr)
            rows.append(row)
    one = next(r["ms"] for r in rows if r.get("kind") == "forward" and r["tokens"] == 1)
    for r in rows:
        if r.get("kind") == "forward":
            r["x_one_token"] = r["ms"] / one
    return {"rows": rows, "profiles": profiles, "gemv": dec.gemv, "attention": dec.attention,
            "layer_kernels": dec.layer_kernels, "compiled": dec.compile and dec.compile_error is None,
            "compile_error": dec.compile_error}


# ---------------------------------------------------------------------------------------------------------
# The plot


def plot(result: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from megatron_mtp.io_utils import atomic_save_path

    if result.get("mode") == "bandwidth":
        fwd = [r for r in result["rows"] if r.get("kind") == "forward"]
        fig, ax = plt.subplots(figsize=(6, 4))
        ax.plot([r["tokens"] for r in fwd], [r["ms"] for r in fwd], "o-", label="forward (trunk + head 1)")
        spec = [r for r in fwd if "speculative_step_ms" in r]
        ax.plot([r["tokens"] for r in spec], [r["speculative_step_ms"] for r in spec], "s--",
                label="speculative step (k heads)")
        ax.axhline(result["hbm_floor_ms_per_token"], color="grey", lw=0.8, label="HBM floor (plain step)")
        ax.set_xlabel("tokens per forward")
        ax.set_ylabel("ms")
        ax.set_ylim(bottom=0)
        ax.set_title(f"{result['parameters'] / 1e9:.2f}B shape, {result['device_name']}", fontsize=9)
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
        fig.tight_layout()
        atomic_save_path(path, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
        plt.close(fig)
        return
    rows = [r for r in result["rows"] if r["decoder"] == "ours"]
    trees = [r for r in result["rows"] if r["decoder"].startswith(("ours_tree", "ours_dtree"))]
    peers = [r for r in result["rows"] if not r["decoder"].startswith("ours")]
    batch_sizes = sorted({r["batch_size"] for r in rows})
    kmax = max(r["k"] for r in rows)
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    for bs in batch_sizes:
        sel = sorted((r for r in rows if r["batch_size"] == bs), key=lambda r: r["k"])
        ax1.plot([r["k"] for r in sel], [r["tokens_per_s"] for r in sel], "o-", label=f"ours, batch {bs}")
        ax2.plot([r["k"] for r in sel], [r["speedup_vs_plain"] for r in sel], "o-", label=f"speedup, batch {bs}")
        ax2.plot([r["k"] for r in sel], [r["tokens_per_forward"] for r in sel], "x:", alpha=0.7,
                 label=f"tokens/forward, batch {bs}")
        names = sorted({r["decoder"] for r in trees}, key=lambda d: (d.startswith("ours_d"), len(d), d))
        for r in (r for r in trees if r["batch_size"] == bs):  # (one colour per tree in both panels)
            color = f"C{(2 + names.index(r['decoder'])) % 10}"
            kind = "dynamic tree" if r.get("tree_dynamic") else "tree"
            marker = "P" if r.get("tree_dynamic") else "*"
            ax1.plot([r["k"]], [r["tokens_per_s"]], marker, ms=10, color=color,
                     label=f"{kind} {r['tree_nodes']} nodes, batch {bs}")
            ax2.plot([r["k"]], [r["tokens_per_forward"]], marker, ms=10, color=color,
                     label=f"{kind} {r['tree_nodes']}: tokens/forward, batch {bs}")
    for i, r in enumerate(peers):
        ax1.axhline(r["tokens_per_s"], ls="--", lw=1, color=f"C{i + len(batch_sizes)}",
                    label=f"{r['decoder']} (batch 1)")
    ax1.set_yscale("log")
    ax1.set_xticks(list(range(1, kmax + 1)))
    ax1.set_xlabel("heads used (k)")
    ax1.set_ylabel("tokens/s")
    ax1.set_title("Throughput, same weights and prompts")
    ax1.legend(fontsize=7)
    ax1.grid(alpha=0.3)
    ax2.axhline(1.0, color="grey", lw=0.8)
    ax2.set_xticks(list(range(1, kmax + 1)))
    ax2.set_xlabel("heads used (k)")
    ax2.set_ylabel("x our plain greedy")
    ax2.set_title(f"Speedup vs k ({result['device_name']}, {result['dtype']})", fontsize=9)
    ax2.legend(fontsize=8)
    ax2.grid(alpha=0.3)
    fig.suptitle(f"Decoding: {result['model']['parameters'] / 1e6:.1f}M params, n={result['model']['n_heads']}, "
                 f"{result['date'][:10]}", fontsize=10)
    fig.tight_layout()
    atomic_save_path(path, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
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


def write_result(result: dict, output_dir: str, tag: str) -> str:
    from megatron_mtp.io_utils import atomic_write_json

    os.makedirs(output_dir, exist_ok=True)
    path = os.path.join(output_dir, f"decode_{tag}.json")
    atomic_write_json(path, result)
    return path


def print_table(result: dict) -> None:
    if result.get("mode") == "bandwidth":
        print(f"copy bandwidth {result['copy_bandwidth_GBps']:.0f} GB/s; plain step reads "
              f"{result['weight_bytes_plain_step'] / 1e9:.2f} GB -> floor "
              f"{result['hbm_floor_tokens_per_s']:.0f} tokens/s; "
              f"plain decode {result['plain_decode_tokens_per_s']:.0f} tokens/s "
              f"({100 * result['plain_fraction_of_floor']:.0f} % of the floor)")
        for r in result["rows"]:
            if r["kind"] == "forward":
                extra = f", speculative step {r['speculative_step_ms']:.3f} ms" if "speculative_step_ms" in r else ""
                print(f"forward over {r['tokens']} tokens: {r['ms']:.3f} ms ({r['x_one_token']:.3f}x one token){extra}")
            else:
                print(f"generate k={r['k']}: {r['tokens_per_s']:.0f} tokens/s, {r['ms_per_step']:.3f} ms/step")
        return
    print(f"{'decoder':>20} {'batch':>5} {'k':>2} {'tok/fwd':>7} {'tok/s':>9} {'x plain':>7} {'same':>6}  "
          f"acceptance 2..k")
    for r in result["rows"]:
        acc = " ".join(f"{v:.2f}" if v is not None else "-" for v in r.get("acceptance_per_head", {}).values())
        print(f"{r['decoder']:>20} {r['batch_size']:>5} {r['k']:>2} {(r.get('tokens_per_forward') or 0):>7.2f} "
              f"{r['tokens_per_s']:>9.1f} {(r.get('speedup_vs_plain') or 0):>6.2f}x "
              f"{r['identical_to_plain']:>6}  {acc}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--load", help="trained run directory or checkpoint")
    p.add_argument("--train", metavar="CONFIG", help="train this config first (unless its run has a checkpoint)")
    p.add_argument("--train-override", action="append", default=[], metavar="KEY=VALUE",
                   help="override for --train, e.g. train.iters=100 (repeatable)")
    p.add_argument("--bandwidth", metavar="CONFIG", help="the bandwidth regime on CONFIG's shape, random weights")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float64"], default=None,
                   help="default: bfloat16 on cuda, float32 on cpu")
    p.add_argument("--ks", default=None, help="comma-separated k values (default 1..n)")
    p.add_argument("--batch-sizes", default="1,16")
    p.add_argument("--prompts-batch1", type=int, default=4, help="prompts decoded one by one at batch 1")
    p.add_argument("--prompt-tokens", type=int, default=256)
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--repeats", type=int, default=1, help="timed runs per row (after its warm-up run)")
    p.add_argument("--peers", default=None,
                   help="comma-separated transformers rows: hf_default, hf_static_compiled, hf_prompt_lookup, or "
                        "none (default: all three on cuda, hf_default,hf_prompt_lookup on cpu)")
    p.add_argument("--gemv", action="store_true",
                   help="compile one-row matmuls as fused Triton reductions (inductor coordinate-descent tuning)")
    p.add_argument("--attention", choices=ATTENTIONS, default=None,
                   help="--load: the decode attention (default: flash_decoding on CUDA where Triton is, else sdpa; "
                        "fused: compiled products and sums; flex: FlexAttention's flash-decoding kernel; see "
                        "docs/inference.md)")
    p.add_argument("--layer-kernels", choices=LAYER_KERNELS, default=None,
                   help="--load: the decode step's layer programs (default: torch; triton: the GEMV kernels, "
                        "opt-in until timed on a GPU)")
    p.add_argument("--no-plot", action="store_true", help="write the JSON only (no PNG)")
    p.add_argument("--profile", action="store_true", help="--bandwidth on CUDA: a kernel profile of the steps")
    p.add_argument("--variants", default=None, metavar="LIST",
                   help="--bandwidth: decoder configurations to measure one after the other, of default (the "
                        "device's defaults), sdpa, flash_decoding (torch's layer programs), triton_layers (split-KV "
                        "attention and the GEMV layer kernels), sdpa_triton, gemv, flash_gemv, fused (compiled "
                        "products-and-sums attention), fused_gemv and flex (FlexAttention) (default: default, or gemv "
                        "with --gemv); the first gets every row and the profiles")
    p.add_argument("--trees", default="", metavar="NODES",
                   help="also decode with draft trees of these node counts (comma-separated, e.g. 16,32,64), each "
                        "the most probable paths of the heads' per-rank accuracies measured on the greedy "
                        "continuations of 8 other held-out windows (docs/inference.md, draft trees)")
    p.add_argument("--dynamic-trees", default="", metavar="NODES",
                   help="also decode with dynamic draft trees of these node counts: each step verifies the paths its "
                        "draft probabilities favour, from 4x as many calibrated candidates")
    p.add_argument("--forward-tokens", default="", metavar="LIST",
                   help="--bandwidth: also time one forward over these many tokens (e.g. 8,16,32,64: what a draft "
                        "tree of that many nodes costs against one token)")
    p.add_argument("--lookup-tokens", type=int, default=4, help="prompt_lookup_num_tokens of the lookup row")
    p.add_argument("--stop-at-eod", action="store_true", help="stop sequences at EOD (default: fixed budget)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--output-dir", default=os.path.join(REPO, "benchmarks"))
    p.add_argument("--tag", default=None, help="output name decode_<tag>.json (default: the device type)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    command = "python " + shlex.join([os.path.relpath(sys.argv[0], REPO) if os.path.isabs(sys.argv[0]) else sys.argv[0]]
                                     + (argv if argv is not None else sys.argv[1:]))

    import torch

    from megatron_mtp.inference import ModelLoadError, default_dtype, load_model

    if args.threads:
        torch.set_num_threads(args.threads)
    if sum(bool(x) for x in (args.load, args.train, args.bandwidth)) != 1:
        print("error: give exactly one of --load RUN, --train CONFIG and --bandwidth CONFIG.", file=sys.stderr)
        return 2
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("error: --device cuda was asked for but no CUDA device is visible; use --device cpu.", file=sys.stderr)
        return 2
    if counts(args.forward_tokens, 1) is None:
        print(f"error: --forward-tokens takes token counts like 8,16,32,64; got {args.forward_tokens!r}.",
              file=sys.stderr)
        return 2
    for name in ("prompts_batch1", "prompt_tokens", "max_new_tokens", "repeats", "lookup_tokens"):
        if getattr(args, name) < 1:
            print(f"error: --{name.replace('_', '-')} must be at least 1.", file=sys.stderr)
            return 2
    cuda = args.device.startswith("cuda")
    tag = args.tag or ("cuda" if cuda else "cpu")
    header = {
        "device": "cuda" if cuda else "cpu",
        "device_name": torch.cuda.get_device_name() if cuda else (platform.processor() or platform.machine()),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": command, "torch": torch.__version__, "threads": torch.get_num_threads(),
    }
    if args.bandwidth:
        result = {**header, **bandwidth_regime(
            args, command, save=lambda partial: write_result({**header, **partial}, args.output_dir, tag))}
        json_path = write_result(result, args.output_dir, tag)
        try:
            if not args.no_plot:
                plot(result, json_path[:-5] + ".png")
        except ImportError:
            print("matplotlib is not installed: no plot written", file=sys.stderr)
        print_table(result)
        print(f"wrote {json_path}", file=sys.stderr)
        return 0

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
    tree_nodes, dynamic_nodes = counts(args.trees, 2), counts(args.dynamic_trees, 2)
    for flag, text, sizes in (("--trees", args.trees, tree_nodes), ("--dynamic-trees", args.dynamic_trees,
                                                                    dynamic_nodes)):
        if sizes is None:
            print(f"error: {flag} takes node counts of at least 2, like 16,32,64; got {text!r}.", file=sys.stderr)
            return 2
    if (tree_nodes or dynamic_nodes) and n < 2:
        print("error: --trees needs a model with at least 2 heads.", file=sys.stderr)
        return 2
    peers = args.peers if args.peers is not None else (
        "hf_default,hf_prompt_lookup,hf_static_compiled" if cuda else "hf_default,hf_prompt_lookup")
    peers = [] if peers == "none" else peers.split(",")
    unknown = [x for x in peers if x not in PEERS]
    if unknown:
        print(f"error: unknown peer {unknown[0]!r}; choose from {', '.join(PEERS)} or none.", file=sys.stderr)
        return 2
    pad = tokenizer.pad if getattr(tokenizer, "pad", None) is not None else 0
    eod = tokenizer.eod if args.stop_at_eod else None
    # Drawn from a pool of at least PROMPT_POOL windows whatever the batch sizes: heldout_prompts spreads its
    # windows over each file by how many it draws, so a batch-1-only run would otherwise decode other prompts.
    all_prompts = heldout_prompts(cfg, tokenizer, max(batch_sizes + [args.prompts_batch1, PROMPT_POOL]),
                                  args.prompt_tokens, args.max_new_tokens)
    if tree_nodes or dynamic_nodes:  # windows of a larger draw that no timed row decodes
        more = heldout_prompts(cfg, tokenizer, len(all_prompts) + 2 * CALIBRATION_PROMPTS, args.prompt_tokens,
                               args.max_new_tokens)
        calibration = [w for w in more if w not in all_prompts][-CALIBRATION_PROMPTS:]
    prompt_sets = {bs: all_prompts[: args.prompts_batch1 if bs == 1 else bs] for bs in batch_sizes}
    gen = torch.Generator(device=args.device).manual_seed(args.seed)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model {load}: {n_params / 1e6:.1f}M parameters, n={n} ({cfg.mtp.head_type} heads), {dtype} on "
          f"{args.device}, torch threads {torch.get_num_threads()}", file=sys.stderr, flush=True)
    result = {
        **header, "dtype": str(dtype).replace("torch.", ""),
        "model": {"load": load, "parameters": n_params, "n_heads": n, "head_type": cfg.mtp.head_type,
                  "hidden_size": cfg.model.hidden_size, "num_layers": cfg.model.num_layers,
                  "vocab_size": cfg.model.vocab_size, "tokenizer": cfg.data.tokenizer_type},
        "settings": {"decoding": "greedy", "prompt_tokens": args.prompt_tokens, "max_new_tokens": args.max_new_tokens,
                     "stop_at_eod": args.stop_at_eod, "prompts_batch1": args.prompts_batch1, "repeats": args.repeats,
                     "ks": ks, "batch_sizes": batch_sizes, "peers": peers, "lookup_tokens": args.lookup_tokens,
                     "warm_up": "one full untimed run of every row before its timed runs"},
        "rows": [],
    }

    def save() -> str:
        return write_result(result, args.output_dir, tag)

    # ---- ours -----------------------------------------------------------------------------------------
    from megatron_mtp.inference.generation import decoder_for

    # generate keeps this decoder's settings
    decoder_for(model, gemv=args.gemv, attention=args.attention, layer_kernels=args.layer_kernels)
    plain_outputs, plain_rate = {}, {}  # per batch size: the plain row's outputs and tokens/s

    def ours_row(bs: int, k: int, decoder: str = "ours", label: str = "", draft=None, **extra) -> None:
        """One of our rows at batch ``bs`` (k heads, or a draft tree): the whole row once untimed (graph capture,
        compilation), then timed; recorded with its speedup over plain (the k = 1 row, measured first) and
        saved."""
        run_config(model, prompt_sets[bs], bs, k, args.max_new_tokens, eod, pad, gen, draft)  # warm-up: the whole row
        stats = []
        for _ in range(args.repeats):
            synchronize(args.device)
            outs, s = run_config(model, prompt_sets[bs], bs, k, args.max_new_tokens, eod, pad, gen, draft)
            stats += s
        heads = draft.heads if draft is not None else k
        agg = aggregate(stats, heads)
        if decoder == "ours" and k == 1:
            plain_rate[bs] = agg["tokens_per_s"]
            plain_outputs[bs] = outs
        speedup = agg["tokens_per_s"] / plain_rate[bs]
        result["rows"].append({"decoder": decoder, "batch_size": bs, "k": heads, **extra,
                               "prompts": len(prompt_sets[bs]), **agg, "speedup_vs_plain": speedup,
                               "speedup_per_token_per_forward": speedup / agg["tokens_per_forward"],
                               **common_prefix(outs, plain_outputs[bs])})
        print(f"ours batch {bs} {label or f'k {k}'}: {agg['tokens_per_s']:.1f} tokens/s, "
              f"{agg['tokens_per_forward']:.2f} tokens/forward", file=sys.stderr, flush=True)
        save()

    for bs in batch_sizes:
        for k in ks:
            ours_row(bs, k)
    if tree_nodes or dynamic_nodes:
        t0 = time.perf_counter()
        cal = calibrate_trees(model, calibration, args.max_new_tokens, eod, pad, tree_nodes, dynamic_nodes)
        result["tree_calibration"] = {"accuracy_per_head_rank": cal["accuracy_per_head_rank"],
                                      "prompts": cal["calibration_prompts"], "seconds": time.perf_counter() - t0,
                                      "trees": {name: t.spec() for name, t in cal["trees"].items()},
                                      "expected_tokens_per_forward": {
                                          name: t.expected_tokens(cal["accuracy_per_head_rank"])
                                          for name, t in cal["trees"].items() if not t.select}}
        for bs in batch_sizes:
            for name, tree in cal["trees"].items():
                ours_row(bs, 1, f"ours_{name}", tree.describe(), tree, tree_nodes=tree.nodes,
                         tree_dynamic=bool(tree.select), tree=tree.describe())
    dec = decoder_for(model)
    result["ours"] = {"cuda_graphs": dec.graphs, "compiled": dec.compile and dec.compile_error is None,
                      "gemv": dec.gemv, "attention": dec.attention, "layer_kernels": dec.layer_kernels,
                      "compile_error": dec.compile_error}

    # ---- peers: transformers on the HF export, batch 1 --------------------------------------------------
    if peers:
        import tempfile

        from megatron_mtp.checkpoint.export import export_hf

        try:
            import transformers

            result["transformers"] = transformers.__version__
            export_dir = tempfile.mkdtemp(prefix="bench_decode_hf_")
            export_hf(load, export_dir, dtype=dtype)
            hf = load_hf(export_dir, args.device, dtype)
        except Exception as exc:  # the peers are context; their failure must not lose our rows
            result["peer_error"] = f"export/load: {type(exc).__name__}: {exc}"[:500]
            print(f"warning: {result['peer_error']}", file=sys.stderr)
            peers = []
        base = prompt_sets.get(1, all_prompts[: args.prompts_batch1])
        ours_plain = plain_outputs.get(1)
        for name in peers:
            try:
                t0 = time.perf_counter()
                run_peer(hf, name, base[:1], args, eod, pad)  # warm-up (compiles the static configuration)
                if name == "hf_static_compiled":
                    run_peer(hf, name, base[:1], args, eod, pad)  # and records its CUDA graphs
                warm_s = time.perf_counter() - t0
                walls, outs = [], None
                for _ in range(args.repeats):
                    outs, wall = run_peer(hf, name, base, args, eod, pad)
                    walls.append(wall)
                tokens = sum(len(o) for o in outs) * args.repeats
                wall = sum(walls)
                result["rows"].append({
                    "decoder": name, "description": PEERS[name][1], "batch_size": 1, "k": 1, "prompts": len(base),
                    "tokens": tokens, "wall_s": wall, "tokens_per_s": tokens / wall, "warm_up_s": warm_s,
                    "speedup_vs_plain": (tokens / wall) / plain_rate[1] if 1 in plain_rate else None,
                    **(common_prefix(outs, ours_plain) if ours_plain else {"identical_to_plain": "-"}),
                })
                print(f"{name}: {tokens / wall:.1f} tokens/s (warm-up {warm_s:.0f}s)", file=sys.stderr, flush=True)
            except Exception as exc:
                result.setdefault("peer_errors", {})[name] = f"{type(exc).__name__}: {exc}"[:500]
                print(f"warning: peer {name} failed: {exc}", file=sys.stderr)
            save()
    # Ratios the targets are stated in (batch 1).
    rate = {r["decoder"] if r["decoder"] != "ours" else f"ours_k{r['k']}": r["tokens_per_s"]
            for r in result["rows"] if r["batch_size"] == 1}
    ratios = {}
    if "ours_k1" in rate:
        for name in ("hf_default", "hf_static_compiled", "hf_prompt_lookup"):
            if name in rate:
                ratios[f"ours_plain_over_{name}"] = rate["ours_k1"] / rate[name]
                for row in (key for key in rate if key.startswith("ours_") and key != "ours_k1"):  # k > 1, trees
                    ratios[f"{row}_over_{name}"] = rate[row] / rate[name]
    result["ratios_batch1"] = ratios
    json_path = save()
    png_path = None if args.no_plot else json_path[:-5] + ".png"
    try:
        if png_path:
            plot(result, png_path)
    except ImportError:
        print("matplotlib is not installed: no plot written", file=sys.stderr)
        png_path = None
    print_table(result)
    for key, value in ratios.items():
        print(f"{key}: {value:.2f}")
    print(f"wrote {json_path}" + (f" and {png_path}" if png_path else ""), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
