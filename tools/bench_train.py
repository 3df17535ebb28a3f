#!/usr/bin/env python3
"""Training throughput of megatron_mtp on one GPU against HuggingFace Llama, measured in the same run.

What is timed is the real training step: ``LocalEngine.train_step`` on an ``MTPModel`` (memory-efficient heads,
fused linear cross-entropy, gradient clipping, AdamW), on synthetic random tokens, for n = 1, 2, 4 heads
compute-matched (``model.num_layers`` counts the head layers), in bf16 and with FP8 GEMMs. The peers are
``transformers``' ``LlamaForCausalLM`` of the same shape in four regimes (below). Per row: median step time over CUDA events after warm-up, tokens/s,
TFLOP/s (``metrics.flops_per_token``), MFU against 989 TFLOP/s dense bf16 and against the bf16 matmul rate
measured in this run, peak memory (``max_memory_allocated``) next to ``training/memory_model.py``'s prediction.
Also: the SDPA kernel chosen per attention layout (and their fwd+bwd times), saved-activation bytes per layer,
host syncs inside the step, and the top CUDA kernels of one profiled step.

    python tools/bench_train.py --output benchmarks/train_bench.json          # GPU: the 1.1B and 1.3B shapes
    python tools/bench_train.py --tiny --output /tmp/bench_tiny.json          # CPU smoke run (tests)
    python tools/bench_train.py --isolate --shapes 7b-layer --rows fast:1,fast-fp8:1,hf-fp8:1,hf-compile:1
    python tools/bench_train.py --merge ours.json peers.json --output all.json   # rows of separate calls, one summary

Variants of our model (``--variants``; comma-separated, default all of the preset):
  eager-autocast   fp32 weights under bf16 autocast, no compile (LocalEngine with train.master_weights false)
  eager-bf16       bf16 weights + fp32 master weights, no compile (LocalEngine's default, train.master_weights)
  fast             bf16 weights + fp32 masters + torch.compile'd layers (train.compile) [+ the compiled optimizer
                   step with --compiled-optimizer-step] [+ attention layout if the in-run attention benchmark
                   shows it pays]
  fast-fp8         as fast, with FP8 GEMMs in the trunk's and heads' linears (train.fp8, ops/fp8.py)
Peers (transformers' LlamaForCausalLM of the same shape, fused AdamW, the same clipping):
  hf               fp32 weights under bf16 autocast (the HF Trainer's bf16), our loss on the logits
  hf-liger         bf16 weights (no fp32 masters) + Liger-Kernel (RMSNorm, RoPE, SwiGLU, fused linear CE)
  hf-compile       bf16 weights (no fp32 masters), ``model.compile()``
  hf-fp8           bf16 weights (no fp32 masters), torchao float8 training (tensorwise, every linear but the
                   unembedding) + ``model.compile()``
The bf16 peers compute transformers' own next-token loss (``labels=``: 2047 targets per 2048-token sample).
``--isolate`` runs our rows of a shape in one child process and every peer in its own (Liger patches
transformers' classes for the whole process; separate processes also keep each row's allocator clean).
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import functools
import gc
import json
import os
import platform
import re
import statistics
import sys
import time
import traceback
import warnings

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..")))

import torch  # noqa: E402

from megatron_mtp.config import Config, ModelConfig, MTPConfig  # noqa: E402
from megatron_mtp.training import memory_model as mm  # noqa: E402
from megatron_mtp.io_utils import atomic_write_text  # noqa: E402
from megatron_mtp.model.builder import build_model  # noqa: E402
from megatron_mtp.model.compile import apply_compile  # noqa: E402

import attention_layout  # noqa: E402  (tools/, next to this script)
from megatron_mtp.training.metrics import H100_BF16_PEAK, flops_per_token  # noqa: E402

SHAPES = {
    # TinyLlama-like ~1.1B (configs/1b.yaml)
    "1.1b": dict(vocab_size=32000, hidden_size=2048, num_layers=22, num_attention_heads=32, num_kv_heads=4,
                 ffn_hidden_size=5632),
    # The paper's 1.3B scaling model. Its Table S13/S14 could not be retrieved with the tools here; this is the
    # brief's stated fallback shape (hidden 2048, 24 layers, 16 heads, MHA, SwiGLU 5632).
    "1.3b": dict(vocab_size=32000, hidden_size=2048, num_layers=24, num_attention_heads=16, num_kv_heads=16,
                 ffn_hidden_size=5632),
    # Llama-2 7B's layer (d 4096, SwiGLU 11008, 32 heads, MHA) at reduced depth so one GPU holds it with Adam
    "7b-layer": dict(vocab_size=32000, hidden_size=4096, num_layers=4, num_attention_heads=32, num_kv_heads=32,
                     ffn_hidden_size=11008),
}
TINY_SHAPES = {
    "tiny-gqa": dict(vocab_size=512, hidden_size=64, num_layers=5, num_attention_heads=4, num_kv_heads=2,
                     ffn_hidden_size=160, make_vocab_size_divisible_by=64),
    "tiny-mha": dict(vocab_size=512, hidden_size=64, num_layers=5, num_attention_heads=4, num_kv_heads=4,
                     ffn_hidden_size=160, make_vocab_size_divisible_by=64),
}
FILE_TAGS = {"1.1b": "1b", "1.3b": "1p3b", "7b-layer": "7b_layer"}

# rows: (variant, n_heads); "hf" is the peer
GPU_PLAN = [("hf", 1), ("hf-liger", 1), ("hf-compile", 1), ("hf-fp8", 1), ("eager-autocast", 1),
            ("eager-autocast", 4), ("eager-bf16", 1), ("fast", 1), ("fast", 2), ("fast", 4), ("fast-fp8", 1),
            ("fast-fp8", 4)]
TINY_PLAN = [("hf", 1), ("eager-autocast", 1), ("eager-bf16", 1), ("eager-autocast", 2), ("eager-autocast", 4),
             ("fast", 1), ("fast", 4), ("fast-fp8", 1)]
HF_VARIANTS = ("hf", "hf-liger", "hf-compile", "hf-fp8")
REGIMES = {
    "hf": "fp32 weights under bf16 autocast, SDPA",
    "hf-liger": "bf16 weights, no fp32 masters; Liger-Kernel RMSNorm/RoPE/SwiGLU/fused linear CE",
    "hf-compile": "bf16 weights, no fp32 masters; model.compile()",
    "hf-fp8": "bf16 weights, no fp32 masters; torchao float8 tensorwise (all linears but lm_head) + model.compile()",
    "eager-autocast": "fp32 weights under bf16 autocast, eager",
    "eager-bf16": "bf16 weights + fp32 masters, eager",
    "fast": "bf16 weights + fp32 masters, compiled layers",
    "fast-fp8": "bf16 weights + fp32 masters, compiled layers, FP8 GEMMs in trunk and head linears (train.fp8)",
}


# ---------------------------------------------------------------------------------------------------------
# helpers


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Timer:
    """Per-step times in ms: CUDA events on GPU (no host sync between steps), perf_counter on CPU."""

    def __init__(self, device):
        self.device = device
        self.pairs = []

    @contextlib.contextmanager
    def step(self):
        if self.device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            yield
            end.record()
            self.pairs.append((start, end))
        else:
            t0 = time.perf_counter()
            yield
            self.pairs.append((t0, time.perf_counter()))

    def times_ms(self):
        sync(self.device)
        if self.device.type == "cuda":
            return [s.elapsed_time(e) for s, e in self.pairs]
        return [(e - s) * 1e3 for s, e in self.pairs]


def free_memory(device):
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def peak_gib(device):
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return None


def measure_matmul_tflops(device, n=8192, reps=10):
    """bf16 GEMM rate on random data (the ceiling MFU is also quoted against)."""
    if device.type != "cuda":
        return None
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    timer = Timer(device)
    for _ in range(reps):
        with timer.step():
            a @ b
    ms = statistics.median(timer.times_ms())
    del a, b
    return 2 * n**3 / (ms * 1e-3) / 1e12


# ---------------------------------------------------------------------------------------------------------
# cross-entropy instrumentation: which backend and which operand dtypes the heads hand to the fused CE


CE_SEEN = set()


def install_ce_wrapper(backend: str):
    import importlib

    # the package re-exports the function under the module's name: fetch the module itself
    lce = importlib.import_module("megatron_mtp.ops.linear_cross_entropy")
    lce = sys.modules["megatron_mtp.ops.linear_cross_entropy"]

    orig = getattr(lce, "_bench_original", None) or lce.linear_cross_entropy
    lce._bench_original = orig

    @functools.wraps(orig)
    def wrapped(hidden, weight, target, **kw):
        CE_SEEN.add((str(hidden.dtype), str(weight.dtype), torch.is_autocast_enabled(hidden.device.type)
                     if hidden.device.type == "cuda" else False))
        if backend != "auto":
            kw.setdefault("backend", backend)
        return orig(hidden, weight, target, **kw)

    lce.linear_cross_entropy = wrapped


def ce_native_status(device):
    try:
        from megatron_mtp.ops._extension import extension_available

        return {"native_cpu": extension_available("cpu"), "native_cuda": extension_available("cuda")}
    except Exception as exc:  # noqa: BLE001
        return {"error": f"{type(exc).__name__}: {exc}"}


# ---------------------------------------------------------------------------------------------------------
# model builders


def make_config(shape: dict, n_heads: int, seq: int, mb: int) -> Config:
    cfg = Config()
    for k, v in shape.items():
        setattr(cfg.model, k, v)
    cfg.model.max_seq_length = max(seq, cfg.model.max_seq_length)
    cfg.mtp = MTPConfig(n_heads=n_heads)
    cfg.data.seq_length = seq
    cfg.train.micro_batch_size = mb
    cfg.train.iters = 10**6
    cfg.optimizer.warmup_iters = 0
    return cfg


def build_ours(cfg: Config, device, *, master: bool, compiled: bool, attention: str, fp8: bool = False):
    from megatron_mtp.ops.fp8 import apply_fp8
    from megatron_mtp.training.local_engine import LocalEngine

    if device.type == "cuda":
        # Values do not matter for speed: draw them on the GPU (the CPU init of 1B parameters takes a minute).
        with torch.device(device):
            model = build_model(cfg, device, compile=False)
        with torch.no_grad():
            for p in model.parameters():
                std = getattr(p, "init_std", 0.02)
                p.fill_(1.0) if std is None else p.normal_(0.0, std)
    else:
        model = build_model(cfg, "cpu", seed=1234, compile=False)
    if attention != "default":
        attention_layout.apply_attention_layout(model, expand_kv=attention == "bshd-expand")
    if fp8:  # on a CPU smoke run the FP8 GEMMs run through torch._scaled_mm's CPU kernel (emulation speed)
        apply_fp8(model)
    if compiled:
        apply_compile(model)
    dtype = torch.bfloat16 if (device.type == "cuda" or master) else torch.float32
    cfg.train.compile = compiled  # as in a run: with optimizer.compiled_step, compiled layers bring the compiled step
    engine = LocalEngine(model, cfg, device, dtype, master_weights=master)
    return engine


def build_hf(cfg: Config, device, variant: str = "hf"):
    if variant == "hf-liger":  # patches transformers' Llama classes (this process only: see --isolate)
        from liger_kernel.transformers import apply_liger_kernel_to_llama

        apply_liger_kernel_to_llama()
    from transformers import LlamaConfig, LlamaForCausalLM

    from megatron_mtp.training.optimizer import param_groups

    m = cfg.model
    hf_cfg = LlamaConfig(vocab_size=m.vocab_size, hidden_size=m.hidden_size, intermediate_size=m.ffn_size,
                         num_hidden_layers=m.num_layers, num_attention_heads=m.num_attention_heads,
                         num_key_value_heads=m.kv_heads, max_position_embeddings=m.max_seq_length,
                         rms_norm_eps=m.norm_eps, rope_theta=m.rope_theta, tie_word_embeddings=False,
                         use_cache=False, attention_dropout=0.0)
    hf_cfg._attn_implementation = "sdpa"
    with torch.device(device):
        model = LlamaForCausalLM(hf_cfg)
    bf16 = variant != "hf"
    model.to(device=device, dtype=torch.bfloat16 if bf16 else torch.float32)
    model.config.use_cache = False
    model.train()
    if variant == "hf-fp8":
        from torchao.float8 import Float8LinearConfig, convert_to_float8_training

        convert_to_float8_training(model, config=Float8LinearConfig.from_recipe_name("tensorwise"),
                                   module_filter_fn=lambda mod, fqn: fqn != "lm_head")
    if variant in ("hf-compile", "hf-fp8"):
        model.compile()
    o = cfg.optimizer
    opt = torch.optim.AdamW(param_groups(model, o.weight_decay), lr=o.lr, betas=(o.beta1, o.beta2), eps=o.eps,
                            fused=True if device.type == "cuda" else None)
    def autocast():
        return torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()

    def step_bf16(tokens):
        # transformers' own loss, as its users run it (Liger's fused linear CE replaces it in hf-liger)
        opt.zero_grad(set_to_none=True)
        x = tokens[:, :-1]
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), o.clip_grad, foreach=True)
        opt.step()
        return loss.detach()

    def step(tokens):
        opt.zero_grad(set_to_none=True)
        x = tokens[:, :-1]
        labels = tokens[:, 1:]
        with autocast():
            out = model(input_ids=x, labels=None)
            logits = out.logits
        # the next-token loss on exactly our targets (HF's own shift would drop one position)
        loss = torch.nn.functional.cross_entropy(logits.float().view(-1, logits.size(-1)), labels.reshape(-1))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), o.clip_grad, foreach=True)
        opt.step()
        return loss.detach()

    return model, (step_bf16 if bf16 else step)


# ---------------------------------------------------------------------------------------------------------
# one row


def run_row(args, device, shape_name, shape, variant, n_heads, mb, attention, profile=False, check_syncs=False):
    seq = args.seq
    hf = variant in HF_VARIANTS
    cfg = make_config(shape, n_heads if not hf else 1, seq, mb)
    cfg.optimizer.compiled_step = bool(getattr(args, "compiled_optimizer_step", False))
    row = {"shape": shape_name, "impl": "hf_llama" if hf else "megatron_mtp", "variant": variant,
           "n_heads": n_heads if not hf else None, "micro_batch": mb, "seq": seq,
           "attention": attention if variant.startswith("fast") else "default", "regime": REGIMES[variant]}
    master = variant in ("eager-bf16", "fast", "fast-fp8")
    fp8 = variant == "fast-fp8"
    compiled = ((variant.startswith("fast") and device.type == "cuda" and not args.no_compile)
                or variant in ("hf-compile", "hf-fp8"))
    row["compile"] = compiled
    row["fp8"] = fp8 or variant == "hf-fp8"
    if hf:
        row["precision"] = "hf-autocast" if variant == "hf" else "bf16 (no masters)"
    else:
        row["precision"] = ("bf16_master" if master else "autocast") + ("+fp8" if fp8 else "")
    free_memory(device)
    gen = torch.Generator(device=device).manual_seed(0)
    batches = [torch.randint(0, cfg.model.vocab_size, (mb, seq + 1), device=device, generator=gen)
               for _ in range(2)]
    t0 = time.perf_counter()
    model = engine = hf_step = None
    try:
        if hf:
            model, hf_step = build_hf(cfg, device, variant)
            step_fn = hf_step
            row["params"] = sum(p.numel() for p in model.parameters())
        else:
            engine = build_ours(cfg, device, master=master, compiled=compiled, attention=row["attention"], fp8=fp8)
            model = engine.model
            row["params"] = sum(p.numel() for p in model.parameters())
            counter = [0]

            def step_fn(tokens):
                counter[0] += 1
                return engine.train_step([tokens], counter[0]).loss

        row["build_s"] = round(time.perf_counter() - t0, 2)
        t1 = time.perf_counter()
        CE_SEEN.clear()
        for i in range(args.warmup):
            step_fn(batches[i % 2])
        sync(device)
        row["warmup_s"] = round(time.perf_counter() - t1, 2)
        if not hf:
            row["ce_operands"] = sorted({f"{a}/{b}" + ("/autocast" if c else "") for a, b, c in CE_SEEN})
            # whether the step ran the compiled optimizer step (False after a compile failure's fallback too)
            row["compiled_optimizer_step"] = getattr(engine.optimizer, "compiled_step", None) is not None
            if row["compiled_optimizer_step"]:
                row["regime"] += ", compiled optimizer step"
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
            row["states_gib"] = torch.cuda.memory_allocated(device) / 2**30
        timer = Timer(device)
        for i in range(args.steps):
            with timer.step():
                loss = step_fn(batches[i % 2])
        times = timer.times_ms()
        row["loss"] = float(loss)
        row["step_ms"] = statistics.median(times)
        row["step_ms_all"] = [round(t, 3) for t in times]
        row["peak_mem_gib"] = peak_gib(device)
        tokens = mb * seq
        fpt = flops_per_token(cfg.model, cfg.mtp, seq)
        row["flops_per_token"] = fpt
        row["tokens_per_s"] = tokens / (row["step_ms"] * 1e-3)
        row["tflops"] = fpt * row["tokens_per_s"] / 1e12
        row["mfu_989"] = row["tflops"] * 1e12 / H100_BF16_PEAK
        if args.matmul_tflops:
            row["mfu_vs_matmul"] = row["tflops"] / args.matmul_tflops
        if not hf:
            layout = mm.Layout(micro_batch=mb, seq_length=seq, compiled=compiled,
                               precision="bf16_master" if master else "autocast", fp8=fp8)
            if device.type == "cpu" and not master:
                layout.precision = "fp32"
            pred = mm.breakdown_gib(cfg, layout)
            row["predicted_peak_gib"] = pred["total"]
            row["predicted_breakdown_gib"] = {k: round(v, 3) if isinstance(v, float) else v for k, v in pred.items()}
            if row["peak_mem_gib"]:
                row["prediction_error"] = (pred["total"] - row["peak_mem_gib"]) / row["peak_mem_gib"]
        if check_syncs and device.type == "cuda":
            row["host_syncs"] = detect_syncs(step_fn, batches[0])
        if profile:
            row["profile"] = profile_step(step_fn, batches[0], device, args.profile_top)
        if compiled:
            try:
                from torch._dynamo.utils import counters

                row["dynamo_unique_graphs"] = int(counters["stats"]["unique_graphs"])
            except Exception:  # noqa: BLE001
                pass
    except torch.cuda.OutOfMemoryError as exc:
        row["error"] = "out of memory"
        row["error_detail"] = str(exc).splitlines()[0][:300]
    except Exception as exc:  # noqa: BLE001 - one failing row must not lose the others
        row["error"] = f"{type(exc).__name__}: {exc}"[:500]
        row["traceback"] = traceback.format_exc()[-3000:]
    finally:
        del model, engine, hf_step
        free_memory(device)
    return row


def detect_syncs(step_fn, tokens):
    """Host-device synchronisations inside one step (torch.cuda.set_sync_debug_mode), by source location."""
    found = {}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode(1)
        try:
            step_fn(tokens)
        finally:
            torch.cuda.set_sync_debug_mode(0)
    for w in caught:
        if "synchroniz" not in str(w.message):
            continue
        key = f"{os.path.relpath(w.filename) if w.filename else '?'}:{w.lineno}"
        found[key] = found.get(key, 0) + 1
    return found


KERNEL_CLASSES = [
    ("attention", ("flash", "fmha", "cudnn", "attention", "sdpa")),
    ("optimizer", ("adam", "multi_tensor", "foreach")),
    ("cross_entropy", ("row_stats", "stats_and_grad", "softmax_grad", "narrow_fp32", "convert_fp32", "mtp")),
    ("gemm", ("gemm", "xmma", "cutlass", "nvjet", "sm90", "cublas", "gemv", "scaled_mm")),
    ("fused (triton)", ("triton",)),
]


def classify(name: str) -> str:
    low = name.lower()
    if low.startswith(("triton_poi", "triton_red", "triton_per")):  # inductor's pointwise / reduction kernels,
        # whose names list the ops fused in (an FP8 cast kernel names _scaled_mm); the compiled optimizer step's
        # name its moments' lerp and its step counts' _foreach_add
        return "optimizer" if ("lerp" in low or "foreach" in low) else "fused (triton)"
    for cls, keys in KERNEL_CLASSES:
        if any(k in low for k in keys):
            return cls
    return "other elementwise/copies"


_ANNOTATION = re.compile(r"^[A-Za-z_][\w.]*#[\w.]+$")  # "Optimizer.step#AdamW.step"; kernel names have spaces


def profile_step(step_fn, tokens, device, top):
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=acts) as prof:
        step_fn(tokens)
        sync(device)
    rows, classes = [], {}
    total = 0.0
    for evt in prof.key_averages():
        # record_function ranges (e.g. "Optimizer.step#AdamW.step") also appear on the GPU timeline as user
        # annotations spanning their kernels: counting them would count those kernels twice
        if getattr(evt, "is_user_annotation", False) or _ANNOTATION.match(evt.key) or evt.key.startswith("ProfilerStep"):
            continue
        if device.type == "cuda":
            if getattr(evt, "device_type", None) != torch.autograd.DeviceType.CUDA:
                continue
            t = getattr(evt, "self_device_time_total", None)
            if t is None:
                t = getattr(evt, "self_cuda_time_total", 0.0)
        else:
            t = getattr(evt, "self_cpu_time_total", 0.0)
        if t <= 0:
            continue
        total += t
        rows.append({"name": evt.key[:160], "ms": t / 1e3, "calls": evt.count})
        cls = classify(evt.key)
        classes[cls] = classes.get(cls, 0.0) + t / 1e3
    rows.sort(key=lambda r: -r["ms"])
    for r in rows:
        r["share"] = r["ms"] * 1e3 / total if total else None
        r["class"] = classify(r["name"])
    return {"unit": "device ms in one step" if device.type == "cuda" else "CPU self ms in one step",
            "total_ms": total / 1e3, "top": rows[:top],
            "by_class_ms": dict(sorted(classes.items(), key=lambda kv: -kv[1]))}


# ---------------------------------------------------------------------------------------------------------
# attention layouts: which SDPA kernel runs, and fwd+bwd time per layout


def attention_bench(shape, mb, seq, device, reps=10):
    m = ModelConfig(**{k: v for k, v in shape.items()})
    h, kv, hd = m.num_attention_heads, m.kv_heads, m.head_dim
    g = h // kv
    dt = torch.bfloat16 if device.type == "cuda" else torch.float32
    out = {"q_heads": h, "kv_heads": kv, "head_dim": hd}

    def model_layout():  # exactly how Attention.forward lays q/k/v out today (roped q/k are new tensors)
        qkv = torch.randn(mb, seq, kv, g + 2, hd, device=device, dtype=dt, requires_grad=True)
        q = qkv[:, :, :, :g].reshape(mb, seq, h, hd).transpose(1, 2) * 1.0
        k = qkv[:, :, :, g].transpose(1, 2) * 1.0
        v = qkv[:, :, :, g + 1].transpose(1, 2)
        return qkv, q, k, v

    def bshd(expand):
        qkv = torch.randn(mb, seq, kv, g + 2, hd, device=device, dtype=dt, requires_grad=True)
        q = qkv[:, :, :, :g].reshape(mb, seq, h, hd) * 1.0
        k = qkv[:, :, :, g] * 1.0
        v = qkv[:, :, :, g + 1].contiguous()
        if expand and g > 1:
            k, v = k.repeat_interleave(g, dim=2), v.repeat_interleave(g, dim=2)
        return qkv, q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)

    layouts = {"model": model_layout, "bshd": lambda: bshd(False)}
    if g > 1:
        layouts["bshd-expand"] = lambda: bshd(True)
    from torch.nn.attention import SDPBackend, sdpa_kernel

    forced = {"flash": SDPBackend.FLASH_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION}
    if hasattr(SDPBackend, "CUDNN_ATTENTION"):
        forced["cudnn"] = SDPBackend.CUDNN_ATTENTION
    for name, make in layouts.items():
        qkv, q, k, v = make()
        gqa = q.size(1) != k.size(1)
        entry = {"chosen": attention_layout.sdpa_backend(q, k, v, True, gqa)}
        if device.type == "cuda":
            entry["usable"] = attention_layout.sdpa_reasons(q, k, v, True, gqa)
        for label, ctx in [("default", contextlib.nullcontext)] + [
                (b, functools.partial(sdpa_kernel, [backend])) for b, backend in forced.items()]:
            if device.type != "cuda" and label != "default":
                continue
            try:
                timer = Timer(device)
                for i in range(reps + 3):
                    qkv_i, q, k, v = make()
                    gqa = q.size(1) != k.size(1)
                    with (timer.step() if i >= 3 else contextlib.nullcontext()):
                        with ctx():
                            o = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True,
                                                                                 enable_gqa=gqa)
                        o.backward(torch.ones_like(o))
                entry[f"{label}_fwd_bwd_ms"] = statistics.median(timer.times_ms())
            except Exception as exc:  # noqa: BLE001
                entry[f"{label}_fwd_bwd_ms"] = None
                entry[f"{label}_error"] = f"{type(exc).__name__}: {exc}"[:200]
        out[name] = entry
    del q, k, v, qkv
    free_memory(device)
    return out


def choose_attention(bench: dict, threshold: float = 0.97) -> str:
    """The layout whose default-dispatch fwd+bwd time beats the model's current one by > 3%, else 'default'."""
    base = bench.get("model", {}).get("default_fwd_bwd_ms")
    best, best_ms = "default", base
    for name in ("bshd", "bshd-expand"):
        ms = bench.get(name, {}).get("default_fwd_bwd_ms")
        if base and ms and ms < threshold * base and ms < best_ms:
            best, best_ms = name, ms
    return best


