#!/usr/bin/env python3
"""Benchmark the fused linear cross-entropy against its peers on one GPU, side by side in one run.

    python3 tools/bench_cross_entropy.py [--out benchmarks/cross_entropy.json] [--quick] [--rest-ms 300]

For bf16 hidden [T, d] and unembedding [V, d] (d = 4096, V in {32768, 131072}, T in {8192, 16384}), times the
forward + backward of the mean cross-entropy (loss and both gradients) for:

* ours        megatron_mtp.ops.linear_cross_entropy at its defaults (gradients formed in the forward)
* ours-*      the same op at other settings: untuned GEMMs (MTP_GEMM_AUTOTUNE=0), the re-reading row kernel
              (MTP_CE_ROW_KERNEL=reread), recompute (8*T*d*V), fixed chunk sizes, bf16 d(weight) accumulation,
              lean (Liger's chunking and accumulation dtype), lean with untuned GEMMs
* eager       F.cross_entropy(F.linear(h, w).float(), t)
* compile     torch.compile of the same function
* liger       Liger-Kernel's LigerFusedLinearCrossEntropyLoss (when importable)
* gemms-only  diagnostic, not a peer: just ours' three chunked GEMMs (no softmax kernel, no accumulator tricks)

Each is timed with CUDA events around fwd+bwd (gradients reset to None outside the timed region), median of
--reps after --warmup, the methods interleaved in rounds of shuffled order. Memory: peak_extra =
torch.cuda.max_memory_allocated during fwd+bwd minus what was allocated before (the inputs); workspace =
peak_extra minus the bytes of the two gradients every method must return (d(hidden) and d(weight) in bf16).
The floor is 6*T*d*V FLOPs (logits, d(hidden), d(weight) GEMMs) at the bf16 matmul rate measured in the same
run on 8192^3 GEMMs, in two ways: "burst" (20 single GEMMs at the start, the GPU cool: the highest rate) and
"interleaved" (per shape, a back-to-back run of as many 8192^3 GEMMs as the floor's FLOPs, timed inside the
rounds like a method, so that it sees the same clocks, power draw and drift as the methods). ratio_to_floor uses
the burst rate; ratio_to_floor_interleaved the other. Back to back (the default) the GPU runs at its sustained,
power-limited clocks, so the burst ratio sets a rested GPU's GEMM rate against the methods on a hot one (the
strictest number); --rest-ms N idles the GPU N ms before every timed call, so methods and probe run in the
rested state the burst rate is measured in (and the two floors coincide). Each method's loss and gradients are
checked against eager's (relative error). Writes JSON (device, date, command, rows) and prints a table.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import random
import statistics
import sys
import time
import traceback

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from megatron_mtp.checkpoint.manager import atomic_write_text  # noqa: E402
from megatron_mtp.ops import extension_available, linear_cross_entropy  # noqa: E402
from megatron_mtp.ops.linear_cross_entropy import default_chunk_size, lean_chunk_size  # noqa: E402

try:
    from tqdm import tqdm
except ImportError:  # pragma: no cover - tqdm is a project dependency
    def tqdm(iterable, **_):
        return iterable

MiB = 1 << 20


# ---- methods --------------------------------------------------------------------------------------------------

def eager_loss(h, w, t):
    return F.cross_entropy(F.linear(h, w).float(), t)


def _ours_with(**kwargs):
    return lambda h, w, t: linear_cross_entropy(h, w, t, **kwargs)


class WithEnv:
    """A method run with environment switches set during its forward (where all the op's GEMMs run) -- the op
    reads MTP_GEMM_AUTOTUNE and MTP_CE_ROW_KERNEL per call, so this is an in-run A/B of what they switch."""

    def __init__(self, fn, **env):
        self.fn, self.env = fn, env

    def __call__(self, h, w, t):
        previous = {key: os.environ.get(key) for key in self.env}
        os.environ.update(self.env)
        try:
            return self.fn(h, w, t)
        finally:
            for key, value in previous.items():
                if value is None:
                    del os.environ[key]
                else:
                    os.environ[key] = value


def make_methods(args, shape):
    """name -> callable(h, w, t) returning the loss (backward is called by the harness)."""
    T, d, V = shape
    methods = {"eager": eager_loss}  # first: it is the correctness reference for the others
    if not args.no_compile:
        torch._dynamo.reset()  # a fresh static-shape compile per shape, as a user with fixed shapes would get
        methods["compile"] = torch.compile(eager_loss, dynamic=False)
    try:
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss
        liger = LigerFusedLinearCrossEntropyLoss()
        methods["liger"] = lambda h, w, t: liger(w, h, t)
    except Exception as exc:  # not installed, or does not import with this torch/triton
        print(f"liger-kernel unavailable: {type(exc).__name__}: {exc}", file=sys.stderr)
    methods["ours"] = lambda h, w, t: linear_cross_entropy(h, w, t)
    # Liger's memory budget (chunk logits ~ T x d elements) and accumulation dtype, for an equal-memory race.
    methods["ours-lean"] = _ours_with(chunk_size=lean_chunk_size(T, V, d), fp32_weight_grad=False)
    if not args.quick:
        # untuned: ATen's GEMMs (the tuning cache is keyed by the switch); reread: the row kernel that reads each
        # row twice instead of parking it in shared memory (one block's, or a cluster's for long rows)
        methods["ours-untuned"] = WithEnv(linear_cross_entropy, MTP_GEMM_AUTOTUNE="0")
        methods["ours-reread"] = WithEnv(linear_cross_entropy, MTP_CE_ROW_KERNEL="reread")
        methods["ours-recompute"] = lambda h, w, t: linear_cross_entropy(h, w, t, recompute=True)
        methods["ours-bf16acc"] = lambda h, w, t: linear_cross_entropy(h, w, t, fp32_weight_grad=False)
        default = default_chunk_size(T, V, 2, torch.device("cuda"))
        for chunk in args.chunks:
            if chunk <= T and chunk != default:
                methods[f"ours-chunk{chunk}"] = _ours_with(chunk_size=chunk)
        methods["ours-lean-untuned"] = WithEnv(methods["ours-lean"], MTP_GEMM_AUTOTUNE="0")
        methods["gemms-only"] = GemmsOnly(default)
    return methods


class GemmsOnly:
    """Diagnostic lower bound of ours' decomposition: the three chunked GEMMs and nothing else."""

    def __init__(self, chunk):
        self.chunk = chunk

    def __call__(self, h, w, t):
        return _GemmsOnly.apply(h, w, self.chunk)


class _GemmsOnly(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, w, chunk):
        T = h.shape[0]
        logits = torch.empty(min(chunk, T), w.shape[0], dtype=h.dtype, device=h.device)
        dh = torch.empty_like(h)
        dw = torch.empty(w.shape, dtype=torch.float32, device=w.device)
        for i, start in enumerate(range(0, T, chunk)):
            hc = h[start:start + chunk]
            lc = logits[:hc.shape[0]]
            torch.mm(hc, w.t(), out=lc)
            torch.mm(lc, w, out=dh[start:start + chunk])
            torch.addmm(dw, lc.t(), hc, beta=0 if i == 0 else 1, out_dtype=torch.float32, out=dw)
        ctx.grads = (dh, dw.to(w.dtype))
        return logits[0, 0].float()

    @staticmethod
    def backward(ctx, grad):
        dh, dw = ctx.grads
        return dh, dw, None


# ---- measurement ----------------------------------------------------------------------------------------------

def gemm_tflops(reps=20):
    """The burst rate: `reps` single 8192^3 GEMMs, timed one by one after 5 warm-up calls."""
    probe = GemmProbe(2 * GemmProbe.N ** 3)  # one GEMM per call
    for _ in range(5):
        probe()
    return probe.tflops(statistics.median(time_once(probe) for _ in range(reps)))


def fwd_bwd(fn, h, w, t):
    h.grad = None
    w.grad = None
    loss = fn(h, w, t)
    loss.backward()
    return loss


def prepare(fn, h, w, t, warmup):
    """Warm up (compiles, autotunes, fills the allocator cache), then one pass for peak memory and the result."""
    for _ in range(warmup):
        fwd_bwd(fn, h, w, t)
    h.grad = w.grad = None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    loss = fwd_bwd(fn, h, w, t)
    torch.cuda.synchronize()
    peak_extra = torch.cuda.max_memory_allocated() - base
    grads_bytes = h.grad.numel() * h.grad.element_size() + w.grad.numel() * w.grad.element_size()
    result = (loss.detach().float(), h.grad.detach(), w.grad.detach())
    h.grad = w.grad = None
    return peak_extra, peak_extra - grads_bytes, result


def time_once(fn, h=None, w=None, t=None):
    """CUDA-event time of fwd+bwd of method `fn` on (h, w, t), or of calling `fn()` when no inputs are given."""
    if h is not None:
        h.grad = w.grad = None
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    if h is None:
        fn()
    else:
        fwd_bwd(fn, h, w, t)
    end.record()
    end.synchronize()
    if h is not None:
        h.grad = w.grad = None
    return start.elapsed_time(end)


class GemmProbe:
    """`count` back-to-back 8192^3 bf16 GEMMs: the matmul rate under the conditions the methods run in."""

    N = 8192

    def __init__(self, flops):
        self.count = max(1, round(flops / (2 * self.N ** 3)))
        self.a = torch.randn(self.N, self.N, dtype=torch.bfloat16, device="cuda")
        self.b = torch.randn(self.N, self.N, dtype=torch.bfloat16, device="cuda")
        self.c = torch.empty(self.N, self.N, dtype=torch.bfloat16, device="cuda")

    def __call__(self):
        for _ in range(self.count):
            torch.mm(self.a, self.b, out=self.c)

    def tflops(self, ms):
        return 2 * self.N ** 3 * self.count / (ms * 1e-3) / 1e12


def time_interleaved(methods, h, w, t, reps, probe=None, rest_ms=0.0):
    """Interleaved timing: every round runs each method once, in a fresh (seeded) random order, so that clock
    and thermal drift, which moved repeated runs of one configuration by up to ~11% when methods were timed one
    after another, hits every method alike. The order is shuffled rather than rotated because under sustained
    load a method's clocks depend on its predecessor's power draw: a rotation keeps every method behind the same
    predecessor (measured: two identical configurations 4-7% apart, one always following the memory-bound Liger
    kernels). The GEMM-rate probe, if given, takes its turn like a method. The first round is discarded
    (allocator cache settling once the methods share it). With `rest_ms` > 0 the GPU idles that long before
    every timed call, so each call (and the probe) starts from the same rested state instead of from its
    predecessor's power draw -- the condition the burst rate is measured in."""
    names = list(methods) + (["gemm-probe"] if probe is not None else [])
    times = {name: [] for name in names}
    shuffler = random.Random(0)
    for rnd in tqdm(range(reps + 1), desc="timing rounds", leave=False):
        order = shuffler.sample(names, len(names))
        for name in order:
            if rest_ms > 0:
                torch.cuda.synchronize()
                time.sleep(rest_ms / 1e3)
            if name == "gemm-probe":
                elapsed = time_once(probe)
            else:
                elapsed = time_once(methods[name], h, w, t)
            if rnd > 0:
                times[name].append(elapsed)
    return times


def rel_err(a, b):
    a, b = a.float(), b.float()
    return ((a - b).norm() / b.norm().clamp(min=1e-30)).item()


# ---- main -----------------------------------------------------------------------------------------------------

def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="benchmarks/cross_entropy.json")
    parser.add_argument("--dim", type=int, default=4096)
    parser.add_argument("--vocab", type=int, nargs="+", default=[32768, 131072])
    parser.add_argument("--tokens", type=int, nargs="+", default=[8192, 16384])
    parser.add_argument("--chunks", type=int, nargs="+", default=[4096, 8192, 16384],
                        help="fixed chunk sizes for the ours-chunkN sweep rows")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--reps", type=int, default=15)
    parser.add_argument("--quick", action="store_true", help="only ours, ours-lean, eager, compile, liger")
    parser.add_argument("--rest-ms", type=float, default=0.0,
                        help="idle the GPU this long before every timed call (default 0: back to back, the GPU "
                             "at its sustained, power-limited clocks); the interleaved floor is then the rate of "
                             "rested GEMM runs")
    parser.add_argument("--no-compile", action="store_true")
    parser.add_argument("--profile", default=None,
                        help="write a torch.profiler kernel table of one fwd+bwd per shape to this file")
    parser.add_argument("--profile-methods", nargs="+", default=["ours"],
                        help="the methods --profile covers (default: ours)")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench_cross_entropy.py needs a CUDA GPU")
    if not extension_available("cuda"):
        print("WARNING: megatron_mtp._C has no CUDA kernels; 'ours' runs the pure-PyTorch path", file=sys.stderr)

    rate = gemm_tflops()
    report = {
        "device": torch.cuda.get_device_name(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join([os.path.basename(sys.executable)] + sys.argv),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "native_cuda_extension": extension_available("cuda"),
        "bf16_gemm_tflops": rate,
        "rest_ms": args.rest_ms,
        "floor": "6*T*d*V / bf16_gemm_tflops",
        "memory": "peak_extra = max_memory_allocated - allocated before (inputs); "
                  "workspace = peak_extra - bytes of d(hidden) and d(weight) (bf16)",
        "rows": [],
    }
    print(f"{report['device']}: bf16 GEMM {rate:.0f} TFLOP/s", flush=True)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)

    shapes = [(T, args.dim, V) for V in args.vocab for T in args.tokens]
    for T, d, V in shapes:
        torch.manual_seed(0)
        h = (torch.randn(T, d, device="cuda") * 0.5).to(torch.bfloat16).requires_grad_(True)
        w = (torch.randn(V, d, device="cuda") * d ** -0.5).to(torch.bfloat16).requires_grad_(True)
        t = torch.randint(0, V, (T,), device="cuda")
        floor_ms = 6 * T * d * V / (rate * 1e12) * 1e3
        methods = make_methods(args, (T, d, V))
        rows, reference, usable = {}, None, {}
        for name, fn in tqdm(list(methods.items()), desc=f"T={T} V={V} warm-up", leave=False):
            row = {"T": T, "d": d, "V": V, "method": name, "floor_ms": floor_ms}
            try:
                warmup = args.warmup + (2 if name == "compile" else 0)
                peak, workspace, result = prepare(fn, h, w, t, warmup)
                row.update(peak_extra_mib=peak / MiB, workspace_mib=workspace / MiB)
                if name == "eager":
                    reference = result
                elif reference is not None and name != "gemms-only":
                    row.update(loss_rel_err=rel_err(result[0], reference[0]),
                               dh_rel_err=rel_err(result[1], reference[1]),
                               dw_rel_err=rel_err(result[2], reference[2]))
                del result
                usable[name] = fn
            except Exception as exc:  # one failing method (OOM, missing kernel) must not lose the others
                row["error"] = f"{type(exc).__name__}: {exc}"
                traceback.print_exc()
            finally:
                h.grad = w.grad = None
            rows[name] = row
        probe = GemmProbe(6 * T * d * V)
        times = time_interleaved(usable, h, w, t, args.reps, probe, args.rest_ms)
        rate_interleaved = probe.tflops(statistics.median(times.pop("gemm-probe")))
        floor_interleaved_ms = 6 * T * d * V / (rate_interleaved * 1e12) * 1e3
        report.setdefault("bf16_gemm_tflops_interleaved", {})[f"T={T},V={V}"] = rate_interleaved
        del probe
        peers = [statistics.median(times[p]) for p in ("eager", "compile", "liger") if p in times]
        for name, row in rows.items():
            row.update(floor_interleaved_ms=floor_interleaved_ms)
            if name in times:
                median = statistics.median(times[name])
                row.update(median_ms=median, min_ms=min(times[name]), max_ms=max(times[name]),
                           ratio_to_floor=median / floor_ms,
                           ratio_to_floor_interleaved=median / floor_interleaved_ms,
                           ratio_to_best_peer=median / min(peers) if peers else None)
            report["rows"].append(row)
            print(json.dumps(row), flush=True)
        for name in (args.profile_methods if args.profile else []):
            try:
                profile_method(methods[name], h, w, t, f"{name} T={T} d={d} V={V}", args.profile)
            except Exception:
                traceback.print_exc()
        del h, w, t, reference, methods, usable
        torch.cuda.empty_cache()
        atomic_write_text(args.out, json.dumps(report, indent=1))  # after every shape: a partial run keeps its numbers

    print_table(report)
    atomic_write_text(args.out, json.dumps(report, indent=1))


