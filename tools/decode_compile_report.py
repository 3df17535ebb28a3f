"""How many compilations a compiled decoder costs, per step program and per decoded shape.

Builds a small random MTP model, decodes with ``Decoder(graphs=False, compile=True)`` the (batch, heads,
greedy/sampling) shapes a benchmark walks through, and prints, for each shape, the wall time of its first
(cold) and second (warm) call and which step programs compiled anew. Dynamo decides the guards and hence the
recompilations, whatever the device and backend, so this runs on a CPU; ``--backend eager`` skips code
generation and shows the counts alone in seconds, ``inductor`` (the default) also times the compiler.

It is also the check that a torch version compiles the step at all: every greedy shape's tokens are compared
with the uncompiled decoder's, and the exit status is 1 when they differ or the compile failed (the decoder
then warns and falls back to its uncompiled step, which a benchmark would silently time). Run it under the
GPU machine's torch before spending device time on a decoding benchmark (docs/inference.md).

    PYTHONPATH=$PWD python3 tools/decode_compile_report.py [--backend eager] [--json out.json]
    TORCH_LOGS=recompiles PYTHONPATH=$PWD python3 tools/decode_compile_report.py  # and why each recompiled
"""
from __future__ import annotations

import argparse
import platform
import sys
import time

import torch
import torch._dynamo
from torch._dynamo.eval_frame import _debug_get_cache_entry_list

from megatron_mtp.config import ModelConfig, MTPConfig
from megatron_mtp.inference import SamplingParams, generate
from megatron_mtp.inference import generation
from megatron_mtp.io_utils import atomic_write_json
from megatron_mtp.model import transformer
from megatron_mtp.model.mtp_model import MTPModel
from megatron_mtp.parallel.layers import initialize_parameters

# (batch, heads, greedy): plain and speculative at batch 1, then a second batch size, then sampling.
SHAPES = [(1, 1, True), (1, 2, True), (1, 3, True), (1, 4, True), (16, 1, True), (16, 4, True),
          (1, 1, False), (1, 4, False), (16, 4, False), (4, 2, True), (4, 3, False)]

PROGRAMS = {"qkv": transformer.decode_qkv, "mlp": transformer.decode_mlp, "inputs": generation.step_inputs,
            "tail": generation.greedy_tail, "commit": generation.commit, "tree_inputs": generation.tree_inputs,
            "tree_verify": generation.tree_verify, "compact": generation.compact_slots,
            "select": generation.select_nodes,
            "attention": transformer.decode_attention_fused, "attention_flex": generation.decode_attention_flex}


def compiled_graphs() -> dict:
    """Per step program, the graphs dynamo holds for its code object (one per compilation)."""
    return {name: len(_debug_get_cache_entry_list(fn.__code__)) for name, fn in PROGRAMS.items()}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", default="inductor", help="torch.compile backend (inductor, aot_eager, eager)")
    parser.add_argument("--attention", default="sdpa", choices=["sdpa", "fused", "flex"])
    parser.add_argument("--new-tokens", type=int, default=8)
    parser.add_argument("--json", help="also write the table here")
    args = parser.parse_args(argv)

    if args.backend != "inductor":
        compile_ = torch.compile
        torch.compile = lambda fn, **kw: compile_(fn, **{**kw, "backend": args.backend, "options": None})
    torch._dynamo.reset()
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=64, hidden_size=32, num_layers=2, num_attention_heads=4, num_kv_heads=2,
                      ffn_hidden_size=64, make_vocab_size_divisible_by=8)
    model = MTPModel(cfg, MTPConfig(n_heads=4), dtype=torch.float32)
    initialize_parameters(model, 0)
    model.eval()
    decoder = generation.decoder_for(model, graphs=False, compile=True, attention=args.attention)

    rows, before, start = [], compiled_graphs(), time.perf_counter()
    for b, k, greedy in SHAPES:
        g = torch.Generator().manual_seed(b * 10 + k)
        prompts = [torch.randint(0, cfg.vocab_size, (3 + (i * 5) % 9,), generator=g).tolist() for i in range(b)]
        sampling = SamplingParams() if greedy else SamplingParams(greedy=False, temperature=0.8)
        times = []
        for _ in range(2):
            t = time.perf_counter()
            out = generate(model, prompts, args.new_tokens, sampling=sampling, heads=k, graphs=False, compile=True,
                           generator=torch.Generator().manual_seed(0))
            times.append(time.perf_counter() - t)
        # Greedy speculative decoding in fp32 emits plain greedy's tokens, compiled or not.
        same = (out.tokens == generate(model, prompts, args.new_tokens, graphs=False, compile=False).tokens
                if greedy else None)
        now = compiled_graphs()
        new = {n: now[n] - before[n] for n in now if now[n] != before[n]}
        before = now
        rows.append({"batch": b, "heads": k, "greedy": greedy, "first_s": times[0], "second_s": times[1],
                     "new_compilations": new, "tokens_equal_uncompiled": same})
        print(f"batch {b:2d} k={k} {'greedy  ' if greedy else 'sampling'}  first {times[0]:6.2f} s  "
              f"second {times[1]:5.2f} s  compiled: {new or '-'}"
              f"{'' if same is None else '  tokens ' + ('= uncompiled' if same else 'DIFFER from uncompiled')}",
              flush=True)
    total = compiled_graphs()
    total_s = time.perf_counter() - start
    print(f"graphs per program: {total}; {sum(total.values())} compilations, {total_s:.1f} s in all")
    failed = [r for r in rows if r["tokens_equal_uncompiled"] is False]
    ok = decoder.compile_error is None and not failed
    print(f"torch {torch.__version__}: " + ("the compiled step works" if ok else
          f"the compiled step does NOT work: compile error {decoder.compile_error!r}, {len(failed)} shapes differ"))
    if args.json:
        atomic_write_json(args.json, {"device": platform.processor() or platform.machine(), "torch": torch.__version__,
                                      "backend": args.backend, "attention": args.attention,
                                      "command": " ".join(sys.argv),
                                      "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "rows": rows,
                                      "graphs_per_program": total, "total_s": total_s,
                                      "compile_error": decoder.compile_error, "ok": ok})
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