def saved_bytes_check(shape, device, compiled_too):
    """Saved-activation bytes per token of one layer, measured on this device, next to the formula."""
    m = ModelConfig(**shape)
    out = {}
    modes = [("autocast", False), ("bf16", False)] + ([("bf16", True)] if compiled_too else [])
    for precision, compiled in modes:
        try:
            meas = mm.measure_layer_saved_bytes(m, precision=precision, compiled=compiled, device=device.type,
                                                batch=(1, 2), seq=512 if device.type == "cuda" else 32)
        except Exception as exc:  # noqa: BLE001
            out[f"{precision}{'-compiled' if compiled else ''}"] = {"error": f"{type(exc).__name__}: {exc}"[:300]}
            continue
        prec = "bf16_master" if precision == "bf16" else precision
        out[f"{precision}{'-compiled' if compiled else ''}"] = {
            "measured_bytes_per_token": meas, "formula_bytes_per_token": mm.formula_bytes_per_token(m, prec, compiled)}
    free_memory(device)
    return out


# ---------------------------------------------------------------------------------------------------------
# reporting


def summarize(rows):
    out = {}
    for shape in sorted({r["shape"] for r in rows}):
        rs = [r for r in rows if r["shape"] == shape and "step_ms" in r]

        def find(variant, n=None, mb=None):
            for r in rs:
                if r["variant"] == variant and (n is None or r["n_heads"] == n) and (mb is None or r["micro_batch"] == mb):
                    return r
            return None

        s = {}
        hf = find("hf")
        for variant in ("fast", "fast-fp8", "eager-bf16", "eager-autocast"):
            n1, n4 = find(variant, 1), find(variant, 4)
            if n1 and n4 and n1["micro_batch"] == n4["micro_batch"]:
                pred = n4["flops_per_token"] / n1["flops_per_token"]
                meas = n4["step_ms"] / n1["step_ms"]
                s[variant] = {"n4_over_n1_step_time": meas, "n4_over_n1_flops": pred,
                              "ratio_vs_prediction": meas / pred,
                              "peak_mem_n4_over_n1": (n4["peak_mem_gib"] / n1["peak_mem_gib"]
                                                      if n1.get("peak_mem_gib") else None)}
            if n1 and hf and n1["micro_batch"] == hf["micro_batch"]:
                s.setdefault(variant, {})["n1_tokens_per_s_over_hf"] = n1["tokens_per_s"] / hf["tokens_per_s"]
        # every megatron_mtp row against every peer row of the same micro-batch (tokens/s ratios, same run)
        peers = {r["variant"]: r for r in rs if r["impl"] == "hf_llama"}
        ratios = {}
        for r in rs:
            if r["impl"] != "megatron_mtp":
                continue
            for name, peer in peers.items():
                if peer["micro_batch"] == r["micro_batch"]:
                    ratios[f"{r['variant']} n={r['n_heads']} / {name}"] = r["tokens_per_s"] / peer["tokens_per_s"]
        for n in (1, 2, 4):
            a, b = find("fast-fp8", n), find("fast", n)
            if a and b and a["micro_batch"] == b["micro_batch"]:
                ratios[f"fast-fp8 n={n} / fast n={n}"] = a["tokens_per_s"] / b["tokens_per_s"]
        if "hf-fp8" in peers and "hf-compile" in peers:
            ratios["hf-fp8 / hf-compile (torchao's FP8 gain)"] = (peers["hf-fp8"]["tokens_per_s"]
                                                                  / peers["hf-compile"]["tokens_per_s"])
        if ratios:
            s["tokens_per_s_ratios"] = ratios
        errs = [abs(r["prediction_error"]) for r in rs if r.get("prediction_error") is not None]
        if errs:
            s["memory_prediction_max_abs_error"] = max(errs)
        out[shape] = s
    return out


