#!/usr/bin/env python3
"""Does the GEMM autotuner's short timing window pick the kernel that is fastest under sustained load?

    python3 tools/probe_gemm_tuning.py [--out benchmarks/gemm_tuning_probe.json]

The linear cross-entropy tunes each of its three GEMMs (logits, d(hidden), d(weight)) on the first call by
timing cuBLASLt's candidates and ATen's GEMM in short windows (2 calls, 4 interleaved rounds: csrc/gemm_cuda.cu).
A short window from a cool GPU runs at boost clocks; a training step runs power-limited, where the most
energy-efficient kernel, not the fastest at boost, wins. This probe times every candidate of the benchmark's
problems (bf16, T = 8192, d = 4096, V in {32768, 131072}) both ways, the sustained way after a heat-up and in
windows of about --window-ms, and reports for each problem which candidate each way picks and how the short
window's pick fares under sustained load. Needs a GPU and the CUDA build of megatron_mtp._C.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from megatron_mtp.checkpoint.manager import atomic_write_text  # noqa: E402

try:
    from tqdm import tqdm
except ImportError:  # pragma: no cover - tqdm is a project dependency
    def tqdm(iterable, **_):
        return iterable

SHORT_CALLS, SHORT_ROUNDS = 2, 4  # the autotuner's own window (kCallsPerTiming, kTuningRounds)


def problems(T: int, d: int, V: int, device):
    """(name, out, a, b) for the cross-entropy's three products at one shape, as the op lays them out."""
    h = torch.randn(T, d, device=device, dtype=torch.bfloat16)
    w = torch.randn(V, d, device=device, dtype=torch.bfloat16) * d ** -0.5
    g = torch.randn(T, V, device=device, dtype=torch.bfloat16) * 1e-4
    yield "logits", torch.empty(T, V, device=device, dtype=torch.bfloat16), h, w.t()
    yield "d(hidden)", torch.empty(T, d, device=device, dtype=torch.bfloat16), g, w
    yield "d(weight)", torch.empty(V, d, device=device, dtype=torch.bfloat16), g.t(), h


def heat(seconds: float, device) -> None:
    """Back-to-back 8192^3 GEMMs until the GPU draws its power limit (sustained clocks)."""
    a = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    elapsed = 0.0
    while elapsed < seconds * 1e3:
        for _ in range(20):
            a @ a
        stop.record()
        stop.synchronize()
        elapsed = start.elapsed_time(stop)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=None, help="write the results here (JSON)")
    parser.add_argument("--window-ms", type=float, default=60.0, help="sustained timing window per candidate")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds of the sustained timing")
    parser.add_argument("--heat-s", type=float, default=2.0, help="heat-up before each sustained timing")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("probe_gemm_tuning.py needs a CUDA GPU")
    from megatron_mtp import _C as native
    if not native.built_with_cuda():
        raise SystemExit("megatron_mtp._C was built without CUDA: run `python3 setup.py build_ext --inplace` "
                         "where nvcc is present")
    device = torch.device("cuda")
    rows = []
    shapes = [(8192, 4096, 32768), (8192, 4096, 131072)]
    for T, d, V in shapes:
        for name, out, a, b in tqdm(list(problems(T, d, V, device)), desc=f"T={T} V={V}"):
            short = native.time_gemm_candidates(out, a, b, SHORT_CALLS, SHORT_ROUNDS)
            per_call = min(x for x in short if x != float("inf"))
            calls = max(1, round(args.window_ms / per_call))
            heat(args.heat_s, device)
            sustained = native.time_gemm_candidates(out, a, b, calls, args.rounds)
            aten = len(short) - 1
            short_pick = min(range(len(short)), key=short.__getitem__)
            sustained_pick = min(range(len(sustained)), key=sustained.__getitem__)
            rows.append(dict(T=T, d=d, V=V, problem=name, candidates=len(short) - 1, sustained_calls=calls,
                             short_ms=short, sustained_ms=sustained, short_pick=short_pick,
                             sustained_pick=sustained_pick,
                             short_pick_sustained_ms=sustained[short_pick],
                             best_sustained_ms=sustained[sustained_pick], aten_sustained_ms=sustained[aten]))
    report = dict(device=torch.cuda.get_device_name(), torch=torch.__version__,
                  date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                  command=" ".join(["python3"] + sys.argv), rows=rows)
    if args.out:
        atomic_write_text(args.out, json.dumps(report, indent=1))
    print(f"\n{report['device']}  {report['date']}  ms per call; pick = index of the fastest candidate "
          f"(last index = ATen)")
    print(f"{'V':>7} {'problem':<10} {'cands':>5} {'short pick':>10} {'sust. pick':>10} "
          f"{'short pick, sust. ms':>20} {'best sust. ms':>13} {'ATen sust. ms':>13} {'gain':>6}")
    for r in rows:
        gain = r["short_pick_sustained_ms"] / r["best_sustained_ms"] - 1
        print(f"{r['V']:>7} {r['problem']:<10} {r['candidates']:>5} {r['short_pick']:>10} {r['sustained_pick']:>10} "
              f"{r['short_pick_sustained_ms']:>20.3f} {r['best_sustained_ms']:>13.3f} {r['aten_sustained_ms']:>13.3f} "
              f"{gain:>6.1%}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
