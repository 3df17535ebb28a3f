#!/usr/bin/env python3
"""Every decoding benchmark of docs/benchmarks.md in one process and one time budget (tools/bench_decode_gpu.sh
runs it on the GPU machine).

The decoder's step programs are compiled once per shape class and the compiled graphs serve every model of the
process (dynamo caches them on the functions' code; the decoder traces size-obliviously, so batch size, k,
width and layer count are symbolic). So the compiler's work is done once, at the start, on random-weight
models of the three benchmarked shapes, while the two code models train in subprocesses (compilation is host
work; the GPU runs the trainings), and the benchmarks after the training only capture CUDA graphs:

  0 s         the two trainings start (configs/code_100m.yaml n = 4, configs/code_100m_n8.yaml n = 8; SIGTERM at
              TRAIN_S makes each checkpoint and stop), and the short CUDA correctness test (fp32: the graph and
              compiled paths give the eager path's tokens, draft trees included: the GEMV layer kernels with the
              split-KV attention first, then the split-KV attention alone, SDPA, the fused and the flex
              attention; then sampling through the captured step, linear and over a draft tree, by chi-square);
  meanwhile   compile warm-up in this process: the 1.1B shape (VARIANTS_1B) and the two code
              shapes at batch 1 and 16, k = 1..n, bf16 — the compilations counted and timed per shape;
  TRAIN_S     1. the n = 4 model: ours k = 1..4 at batch 1 and 16, then transformers' default, prompt-lookup and
                 static-cache compiled generate on its HF export -> decode_<tag>.json
                 and draft trees of TREES nodes, dynamic ones of DYNAMIC_TREES
              2. the n = 8 byte model at batch 1 on 16 held-out prompts, k = 1..8 and the draft trees
                 -> decode_<tag>_n8.json
              3. the 1.1B shape, random weights: forward time over 1..4 tokens (and 8..64: a draft tree's
                 widths), the speculative steps, plain
                 tokens/s against the HBM floor, kernel profiles; the decoder variants VARIANTS_1B names
                 (default: the GEMV layer kernels with the split-KV attention — first, so theirs are the profiles —,
                 the split-KV attention with torch's layer programs (the current default), SDPA)
                 -> decode_<tag>_1b.json
              4. the n = 4 model at batch 1 with each decoder variant VARIANTS_N4 names (default: the GEMV layer
                 kernels with the split-KV attention, SDPA) -> decode_<tag>_<variant>.json
              5. the code model's shape, random weights, as 3. with the GEMV layer kernels and torch's programs
                 (where a k-token step's time goes, kernel by kernel) -> decode_<tag>_100m.json
  the run's own record (phases, compile counts and times, test result) -> decode_<tag>_run.json; log.txt.

Each phase gets a cap from what is left of DEADLINE_S (SIGALRM ends a phase that overruns it, and the next one
starts); every benchmark writes its JSON after each row, so a cut keeps what was measured. Phases are ordered
so that a cut loses the least important rows.

    OUT=$OUT DEADLINE_S=400 python3 tools/bench_decode_gpu.py
    QUICK=1 DEVICE=cpu TRAIN_S=40 ITERS4=20 ITERS8=20 OUT=/tmp/dry python3 tools/bench_decode_gpu.py  # dry run
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import traceback

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "tools"))
sys.path.insert(0, REPO)

ENV = os.environ
OUT = ENV.get("OUT", os.path.join(REPO, "benchmarks"))
DEVICE = ENV.get("DEVICE", "cuda")
QUICK = ENV.get("QUICK", "0") == "1"
TAG = ENV.get("TAG", "cuda_v6" if DEVICE == "cuda" else "dry")  # v1-v5 are checked in
DEADLINE_S = float(ENV.get("DEADLINE_S", "400"))
TRAIN_S = int(ENV.get("TRAIN_S", "200"))
TESTS_S = int(ENV.get("TESTS_S", str(TRAIN_S - 5)))  # in parallel with the trainings: free
ITERS4 = ENV.get("ITERS4", "900")
ITERS8 = ENV.get("ITERS8", "1600")
# A subset of the run (the rest is skipped, the n = 4 training included when no part needs it):
#   n4 (the n = 4 model against transformers), n8 (the byte model, k = 1..8), 1b (the bandwidth regime, in the
#   decoder configurations VARIANTS_1B names, bench_decode.DECODER_VARIANTS), n4_attention (the n = 4 model with
#   the decoder variants VARIANTS_N4 names), 100m (the code shape's step profiles).
ALL_PARTS = ("n4", "n8", "1b", "n4_attention", "100m")
PARTS = set(ENV.get("PARTS", ",".join(ALL_PARTS)).split(","))
# (A dry run on a CPU has neither Triton kernel: the defaults there are the CPU decoder's.)
VARIANTS_1B = ENV.get("VARIANTS_1B", "triton_layers,flash_decoding,sdpa" if DEVICE == "cuda" else "default,sdpa")
VARIANTS_N4 = [a for a in ENV.get("VARIANTS_N4", "triton_layers,sdpa" if DEVICE == "cuda" else "sdpa").split(",")
               if a]  # the n4_attention part
VARIANTS_100M = "triton_layers,flash_decoding" if DEVICE == "cuda" else "default"
# Draft trees (node counts) decoded beside the k rows of the two trained models (bench_decode.py --trees); "" none.
TREES = ENV.get("TREES", "32")
DYNAMIC_TREES = ENV.get("DYNAMIC_TREES", "16,32,64")  # dynamic trees (bench_decode.py --dynamic-trees)
TREE_ARGS = (["--trees", TREES] if TREES else []) + (["--dynamic-trees", DYNAMIC_TREES] if DYNAMIC_TREES else [])
T0 = time.monotonic()

# A dry run: tiny models (the trainings' overrides also shape the warm-up models), short prompts.
TRAIN_EXTRA = (["--model.hidden_size", "64", "--model.num_attention_heads", "4", "--model.ffn_hidden_size", "128",
                "--train.micro_batch_size", "4", "--data.seq_length", "128", "--train.device", DEVICE,
                "--logging.interval", "10", "--train.dtype", "float32"] if QUICK else [])
BENCH_EXTRA = ["--prompt-tokens", "64", "--max-new-tokens", "16", "--prompts-batch1", "2"] if QUICK else []
PROMPT_TOKENS, NEW_TOKENS = (64, 16) if QUICK else (256, 128)
BANDWIDTH_CONFIG = "configs/tiny.yaml" if QUICK else "configs/1b.yaml"
CODE_CONFIG = "configs/tiny.yaml" if QUICK else "configs/code_100m.yaml"
RUNS = ENV.get("RUNS_DIR", "runs")  # where the two code models train (a test points it at a temporary folder)
RUN4, RUN8 = os.path.join(RUNS, "code_100m"), os.path.join(RUNS, "code_100m_n8")


def elapsed() -> float:
    return time.monotonic() - T0


def left() -> float:
    return DEADLINE_S - elapsed()


def say(msg: str) -> None:
    print(f"[{elapsed():.0f}s] {msg}", flush=True)  # tools/bench_decode_gpu.sh tees it into $OUT/log.txt


RECORD = {"tag": TAG, "device": DEVICE, "quick": QUICK, "deadline_s": DEADLINE_S, "train_s": TRAIN_S,
          "iters": {"n4": ITERS4, "n8": ITERS8}, "parts": sorted(PARTS), "variants_1b": VARIANTS_1B, "trees": TREES,
          "dynamic_trees": DYNAMIC_TREES,
          "phases": [], "warm_up": []}


def save_record() -> None:
    from megatron_mtp.io_utils import atomic_write_json

    atomic_write_json(os.path.join(OUT, f"decode_{TAG}_run.json"), RECORD)


class PhaseTimeout(Exception):
    pass


def _alarm(signum, frame):
    raise PhaseTimeout()


def phase(name: str, cap_s: float, fn) -> bool:
    """Run ``fn()`` for at most ``cap_s`` seconds (SIGALRM); a failure or an overrun is logged, recorded and
    ends the phase, never the run."""
    cap_s = min(cap_s, left())
    row = {"phase": name, "start_s": round(elapsed(), 1), "cap_s": round(cap_s, 1)}
    if cap_s < 5:
        row["status"] = "skipped: no time left"
        say(f"{name}: skipped (no time left)")
        RECORD["phases"].append(row)
        save_record()
        return False
    say(f"{name} (cap {cap_s:.0f}s)")
    signal.signal(signal.SIGALRM, _alarm)
    signal.setitimer(signal.ITIMER_REAL, cap_s)
    try:
        fn()
        row["status"] = "done"
    except PhaseTimeout:
        row["status"] = "cut at its cap"
        say(f"{name}: cut at its cap")
    except BaseException as exc:  # noqa: BLE001 - a crash in one phase must not cost the others
        row["status"] = f"failed: {type(exc).__name__}: {exc}"[:400]
        say(f"{name}: FAILED\n{traceback.format_exc()}")
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
    row["took_s"] = round(elapsed() - row["start_s"], 1)
    RECORD["phases"].append(row)
    save_record()
    return row["status"] == "done"


def spawn(cmd: list, log_path: str, timeout_s: int, sig: str = "TERM") -> subprocess.Popen:
    """A subprocess under coreutils ``timeout`` (TERM: a training checkpoints and stops), its output to a file."""
    f = open(log_path, "w")
    return subprocess.Popen(["timeout", "-s", sig, str(timeout_s), *cmd], stdout=f, stderr=subprocess.STDOUT,
                            cwd=REPO)


def tail(path: str, n: int = 12, keep=lambda line: True) -> str:
    try:
        with open(path, errors="replace") as f:
            lines = [line.rstrip() for line in f if keep(line)]
    except OSError:
        return "(no output)"
    return "\n".join(lines[-n:])


# ---------------------------------------------------------------------------------------------------------
# Compile warm-up: random-weight models of the benchmarked shapes


def warm_up(config: str, overrides: list, batch_sizes: list, variants: list, label: str) -> None:
    """Decode every (decoder variant, batch, k) shape the benchmarks will decode, on a random-weight model of
    ``config``'s shape, recording per shape the first call's time and the compilations it caused."""
    import torch

    import bench_decode
    import decode_compile_report
    from megatron_mtp.config import load_config
    from megatron_mtp.inference import DraftTree, generate
    from megatron_mtp.inference.generation import attention_backends, decoder_for

    cfg = load_config(os.path.join(REPO, config), overrides)
    dtype = torch.bfloat16 if DEVICE == "cuda" else torch.float32
    model = bench_decode.random_model(cfg, DEVICE, dtype, seed=0)
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, cfg.model.vocab_size, (PROMPT_TOKENS,), generator=g).tolist()
               for _ in range(max(batch_sizes))]
    n = cfg.mtp.n_heads
    try:
        for variant in variants:
            decoder_for(model, **bench_decode.decoder_options(variant, DEVICE))
            for b in batch_sizes:
                for k in range(1, n + 1):
                    before, t = decode_compile_report.compiled_graphs(), time.perf_counter()
                    with attention_backends(torch.device(DEVICE)):
                        generate(model, prompts[:b], NEW_TOKENS, heads=k)
                    if DEVICE == "cuda":
                        torch.cuda.synchronize()
                    now = decode_compile_report.compiled_graphs()
                    new = {p: now[p] - before[p] for p in now if now[p] != before[p]}
                    row = {"model": label, "variant": variant, "batch": b, "k": k,
                           "first_call_s": round(time.perf_counter() - t, 2), "compiled": new,
                           "compile_error": decoder_for(model).compile_error}
                    RECORD["warm_up"].append(row)
                    if new or row["first_call_s"] > 2:
                        say(f"warm-up {label} {variant} b={b} k={k}: {row['first_call_s']:.1f}s compiled {new or '-'}")
            # Draft trees: a tree of each size, shaped by a made-up decaying accuracy profile (the benchmark
            # calibrates its own trees; the compiled programs depend on the sizes' classes, not the shape).
            prior = [[0.6 * 0.8 ** d * 0.4 ** r for r in range(bench_decode.TREE_RANKS)] for d in range(n - 1)]
            sizes = ([(nodes, False) for nodes in bench_decode.counts(TREES, 2)]
                     + [(nodes, True) for nodes in bench_decode.counts(DYNAMIC_TREES, 2)])
            for nodes, dynamic in sizes if n > 1 else []:
                tree = DraftTree.from_accuracy(prior, nodes, dynamic=dynamic)
                for b in batch_sizes:
                    t = time.perf_counter()
                    with attention_backends(torch.device(DEVICE)):
                        generate(model, prompts[:b], NEW_TOKENS, tree=tree)
                    RECORD["warm_up"].append({"model": label, "variant": variant, "batch": b, "tree_nodes": nodes,
                                              "tree_dynamic": dynamic,
                                              "first_call_s": round(time.perf_counter() - t, 2),
                                              "compile_error": decoder_for(model).compile_error})
            save_record()
    finally:
        RECORD["graphs_per_program"] = decode_compile_report.compiled_graphs()
        del model
        if DEVICE == "cuda":
            torch.cuda.empty_cache()


# ---------------------------------------------------------------------------------------------------------


def bench(argv: list) -> None:
    import bench_decode

    # The benchmark's JSON records its own command line, as if run alone (this driver is in the run record).
    sys.argv[0] = os.path.join(REPO, "tools", "bench_decode.py")
    rc = bench_decode.main(argv + ["--device", DEVICE, "--output-dir", OUT, "--no-plot"] + BENCH_EXTRA)
    if rc:
        raise RuntimeError(f"bench_decode exited with {rc}")


def check_selection() -> None:
    """Unknown PARTS, VARIANTS_1B or VARIANTS_N4 names end the run before anything starts (a typo would otherwise skip a
    part silently, or fail it after minutes of training)."""
    import bench_decode

    unknown = sorted(PARTS - set(ALL_PARTS))
    if unknown:
        raise SystemExit(f"error: unknown PARTS entry {unknown[0]!r}; choose from {', '.join(ALL_PARTS)}.")
    for name, chosen in (("VARIANTS_1B", VARIANTS_1B.split(",")), ("VARIANTS_N4", VARIANTS_N4)):
        unknown = [v for v in chosen if v not in bench_decode.DECODER_VARIANTS]
        if unknown:
            raise SystemExit(f"error: unknown {name} entry {unknown[0]!r}; choose from "
                             f"{', '.join(bench_decode.DECODER_VARIANTS)}.")
    for name, value in (("TREES", TREES), ("DYNAMIC_TREES", DYNAMIC_TREES)):
        if bench_decode.counts(value, 2) is None:
            raise SystemExit(f"error: {name} takes node counts of at least 2 like 16,32,64 (or nothing), got "
                             f"{value!r}.")


def main() -> int:
    check_selection()
    os.makedirs(OUT, exist_ok=True)
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    os.environ["PYTHONPATH"] = REPO + os.pathsep + os.environ.get("PYTHONPATH", "")
    work = tempfile.mkdtemp(prefix="bench_decode_gpu_")
    say(f"start {time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())} device={DEVICE} quick={QUICK} "
        f"deadline {DEADLINE_S:.0f}s, training {TRAIN_S}s (n=4 {ITERS4} iters, n=8 {ITERS8})")
    RECORD["date"] = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    RECORD["command"] = "OUT=$OUT " + " ".join(f"{k}={ENV[k]}" for k in ("DEADLINE_S", "TRAIN_S", "ITERS4", "ITERS8",
                                                                        "TESTS_S", "QUICK", "DEVICE", "PARTS",
                                                                        "VARIANTS_1B", "VARIANTS_N4", "TREES",
                                                                        "DYNAMIC_TREES", "TAG",
                                                                        "RUNS_DIR")
                                                 if k in ENV) \
        + " bash tools/bench_decode_gpu.sh"

    # 0: the trainings and the CUDA correctness test, in the background
    def train(config, run_dir, iters):
        return spawn([sys.executable, "-m", "megatron_mtp.train", "--config", config, "--train.iters", iters,
                      "--train.run_dir", run_dir, *TRAIN_EXTRA], os.path.join(work, f"train_{os.path.basename(run_dir)}.txt"),
                     TRAIN_S)

    trainings = []
    if PARTS & {"n4", "n4_attention"}:
        trainings.append(train("configs/code_100m.yaml", RUN4, ITERS4))
        time.sleep(5)  # the corpus build takes a lock; the second run waits on it and reuses it
    if "n8" in PARTS:
        trainings.append(train("configs/code_100m_n8.yaml", RUN8, ITERS8))
    tests = None
    if DEVICE == "cuda":
        # The default attention's cases first: a cut at TESTS_S loses the variants, not the default. (The
        # kernels' own layout tests run on the CPU, through Triton's interpreter: tests/test_decode_attention.py.)
        cuda_test = "tests/test_generation.py::test_cuda_graph_path_gives_the_eager_tokens"
        tests = spawn([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                       *(f"{cuda_test}[{case}]" for case in ("graphs+compile+triton_layers", "graphs+triton_layers",
                                                             "graphs+compile+flash_decoding", "graphs+flash_decoding",
                                                             "graphs+compile", "graphs+compile+fused",
                                                             "graphs+compile+flex")),
                       "tests/test_speculative.py::"
                       "test_speculative_sampling_with_cuda_graphs_matches_plain_distribution"],
                      os.path.join(work, "tests.txt"), TESTS_S, "KILL")

    import torch

    RECORD["torch"] = torch.__version__
    if DEVICE == "cuda":
        RECORD["device_name"] = torch.cuda.get_device_name()
        try:
            import transformers

            RECORD["transformers"] = transformers.__version__
        except ImportError:
            pass
    say(f"torch {torch.__version__} {RECORD.get('device_name', '')}")

    # Compile warm-up while the trainings run, in the order of what the benchmarks need most: the 1.1B shape
    # with the defaults first (its kernels' autotuning matters most; its graphs serve the code shapes too), the
    # code shapes (n = 8 covers k up to 8; n = 4 is decoded at batch 16 too), then the other variants.
    code_over = TRAIN_EXTRA[:6] if QUICK else []
    t_warm = time.monotonic()
    variants_1b = VARIANTS_1B.split(",")
    for label, config, over, batches, variants, part in (
            ("1b", BANDWIDTH_CONFIG, [], [1], variants_1b[:1], "1b"),
            ("code_n4", "configs/code_100m.yaml", code_over, [1, 16], ["default"], "n4"),
            ("code_n8", "configs/code_100m_n8.yaml", code_over, [1], ["default"], "n8"),
            ("1b", BANDWIDTH_CONFIG, [], [1], variants_1b[1:], "1b"),
            ("code_n4", "configs/code_100m.yaml", code_over, [1], VARIANTS_N4, "n4_attention")):
        if part in PARTS and variants:
            phase(f"warm-up {label} {','.join(variants)}", TRAIN_S - elapsed() - 3,  # none past the training
                  lambda: warm_up(config, over, batches, variants, label))
    RECORD["warm_up_s"] = round(time.monotonic() - t_warm, 1)

    for p in trainings:
        p.wait()
    if tests is not None:
        tests.wait()
        RECORD["cuda_test"] = {"rc": tests.returncode, "tail": tail(os.path.join(work, "tests.txt"), 6),
                               "errors": tail(os.path.join(work, "tests.txt"), 20, lambda line: line.startswith("E "))}
    say("trained; tests: " + (RECORD.get("cuda_test", {}).get("tail", "(not run on cpu)")))
    for name in [os.path.basename(r) for r, part in ((RUN4, "n4"), (RUN8, "n8")) if part in PARTS]:
        path = os.path.join(work, f"train_{name}.txt")
        text = tail(path, 3, lambda line: not line.startswith("step")) + "\n" + \
            tail(path, 2, lambda line: line.startswith("step"))
        RECORD.setdefault("training", {})[name] = text
        say(f"== {name}\n{text}")
    save_record()

    # 1-4: the benchmarks, most important first; each gets what is left minus a reserve for the later ones
    # (Reserves as shares of what is left, so a shortened run keeps the same order of sacrifice.)
    if "n4" in PARTS:
        phase("bench n=4 ours + transformers", max(0.6 * left(), left() - 75),
              lambda: bench(["--load", RUN4, "--tag", TAG] + TREE_ARGS))
    if "n8" in PARTS:
        phase("bench n=8 k=1..8", max(0.3 * left(), left() - 50),
              # 16 prompts, not 4: bytes per forward is the target here, and over 4 x 128 bytes it moved by
              # +-0.2 between runs of similar models
              lambda: bench(["--load", RUN8, "--tag", f"{TAG}_n8", "--batch-sizes", "1", "--peers", "none",
                             "--prompts-batch1", "4" if QUICK else "16"] + TREE_ARGS))
    if "1b" in PARTS:
        phase(f"bandwidth 1.1B {VARIANTS_1B}", max(0.7 * left(), left() - 28),
              lambda: bench(["--bandwidth", BANDWIDTH_CONFIG, "--tag", f"{TAG}_1b", "--profile",
                             "--variants", VARIANTS_1B, "--forward-tokens", "8,16,32,64"]))
    import bench_decode

    for variant in VARIANTS_N4 if "n4_attention" in PARTS else ():
        options = bench_decode.decoder_options(variant, DEVICE)
        phase(f"bench n=4 decoder {variant}, batch 1", left() - 12,
              lambda: bench(["--load", RUN4, "--tag", f"{TAG}_{variant}", "--batch-sizes", "1", "--peers", "none",
                             "--attention", options["attention"], "--layer-kernels", options["layer_kernels"]]
                            + (["--gemv"] if options["gemv"] else [])))
    if "100m" in PARTS:
        phase("bandwidth code n=4 shape (step profiles)", left() - 2,
              lambda: bench(["--bandwidth", CODE_CONFIG, "--tag", f"{TAG}_100m", "--profile",
                             "--variants", VARIANTS_100M]))
    say("done")
    save_record()
    return 0


if __name__ == "__main__":
    sys.exit(main())