def print_table(rows, file=sys.stdout):
    hdr = (f"{'shape':6} {'impl':12} {'variant':15} {'n':>2} {'mb':>3} {'step ms':>9} {'tok/s':>10} {'TFLOP/s':>8} "
           f"{'MFU989':>7} {'MFUmm':>6} {'peak GiB':>8} {'pred GiB':>8} {'err':>6}")
    print(hdr, file=file)
    print("-" * len(hdr), file=file)
    for r in rows:
        if "step_ms" not in r:
            print(f"{r['shape']:6} {r['impl']:12} {r['variant']:15} {str(r.get('n_heads') or ''):>2} "
                  f"{r['micro_batch']:>3} {r.get('error', 'skipped')}", file=file)
            continue

        def f(v, fmt):
            return format(v, fmt) if v is not None else "-"

        print(f"{r['shape']:6} {r['impl']:12} {r['variant']:15} {str(r.get('n_heads') or ''):>2} {r['micro_batch']:>3} "
              f"{r['step_ms']:9.2f} {r['tokens_per_s']:10.0f} {r['tflops']:8.1f} {100 * r['mfu_989']:6.1f}% "
              f"{f(100 * r['mfu_vs_matmul'] if r.get('mfu_vs_matmul') else None, '5.1f')}% "
              f"{f(r.get('peak_mem_gib'), '8.2f')} {f(r.get('predicted_peak_gib'), '8.2f')} "
              f"{f(100 * r['prediction_error'] if r.get('prediction_error') is not None else None, '5.1f')}%",
              file=file)