def profile_method(fn, h, w, t, label, path):
    """Per-kernel CUDA time of one fwd+bwd (where the time beyond the three GEMMs goes)."""
    from torch.profiler import ProfilerActivity, profile
    fwd_bwd(fn, h, w, t)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fwd_bwd(fn, h, w, t)
        torch.cuda.synchronize()
    h.grad = w.grad = None
    table = None
    for key in ("device_time_total", "cuda_time_total"):  # the name changed across torch versions
        try:
            table = prof.key_averages().table(sort_by=key, row_limit=15, max_name_column_width=70)
            break
        except Exception:
            continue
    with open(path, "a") as f:
        f.write(f"==== {label}\n{table}\n")


def print_table(report):
    rates = ", ".join(f"{k} {v:.0f}" for k, v in report.get("bf16_gemm_tflops_interleaved", {}).items())
    print(f"\n{report['device']}  {report['date']}  bf16 GEMM {report['bf16_gemm_tflops']:.0f} TFLOP/s burst; "
          f"interleaved: {rates}")
    header = f"{'T':>6} {'V':>7} {'method':<16} {'ms':>9} {'x floor':>8} {'x fl.int':>8} {'x peer':>7} " \
             f"{'extra MiB':>10} {'workspace':>10} {'dW err':>8}"
    print(header)
    print("-" * len(header))
    for r in report["rows"]:
        if "error" in r:
            print(f"{r['T']:>6} {r['V']:>7} {r['method']:<16} error: {r['error'][:60]}")
            continue
        err = r.get("dw_rel_err", float("nan"))
        peer = r.get("ratio_to_best_peer") or float("nan")
        print(f"{r['T']:>6} {r['V']:>7} {r['method']:<16} {r['median_ms']:>9.2f} {r['ratio_to_floor']:>8.3f} "
              f"{r['ratio_to_floor_interleaved']:>8.3f} {peer:>7.3f} {r['peak_extra_mib']:>10.0f} "
              f"{r['workspace_mib']:>10.0f} {err:>8.1e}")


if __name__ == "__main__":
    main()
