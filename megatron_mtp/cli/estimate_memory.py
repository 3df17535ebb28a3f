"""Per-GPU memory of a training config, and the parallel layouts that fit (the memory planner).

    mtp-estimate-memory --config configs/7b.yaml --gpus-per-node 8 --gpu-memory-gib 80
    mtp-estimate-memory --config configs/13b.yaml --gpus-per-node 8 --gpu-memory-gib 80 --recommend
    mtp-estimate-memory --config configs/1b.yaml --gpus 1 --precision bf16_master --compile
    mtp-estimate-memory --config configs/7b.yaml --recommend --nodes 4 --parallel.tp 4   (overrides)

Without --recommend it prints the config's own layout: every part of the heaviest pipeline stage (model states,
activations, in-flight micro-batches, the heads' buffers) and whether it fits. With --recommend it enumerates
TP (within a node) x PP x ZeRO x micro-batch x activation checkpointing for the GPUs given and prints the layouts
that fit with headroom, best throughput proxy first (see megatron_mtp/training/memory_model.py for the formulas,
docs/benchmarks.md for their validation against measured peaks).
"""
from __future__ import annotations

import argparse
import json
import sys

from megatron_mtp.cli import HelpFormatter
from megatron_mtp.config import load_config
from megatron_mtp.errors import InputError, UserError, report
from megatron_mtp.data.tokenizers import resolve_config_tokenizer
from megatron_mtp.training import memory_model as mm


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    ap.add_argument("--config", required=True, help="YAML config (configs/7b.yaml, ...)")
    ap.add_argument("--gpus-per-node", type=int, default=8, help="GPUs per node (TP stays within a node)")
    ap.add_argument("--nodes", type=int, default=1, help="nodes")
    ap.add_argument("--gpus", type=int, default=None, help="total GPUs; None = nodes x gpus-per-node")
    ap.add_argument("--gpu-memory-gib", type=float, default=80.0, help="memory of one GPU")
    ap.add_argument("--headroom", type=float, default=0.10, help="fraction of usable memory kept free")
    ap.add_argument("--reserved-gib", type=float, default=2.5, help="CUDA context, NCCL and cuBLAS buffers")
    ap.add_argument("--precision", default=None, choices=["autocast", "bf16_master", "ds_bf16", "fp32"],
                    help="override the regime the engines would pick")
    ap.add_argument("--compile", action="store_true", help="layers compiled (train.compile)")
    ap.add_argument("--recommend", action="store_true", help="list the layouts that fit, best first")
    ap.add_argument("--limit", type=int, default=15, help="layouts listed by --recommend")
    ap.add_argument("--json", default=None, help="also write the result as JSON here")
    args, overrides = ap.parse_known_args(argv)
    try:
        cfg = load_config(args.config, overrides)
        if cfg.model.vocab_size is None:  # a config that takes its vocabulary from its tokenizer
            resolve_config_tokenizer(cfg)
        gpus = args.gpus or args.nodes * args.gpus_per_node
        if gpus % (cfg.parallel.tp * cfg.parallel.pp):
            raise InputError(f"{gpus} GPUs do not divide into parallel.tp x parallel.pp = {cfg.parallel.tp} x "
                             f"{cfg.parallel.pp}; pass --gpus or change the layout.")
    except UserError as exc:
        return report(exc)
    if args.compile:
        cfg.train.compile = True
    m = cfg.model
    budget = (args.gpu_memory_gib - args.reserved_gib) * (1 - args.headroom)
    print(f"{args.config}: {m.num_layers} layers (n={cfg.mtp.n_heads} {cfg.mtp.head_type} heads), d={m.hidden_size}, "
          f"ffn={m.ffn_size}, heads {m.num_attention_heads}/{m.kv_heads} kv, vocab {m.vocab_size}, "
          f"seq {cfg.data.seq_length}; {gpus} GPUs x {args.gpu_memory_gib:g} GiB "
          f"(usable {budget:.1f} GiB after {args.reserved_gib:g} GiB reserved and {100 * args.headroom:.0f}% headroom)")
    result = {"config": args.config, "gpus": gpus, "gpu_memory_gib": args.gpu_memory_gib, "usable_gib": budget}

    layout = mm.layout_from_config(cfg, gpus, precision=args.precision)
    stages = mm.estimate(cfg, layout)
    worst = max(stages, key=lambda s: s.total)
    print(f"\nconfigured layout: {layout.describe()} grad_accum {layout.grad_accum}, precision {layout.precision}, "
          f"{'compiled' if layout.compiled else 'eager'}{', fp8 linears' if layout.fp8 else ''}")
    print(f"{'stage':>5} {'params/GPU':>11} {'phase':>15} {'total GiB':>10}  parts (GiB)")
    for st in stages:
        parts = ", ".join(f"{k} {v / mm.GiB:.2f}" for k, v in sorted(st.bytes.items(), key=lambda kv: -kv[1]))
        print(f"{st.stage:>5} {st.params / 1e6:>10.0f}M {st.phase:>15} {st.total / mm.GiB:>10.2f}  {parts}")
    fits = worst.total / mm.GiB <= budget
    print(f"peak {worst.total / mm.GiB:.2f} GiB on stage {worst.stage}: "
          + ("fits." if fits else f"does NOT fit in {budget:.1f} GiB."))
    result["configured"] = {"layout": mm.asdict_layout(layout), "peak_gib": worst.total / mm.GiB, "fits": fits,
                            "stages": [{"stage": s.stage, "phase": s.phase, "params": s.params,
                                        "gib": {k: v / mm.GiB for k, v in s.bytes.items()}} for s in stages]}

    if args.recommend:
        rows = mm.recommend(cfg, gpus, args.gpu_memory_gib, gpus_per_node=args.gpus_per_node,
                            headroom=args.headroom, reserved_gib=args.reserved_gib, limit=args.limit)
        print(f"\nrecommended layouts for {gpus} GPUs ({args.nodes} node(s) x {args.gpus_per_node}), global batch "
              f"{cfg.train.global_batch_size} x {cfg.data.seq_length} tokens, best throughput proxy first:")
        hdr = f"{'#':>2} {'tp':>3} {'sp':>3} {'pp':>3} {'dp':>4} {'zero':>4} {'mb':>3} {'accum':>5} {'ckpt':>8} " \
              f"{'precision':>9} {'peak GiB':>8} {'free GiB':>8} {'proxy':>6}"
        print(hdr)
        print("-" * len(hdr))
        for i, r in enumerate(rows, 1):
            lay = r["layout"]
            print(f"{i:>2} {lay.tp:>3} {'y' if lay.sequence_parallel else '-':>3} {lay.pp:>3} {lay.dp:>4} "
                  f"{lay.zero_stage:>4} {lay.micro_batch:>3} {lay.grad_accum:>5} {lay.activation_checkpointing:>8} "
                  f"{lay.precision:>9} {r['peak_gib']:>8.1f} {r['headroom_gib']:>8.1f} {r['proxy']:>6.3f}")
        if not rows:
            print("nothing fits: add GPUs or memory.")
        print("proxy: relative tokens/s per GPU from pipeline bubble, recomputation, TP efficiency and micro-batch "
              "GEMM size (a ranking aid, not a measurement). The best row per (tp, pp, zero) is shown.")
        result["recommended"] = [{"layout": mm.asdict_layout(r["layout"]), "peak_gib": r["peak_gib"],
                                  "headroom_gib": r["headroom_gib"], "proxy": r["proxy"]} for r in rows]
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