def write_json(path, payload):
    if not path:
        return
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    atomic_write_text(path, json.dumps(payload, indent=1, default=str))


# ---------------------------------------------------------------------------------------------------------


def print_report(payload, args):
    """The run's table, ratios, attention choice, profiles and errors (stdout)."""
    mm_rate = payload.get("matmul_tflops_measured")
    print(f"\n{payload.get('device')} | torch {payload.get('torch')} | seq {payload.get('seq')} | matmul "
          f"{mm_rate and round(mm_rate)} TFLOP/s | CE {payload.get('ce')} | {payload.get('date')}")
    print_table(payload["rows"])
    for shape, s in payload["summary"].items():
        print(f"{shape}: " + json.dumps(s, default=lambda v: round(v, 4)))
    for shape, a in payload.get("attention", {}).items():
        if isinstance(a, dict):
            brief = {k: {kk: (round(vv, 3) if isinstance(vv, float) else vv) for kk, vv in v.items()
                         if kk.endswith("_ms") or kk == "chosen"}
                     for k, v in a.items() if isinstance(v, dict) and "chosen" in v}
            print(f"attention {shape}: use {a.get('fast_rows_use')} | {json.dumps(brief)}")
    for r in payload["rows"]:
        if r.get("profile"):
            p = r["profile"]
            print(f"top kernels {r['shape']} {r['variant']} n={r['n_heads']} ({p['unit']}, total {p['total_ms']:.1f}):")
            for k in p["top"][:args.profile_top]:
                print(f"  {k['ms']:8.2f} {100 * (k['share'] or 0):5.1f}% x{k['calls']:<4} [{k['class']}] {k['name'][:100]}")
            print(f"  by class: {json.dumps({k: round(v, 2) for k, v in p.get('by_class_ms', {}).items()})}")
        if r.get("host_syncs"):
            print(f"host syncs {r['shape']} {r['variant']} n={r['n_heads']}: {r['host_syncs']}")
        if r.get("error"):
            print(f"ERROR {r['shape']} {r['variant']} n={r.get('n_heads')}: {r['error']}")


def _child_argv(argv, drop_values=("--rows", "--shapes", "--output", "--output-dir", "--time-budget-s",
                                   "--variants", "--heads", "--skip")) -> list:
    """The parent's own arguments minus those the child gets its own values for (and --isolate)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    out, i = [], 0
    while i < len(argv):
        a = argv[i]
        name = a.split("=", 1)[0]
        if name == "--isolate":
            i += 1
        elif name in drop_values:
            i += 1 if "=" in a else 2
        else:
            out.append(a)
            i += 1
    return out


def run_isolated(args, argv, shapes, plan, mb, payload, save, t_start):
    """Per shape: our rows in one child process, each peer row in its own (same GPU, one after another)."""
    import subprocess
    import tempfile

    groups = []
    for shape_name in shapes:
        ours = [f"{v}:{n}" for v, n in plan if v not in HF_VARIANTS]
        pending = []
        for v, n in plan:
            if v in HF_VARIANTS:
                pending.append([f"{v}:{n}"])
            elif ours:
                pending.append(ours)
                ours = []
        groups += [(shape_name, g) for g in pending]
    base = _child_argv(argv)
    tmp = tempfile.mkdtemp(prefix="bench_train_")
    for k, (shape_name, rows) in enumerate(groups):
        left = args.time_budget_s - (time.time() - t_start)
        if left < 20:
            for r in rows:
                v, n = r.split(":")
                payload["rows"].append({"shape": shape_name, "impl": "hf_llama" if v in HF_VARIANTS else "megatron_mtp",
                                        "variant": v, "n_heads": int(n), "micro_batch": mb,
                                        "error": "skipped: time budget"})
            continue
        out = os.path.join(tmp, f"group{k}.json")
        cmd = [sys.executable, os.path.abspath(__file__), *base, "--shapes", shape_name, "--rows", ",".join(rows),
               "--output", out, "--time-budget-s", str(max(left - 30, 10))]
        t0 = time.time()
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=left)
            rc, tail = proc.returncode, (proc.stdout + proc.stderr)[-3000:]
        except subprocess.TimeoutExpired as exc:
            rc, tail = "timeout", str((exc.stdout or b"")[-2000:] if isinstance(exc.stdout, bytes) else exc.stdout)
        child = None
        if os.path.exists(out):
            with open(out) as f:
                child = json.load(f)
        print(f"[isolate] {shape_name} {','.join(rows)}: rc {rc} in {time.time() - t0:.0f} s", flush=True)
        if child is None or rc != 0:
            print(tail, flush=True)
        done = set()
        if child:
            for r in child["rows"]:
                r["process"] = k
                payload["rows"].append(r)
                done.add(f"{r['variant']}:{r['n_heads'] if r['n_heads'] is not None else 1}")
            for key in ("attention", "saved_bytes_per_token"):
                for shp, val in child.get(key, {}).items():
                    if val and (shp not in payload[key] or not any(rr in HF_VARIANTS for rr in rows)):
                        payload[key][shp] = val
            if payload.get("matmul_tflops_measured") is None:
                payload["matmul_tflops_measured"] = child.get("matmul_tflops_measured")
            payload["device"] = child.get("device", payload["device"])
            payload["ce"] = child.get("ce", payload["ce"])
        for r in rows:
            if r not in done:
                v, n = r.split(":")
                payload["rows"].append({"shape": shape_name, "impl": "hf_llama" if v in HF_VARIANTS else "megatron_mtp",
                                        "variant": v, "n_heads": int(n), "micro_batch": mb, "process": k,
                                        "error": f"child process failed (rc {rc}): {tail[-600:]}"})
        save()
    payload["isolated"] = "our rows of a shape in one process, each peer row in its own, one after another"


def merge_outputs(paths: list, output: str, args) -> dict:
    """One payload from the --output files of separate calls: the first readable file's metadata, every file's
    rows (each tagged with the command that measured it), the summary recomputed over all rows."""
    parts, read = [], []
    for path in paths:
        try:
            with open(path) as f:
                parts.append(json.load(f))
            read.append(os.path.basename(path))
        except (OSError, ValueError) as exc:
            print(f"merge: {path} left out ({type(exc).__name__}: {exc})", file=sys.stderr)
    if not parts:
        print("merge: no readable input; nothing written", file=sys.stderr)
        return {}
    payload = dict(parts[0])
    payload["rows"], payload["commands"] = [], []
    for part in parts:
        payload["commands"].append(part.get("command"))
        for r in part.get("rows", []):
            payload["rows"].append(dict(r, command=part.get("command")))
        if payload.get("matmul_tflops_measured") is None:
            payload["matmul_tflops_measured"] = part.get("matmul_tflops_measured")
    payload["summary"] = summarize(payload["rows"])
    payload["merged_from"] = read
    write_json(output, payload)
    print_report(payload, args)
    return payload


def pick_micro_batch(shape, n_heads, seq, device, candidates=(32, 24, 16, 12, 8), fraction=0.85):
    """Largest micro-batch the memory model fits in ``fraction`` of this GPU (fast regime)."""
    if device.type != "cuda":
        return None
    total = torch.cuda.get_device_properties(device).total_memory / 2**30
    for mb in candidates:
        cfg = make_config(shape, n_heads, seq, mb)
        pred = mm.peak_bytes(cfg, mm.Layout(micro_batch=mb, seq_length=seq, compiled=True,
                                            precision="bf16_master")) / 2**30
        if pred <= fraction * total:
            return mb
    return None


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiny", action="store_true", help="tiny shapes on the CPU (smoke test)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--shapes", default=None, help="comma-separated: 1.1b,1.3b (GPU) or tiny-gqa,tiny-mha")
    ap.add_argument("--variants", default=None, help="comma-separated variants to keep (hf, eager-autocast, "
                    "eager-bf16, fast)")
    ap.add_argument("--heads", default=None, help="comma-separated n to keep, e.g. 1,4")
    ap.add_argument("--skip", default=None, help="rows to leave out, variant:n comma-separated")
    ap.add_argument("--rows", default=None, help="exactly these rows, in this order: variant:n comma-separated "
                    "(overrides --variants/--heads/--skip)")
    ap.add_argument("--isolate", action="store_true", help="run our rows of each shape in one child process and "
                    "each peer row in its own")
    ap.add_argument("--skip-extras", action="store_true", help="no attention-layout benchmark or saved-bytes check "
                    "(the fast rows use --attention, 'default' when auto)")
    ap.add_argument("--micro-batch", type=int, default=None)
    ap.add_argument("--seq", type=int, default=None)
    ap.add_argument("--warmup", type=int, default=None)
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--attention", default="auto", choices=["auto", "default", "bshd", "bshd-expand"],
                    help="q/k/v layout of the fast rows (auto: the in-run attention benchmark decides)")
    ap.add_argument("--best-mb", action="store_true", help="also run fast n=1 and n=4 at the largest micro-batch "
                    "the memory model fits")
    ap.add_argument("--no-compile", action="store_true")
    ap.add_argument("--compiled-optimizer-step", action="store_true",
                    help="compiled rows run the compiled optimizer step (optimizer.compiled_step true; off by default "
                         "like the config's) instead of torch's fused AdamW and a separate bf16 copy")
    ap.add_argument("--calibrate", action="store_true", help="measure per-layer saved bytes (compiled too) here")
    ap.add_argument("--profile", default="fast:4,fast:1,hf:1", help="rows to profile, variant:n, comma-separated")
    ap.add_argument("--profile-top", type=int, default=15)
    ap.add_argument("--ce-backend", default="auto", choices=["auto", "torch", "native"])
    ap.add_argument("--time-budget-s", type=float, default=540.0, help="skip remaining rows after this long")
    ap.add_argument("--output", default=None, help="JSON with every row")
    ap.add_argument("--output-dir", default=None, help="also write train_<shape>.json per shape here")
    ap.add_argument("--merge", nargs="+", default=None, metavar="JSON", help="combine the rows of earlier --output "
                    "files of one session (e.g. ours and the peers, run in separate calls) into --output, with the "
                    "summary and ratios recomputed over all of them; runs nothing")
    args = ap.parse_args(argv)
    if args.merge:
        return merge_outputs(args.merge, args.output, args)

    t_start = time.time()
    if args.device == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() and not args.tiny else "cpu")
    else:
        device = torch.device(args.device)
    if device.type == "cuda":
        if device.index is not None:
            torch.cuda.set_device(device)
        device = torch.device("cuda", torch.cuda.current_device())
    shapes = TINY_SHAPES if args.tiny else SHAPES
    if args.shapes:
        shapes = {k: (SHAPES | TINY_SHAPES)[k] for k in args.shapes.split(",")}
    args.seq = args.seq or (64 if args.tiny else 2048)
    mb = args.micro_batch or (2 if args.tiny else 8)
    args.warmup = args.warmup if args.warmup is not None else (1 if args.tiny else 3)
    args.steps = args.steps or (2 if args.tiny else 8)
    plan = TINY_PLAN if args.tiny else GPU_PLAN
    if args.variants:
        keep = set(args.variants.split(","))
        plan = [p for p in plan if p[0] in keep]
    if args.heads:
        keep_n = {int(x) for x in args.heads.split(",")}
        plan = [p for p in plan if p[0] in HF_VARIANTS or p[1] in keep_n]
    if args.skip:
        drop = set(args.skip.split(","))
        plan = [p for p in plan if f"{p[0]}:{p[1]}" not in drop]
    if args.rows:
        plan = [(r.split(":")[0], int(r.split(":")[1])) for r in args.rows.split(",")]
        unknown = [v for v, _ in plan if v not in REGIMES]
        if unknown:
            ap.error(f"--rows names unknown variants {unknown}; known: {', '.join(REGIMES)}")
    install_ce_wrapper(args.ce_backend)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False  # fp32 GEMMs stay fp32: the regimes compared are explicit
    # with --isolate this process only launches children (its CUDA context would sit beside theirs)
    args.matmul_tflops = None if args.isolate else measure_matmul_tflops(device)

    try:
        import transformers

        hf_version = transformers.__version__
    except ImportError:
        hf_version = None
        plan = [p for p in plan if p[0] not in HF_VARIANTS]
    payload = {
        "benchmark": "bench_train",
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": "python " + " ".join([os.path.relpath(sys.argv[0])] + sys.argv[1:]) if argv is None
        else "bench_train.main(" + " ".join(argv) + ")",
        "torch": torch.__version__, "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if device.type == "cuda" else None,
        "transformers": hf_version, "python": platform.python_version(),
        "seq": args.seq, "micro_batch": mb, "warmup_steps": args.warmup, "timed_steps": args.steps,
        "timing": "median of CUDA-event step times after warm-up" if device.type == "cuda" else "median wall time",
        "peak_tflops_reference": H100_BF16_PEAK / 1e12,
        "matmul_tflops_measured": args.matmul_tflops,
        "flops_convention": "metrics.flops_per_token: 6 x matmul params (n unembeddings) + 12 x layers x d x seq",
        "ce": ce_native_status(device) | {"backend_requested": args.ce_backend},
        "shapes": {k: v for k, v in shapes.items()},
        "rows": [], "attention": {}, "saved_bytes_per_token": {},
    }
    profile_keys = set(args.profile.split(",")) if args.profile else set()

    def save():
        payload["summary"] = summarize(payload["rows"])
        payload["elapsed_s"] = round(time.time() - t_start, 1)
        write_json(args.output, payload)
        if args.output_dir:
            for shape in shapes:
                part = dict(payload)
                part["rows"] = [r for r in payload["rows"] if r["shape"] == shape]
                part["attention"] = {shape: payload["attention"].get(shape)}
                part["saved_bytes_per_token"] = {shape: payload["saved_bytes_per_token"].get(shape)}
                part["summary"] = {shape: payload["summary"].get(shape)}
                write_json(os.path.join(args.output_dir, f"train_{FILE_TAGS.get(shape, shape)}.json"), part)

    try:
        from tqdm import tqdm
    except ImportError:  # pragma: no cover
        def tqdm(x, **kw):
            return x

    jobs = []
    if args.isolate:
        run_isolated(args, argv, shapes, plan, mb, payload, save, t_start)
        payload["elapsed_s"] = round(time.time() - t_start, 1)
        save()
        print_report(payload, args)
        return payload
    for shape_name in shapes:
        for variant, n in plan:
            jobs.append((shape_name, variant, n, mb))
        if args.best_mb and not args.tiny:
            best = pick_micro_batch(shapes[shape_name], 1, args.seq, device)
            if best and best != mb:
                jobs += [(shape_name, "fast", 1, best), (shape_name, "fast", 4, best)]
    bar = tqdm(jobs, desc="bench_train", file=sys.stderr)
    current_shape = None
    attention_choice = {}
    for shape_name, variant, n, row_mb in bar:
        shape = shapes[shape_name]
        if shape_name != current_shape:
            if current_shape is not None and device.type == "cuda":
                torch._dynamo.reset()
            current_shape = shape_name
            bar.set_postfix_str(f"{shape_name}: attention layouts")
            if args.skip_extras:
                payload["attention"][shape_name] = {"skipped": "--skip-extras"}
            else:
                try:
                    payload["attention"][shape_name] = attention_bench(shape, mb, args.seq, device)
                except Exception as exc:  # noqa: BLE001
                    payload["attention"][shape_name] = {"error": f"{type(exc).__name__}: {exc}"[:300]}
            choice = args.attention
            if choice == "auto":
                choice = (choose_attention(payload["attention"][shape_name])
                          if device.type == "cuda" and not args.skip_extras else "default")
            attention_choice[shape_name] = choice
            payload["attention"][shape_name]["fast_rows_use"] = choice
            if not args.skip_extras:
                try:
                    payload["saved_bytes_per_token"][shape_name] = saved_bytes_check(
                        shape, device, compiled_too=args.calibrate and device.type == "cuda")
                except Exception as exc:  # noqa: BLE001
                    payload["saved_bytes_per_token"][shape_name] = {"error": f"{type(exc).__name__}: {exc}"[:300]}
            save()
        if time.time() - t_start > args.time_budget_s:
            payload["rows"].append({"shape": shape_name, "impl": "hf_llama" if variant in HF_VARIANTS else "megatron_mtp",
                                    "variant": variant, "n_heads": n, "micro_batch": row_mb,
                                    "error": "skipped: time budget"})
            continue
        bar.set_postfix_str(f"{shape_name} {variant} n={n} mb={row_mb}")
        key = f"{variant}:{n}"
        row = run_row(args, device, shape_name, shape, variant, n, row_mb, attention_choice[shape_name],
                      profile=key in profile_keys and row_mb == mb,
                      check_syncs=variant.startswith("fast") and row_mb == mb)
        if variant == "fast" and "error" in row and attention_choice[shape_name] != "default" \
                and "out of memory" not in row["error"]:
            failed = row
            attention_choice[shape_name] = "default"  # the layout pass failed here: fall back, keep the evidence
            payload["attention"][shape_name]["fast_rows_use"] = "default (layout pass failed: see rows)"
            row = run_row(args, device, shape_name, shape, variant, n, row_mb, "default",
                          profile=key in profile_keys and row_mb == mb, check_syncs=row_mb == mb)
            row["attention_pass_error"] = failed["error"]
        payload["rows"].append(row)
        save()
    payload["elapsed_s"] = round(time.time() - t_start, 1)
    save()
    print_report(payload, args)
    return payload


if __name__ == "__main__":
    main()
