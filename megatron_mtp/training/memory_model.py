"""Per-GPU memory of a training configuration, for any TP / PP / DP / ZeRO layout (the memory planner).

The estimate is a sum of named parts, each a formula of the config (see docs/benchmarks.md, "Memory planner"):

* **Model states** per GPU, from the parameters this rank holds (TP-sharded matrices, replicated norms, the
  pipeline stage's pieces) and the precision regime:

  ============  ======================================================  =========================================
  regime        who uses it                                             bytes per parameter
  ============  ======================================================  =========================================
  autocast      LocalEngine with train.master_weights false;            fp32 weights 4 + fp32 grads 4 + Adam 8,
                DeepSpeed with ZeRO 0                                   + 2 for autocast's bf16 weight copies
  bf16_master   LocalEngine's default (train.master_weights true;       bf16 weights 2 + fp32 masters 4 + Adam 8;
                training/master_weights.py)                             fp32 grads 4 after backward (bf16 grads 2
                                                                        with the compiled step, one micro-batch)
  ds_bf16       DeepSpeed bf16 with ZeRO 1/2                            bf16 weights 2 + bf16 grads 2 + fp32
                                                                        grad accumulation 4 (/dp under ZeRO 2) +
                                                                        fp32 masters and Adam 12 (/dp, ZeRO >= 1)
  ============  ======================================================  =========================================

* **Activations** per trunk layer: the bytes autograd saves per token, counted tensor by tensor for the Llama
  block with SDPA flash attention (q, k, v, out, log-sum-exp; never the [s, s] scores), split into the parts
  that TP shards (attention heads, SwiGLU width), the parts only sequence parallelism shards (norm inputs and
  outputs, residual stream) and the column-parallel linears' inputs (saved whole: the layer all-gathers the
  sequence before the GEMM). The coefficients come from ``measure_layer_saved_bytes`` — saved-tensor hooks
  on a tiny layer on CPU, slope over two token counts so weights and RoPE tables drop out — and are
  checked by tests/test_bench_tools.py; the compiled-layer ones were measured the same way (inductor's
  partitioner recomputes pointwise results instead of saving them). Checkpointed layers keep only their input;
  one layer is recomputed at a time.
* **Pipeline in flight**: with 1F1B, stage i holds the activations of min(pp - i, micro-batches) micro-batches.
* **Heads** (last stage): with memory-efficient heads, one head layer's activations, the cross-entropy chunk
  buffers (a [chunk, V/tp] logits block, d(hidden), d(weight) with its fp32 accumulator), the gradient of z and
  the heads' parameter gradients held until the trunk backward; without it, n heads' activations at once.

The planner (:func:`recommend`) enumerates layouts for a number of GPUs and ranks those that fit by a
throughput proxy (pipeline bubble, recomputation, TP communication, micro-batch GEMM efficiency).
"""
from __future__ import annotations

import copy
import dataclasses
import itertools
import math
from dataclasses import dataclass, field
from typing import Optional

import torch

from megatron_mtp.config import Config, ModelConfig, MTPConfig
from megatron_mtp.model.transformer import TransformerLayer, rope_cos_sin
from megatron_mtp.ops.fp8 import apply_fp8
from megatron_mtp.ops.linear_cross_entropy import loss_memory_chunking
from megatron_mtp.training.engine import uses_deepspeed_layout
from megatron_mtp.validation import trunk_layer_count

GiB = float(2**30)

# ---------------------------------------------------------------------------------------------------------
# Saved activations of one transformer layer, bytes per token, as coefficients of (d, Dkv = kv heads x
# head_dim, f, h = attention heads): {part: {symbol: coefficient}}. Parts:
#   rep  residual-stream / norm tensors: replicated over TP, sharded by sequence parallelism
#   lin  inputs of the two column-parallel GEMMs (QKV, gate/up): saved whole (gathered under SP)
#   tp   attention and MLP internals: sharded by TP
# Eager, autocast over fp32 weights (LocalEngine with train.master_weights false): per norm x (fp32) and
# x*rsqrt (fp32) 8d, bf16 cast of the norm output for the GEMM 2d; attention: the QKV output 2(d+2Dkv) (v is a view of it), roped q 2d and
# k 2Dkv, the output 2d, log-sum-exp 4h; MLP: gate/up output 4f, silu 2f, silu*up 2f; two rsqrt rows (8 bytes).
# Eager, bf16 weights: each norm saves x.float() 4d and its bf16 output 2d instead of 8d.
# Compiled (inductor), bf16 weights: the block input 2d, the norm outputs 2 x 2d, attention as eager plus a
# copy of the output for the out-projection 2d, the gate/up output 4f and silu*up 2f.
# Compiled, autocast: the fp32 block input 4d (the mid residual is recomputed), the bf16 norm outputs 2 x 2d,
# attention as the compiled bf16 case, gate/up 4f and silu*up 2f.
ACTIVATION_COEFFS = {
    ("autocast", False): {"rep": {"d": 16, "c": 8}, "lin": {"d": 4}, "tp": {"d": 6, "kv": 6, "h": 4, "f": 8}},
    ("bf16", False): {"rep": {"d": 12, "c": 8}, "lin": {"d": 4}, "tp": {"d": 6, "kv": 6, "h": 4, "f": 8}},
    ("bf16", True): {"rep": {"d": 2, "c": 8}, "lin": {"d": 4}, "tp": {"d": 8, "kv": 6, "h": 4, "f": 6}},
    ("autocast", True): {"rep": {"d": 4, "c": 8}, "lin": {"d": 4}, "tp": {"d": 8, "kv": 6, "h": 4, "f": 6}},
}

# train.fp8 (ops/fp8.py): each FP8 linear saves its input in e4m3 (1 byte) instead of bf16. Eager, measured as
# above: the two column-parallel inputs shrink 4d -> 2d, the down projection's input 2f -> f, while the
# out-projection saves an e4m3 copy of the attention output (+d) that SDPA keeps in bf16 anyway. Compiled,
# measured on an H100 (benchmarks/train_saved_bytes.json: d 2048 at two SwiGLU widths, which fixes the f
# coefficient; the d total is measured, its split into rep/lin/tp follows the eager reasoning): inductor saves
# the e4m3 copies instead of the bf16 ones, 14d -> 10d and 6f -> 4f.
FP8_ACTIVATION_COEFFS = {
    ("bf16", False): {"rep": {"d": 12, "c": 8}, "lin": {"d": 2}, "tp": {"d": 7, "kv": 6, "h": 4, "f": 7}},
    ("bf16", True): {"rep": {"d": 2, "c": 8}, "lin": {"d": 2}, "tp": {"d": 6, "kv": 6, "h": 4, "f": 4}},
}

# Extra bytes per token a head's backward needs beyond its saved activations (gradients of the block's
# intermediates alive at once: d(gate/up) [T, 2f], d(silu*up) [T, f], a few [T, d]).
HEAD_BACKWARD_COEFFS = {"d": 8, "f": 6}


def _coeff_bytes(part: dict, d: int, kv: int, f: int, h: int) -> float:
    return (part.get("d", 0) * d + part.get("kv", 0) * kv + part.get("f", 0) * f + part.get("h", 0) * h
            + part.get("c", 0))


def activation_mode(precision: str) -> str:
    return "autocast" if precision == "autocast" else "bf16"


def layer_activation_bytes(m: ModelConfig, tokens: int, *, precision: str, compiled: bool, tp: int = 1,
                           sequence_parallel: bool = False, fp8: bool = False) -> float:
    """Bytes saved for backward by one transformer layer over ``tokens`` tokens (this rank's share)."""
    key = (activation_mode(precision), bool(compiled))
    coeffs = FP8_ACTIVATION_COEFFS[key] if fp8 and key in FP8_ACTIVATION_COEFFS else ACTIVATION_COEFFS[key]
    d, kv, f, h = m.hidden_size, m.kv_heads * m.head_dim, m.ffn_size, m.num_attention_heads
    sp = tp if (sequence_parallel and tp > 1) else 1
    per_token = (_coeff_bytes(coeffs["rep"], d, kv, f, h) / sp + _coeff_bytes(coeffs["lin"], d, kv, f, h)
                 + _coeff_bytes(coeffs["tp"], d, kv, f, h) / tp)
    return per_token * tokens


# ---------------------------------------------------------------------------------------------------------
# Parameters


def layer_params(m: ModelConfig, tp: int = 1) -> dict:
    """{'matrix': TP-sharded matrix parameters on one rank, 'vector': replicated norm weights} of one layer."""
    d, hd = m.hidden_size, m.head_dim
    qkv = d * (m.num_attention_heads + 2 * m.kv_heads) * hd
    out = m.num_attention_heads * hd * d
    mlp = 3 * d * m.ffn_size
    return {"matrix": (qkv + out + mlp) / tp, "vector": 2 * d}


def pipeline_pieces(m: ModelConfig, mtp: MTPConfig, tp: int = 1) -> list:
    """The pieces the pipeline partitioner distributes, with parameter counts on one TP rank:
    embedding, each trunk layer, the output group (heads + final norm + unembedding)."""
    vocab = m.padded_vocab_size(tp) / tp
    layer = sum(layer_params(m, tp).values())
    trunk = trunk_layer_count(m, mtp)
    if mtp.head_type == "transformer":
        heads = mtp.n_heads * layer
    else:
        heads = mtp.n_heads * m.hidden_size * m.hidden_size / tp
    output = heads + m.hidden_size + (0 if m.tie_embeddings else vocab * m.hidden_size)
    if m.tie_embeddings:
        output += vocab * m.hidden_size  # the last stage's tied copy (DeepSpeed keeps both)
    pieces = [("embedding", vocab * m.hidden_size)]
    pieces += [(f"trunk.{i}", layer) for i in range(trunk)]
    pieces.append(("output", output))
    return pieces


def partition_balanced(weights: list, parts: int) -> list:
    """Contiguous split of ``weights`` into ``parts`` non-empty groups minimising the heaviest group (the
    ``parameters`` method of the pipeline partitioner). Returns boundaries [0, b1, ..., len]."""
    n = len(weights)
    if parts >= n:
        return list(range(parts + 1)) if parts == n else list(range(n + 1)) + [n] * (parts - n)
    prefix = [0.0]
    for w in weights:
        prefix.append(prefix[-1] + w)

    def split(limit: float):
        bounds, start = [0], 0
        for _ in range(parts - 1):
            end = start + 1
            while end < n and prefix[end + 1] - prefix[start] <= limit and n - (end + 1) >= parts - len(bounds):
                end += 1
            bounds.append(end)
            start = end
        bounds.append(n)
        ok = all(prefix[bounds[i + 1]] - prefix[bounds[i]] <= limit + 1e-6 for i in range(parts))
        return ok, bounds

    lo, hi = max(weights), prefix[-1]
    best = split(hi)[1]
    for _ in range(60):
        mid = (lo + hi) / 2
        ok, bounds = split(mid)
        if ok:
            hi, best = mid, bounds
        else:
            lo = mid
    return best


# ---------------------------------------------------------------------------------------------------------
# The estimate


@dataclass
class Layout:
    tp: int = 1
    pp: int = 1
    dp: int = 1
    zero_stage: int = 0
    sequence_parallel: bool = False
    micro_batch: int = 1
    seq_length: int = 2048
    grad_accum: int = 1  # micro-batches per optimizer step per DP rank (1F1B: also the pipeline's micro-batches)
    activation_checkpointing: str = "none"
    compiled: bool = False
    compiled_step: bool = False  # optimizer.compiled_step: with compiled layers, the optimizer step is compiled
    precision: str = "autocast"  # autocast | bf16_master | ds_bf16 | fp32
    fp8: bool = False  # train.fp8: the linears save e4m3 inputs (FP8_ACTIVATION_COEFFS)
    memory_efficient_heads: bool = True

    def describe(self) -> str:
        sp = "+sp" if self.sequence_parallel and self.tp > 1 else ""
        return (f"tp{self.tp}{sp} pp{self.pp} dp{self.dp} zero{self.zero_stage} mb{self.micro_batch} "
                f"ac={self.activation_checkpointing}")


@dataclass
class StageMemory:
    stage: int
    params: float
    bytes: dict = field(default_factory=dict)
    phase: str = "forward_heads"

    @property
    def total(self) -> float:
        return sum(self.bytes.values())


def default_precision(cfg: Config, layout: Layout, engine: str = "auto") -> str:
    """The regime the engines run for this layout on GPU with bf16 (see the module docstring)."""
    if cfg.train.dtype == "float32":
        return "fp32"
    uses_ds = uses_deepspeed_layout(layout.dp, layout.pp, layout.zero_stage)
    if engine == "local" or (engine == "auto" and not uses_ds):
        return "bf16_master" if cfg.train.master_weights else "autocast"
    return "ds_bf16" if layout.zero_stage >= 1 else "autocast"


def _state_bytes(params: float, precision: str, zero: int, dp: int, bf16_grads: bool = False) -> tuple:
    """Model-state bytes on one GPU for ``params`` parameters, as two dicts: (while the forward and the heads
    run — no trunk gradients yet; after the backward — every gradient exists). ``bf16_grads``: the compiled
    master-weight step reads the bf16 gradients of a single micro-batch, with no fp32 copy of them."""
    if precision in ("autocast", "fp32"):
        opt = 8 * params / (dp if zero >= 1 else 1)
        grads = 4 * params / (dp if zero >= 2 else 1)
        during = {"weights": 4 * params, "optimizer": opt}
        if precision == "autocast":
            during["weight_casts"] = 2 * params  # autocast's bf16 copies, saved for backward
        return during, {"weights": 4 * params, "optimizer": opt, "grads": grads}
    if precision == "bf16_master":
        during = {"weights": 2 * params, "master": 4 * params, "optimizer": 8 * params}
        return during, {**during, "grads": (2 if bf16_grads else 4) * params}
    if precision == "ds_bf16":
        shard = dp if zero >= 1 else 1
        during = {"weights": 2 * params, "grad_accum": 4 * params / (dp if zero >= 2 else 1),
                  "master": 4 * params / shard, "optimizer": 8 * params / shard}
        return during, {**during, "grads": 2 * params}
    raise ValueError(f"unknown precision regime {precision!r}")


def ce_buffer_bytes(m: ModelConfig, tokens: int, tp: int, compute_bytes: int, loss_memory: str = "fast") -> float:
    """Peak extra bytes of one fused linear cross-entropy call (ops/linear_cross_entropy.py): a logits chunk,
    d(hidden), d(weight) with, over several chunks in "fast" mode, half of its fp32 accumulator beside it,
    per-row statistics."""
    v_local = m.padded_vocab_size(tp) // tp
    chunk, fp32_weight_grad = loss_memory_chunking(loss_memory, tokens, v_local, m.hidden_size, compute_bytes,
                                                   torch.device("cuda"))
    logits = chunk * v_local * compute_bytes
    fp32_split = fp32_weight_grad and compute_bytes < 4 and chunk < tokens
    d_weight = v_local * m.hidden_size * (compute_bytes + 2 if fp32_split else compute_bytes)
    d_hidden = tokens * m.hidden_size * compute_bytes
    stats = tokens * 4 * 6
    return logits + d_weight + d_hidden + stats


def estimate(cfg: Config, layout: Layout) -> list:
    """Per-stage memory estimates (bytes) for ``cfg`` under ``layout``; the first stage first."""

    m, mtp = cfg.model, cfg.mtp
    tp, pp = layout.tp, layout.pp
    sp = layout.sequence_parallel and tp > 1
    tokens = layout.micro_batch * layout.seq_length
    pieces = pipeline_pieces(m, mtp, tp)
    bounds = partition_balanced([w for _, w in pieces], pp) if pp > 1 else [0, len(pieces)]
    precision = layout.precision
    act_bytes_resid = 4 if precision in ("autocast", "fp32") else 2
    compute_bytes = 4 if precision in ("autocast", "fp32") else 2
    layer_act = layer_activation_bytes(m, tokens, precision=precision, compiled=layout.compiled, tp=tp,
                                       sequence_parallel=sp, fp8=layout.fp8)
    if precision == "fp32":
        layer_act *= 2  # no bf16 anywhere: every saved tensor at 4 bytes
    layer_input = tokens * m.hidden_size * act_bytes_resid / (tp if sp else 1)
    ac = layout.activation_checkpointing
    every = 0 if ac == "none" else 1 if ac == "full" else int(ac.split("_", 1)[1])
    stages = []
    for s in range(pp):
        names = [name for name, _ in pieces[bounds[s]:bounds[s + 1]]]
        params = sum(w for _, w in pieces[bounds[s]:bounds[s + 1]])
        st = StageMemory(stage=s, params=params)
        during, after = _state_bytes(params, precision, layout.zero_stage, layout.dp,
                                     bf16_grads=layout.compiled and layout.compiled_step and layout.grad_accum == 1)
        st.bytes.update(during)
        trunk = [n for n in names if n.startswith("trunk.")]
        checkpointed = [n for n in trunk if every and int(n.split(".")[1]) % every == 0]
        inflight = min(pp - s, max(1, layout.grad_accum)) if pp > 1 else 1
        saved = (len(trunk) - len(checkpointed)) * layer_act + len(checkpointed) * layer_input
        st.bytes["activations"] = saved * inflight
        if checkpointed:
            st.bytes["recompute"] = layer_act  # one checkpointed layer re-run at a time in backward
        if "embedding" in names:
            st.bytes["embedding"] = tokens * 8 * inflight  # token ids saved by the embedding
        if pp > 1:
            st.bytes["p2p_buffers"] = 2 * tokens * m.hidden_size * 2 / (tp if sp else 1)
        if "output" in names:
            head_layers = mtp.n_heads if mtp.head_type == "transformer" else 0
            out_params = dict(pieces)["output"]
            z = tokens * m.hidden_size * act_bytes_resid / (tp if sp else 1)
            grad_bytes = 2 if precision in ("bf16_master", "ds_bf16") else 4
            heads = {}
            heads["grad_z"] = z
            heads["head_grads"] = out_params * grad_bytes  # held by the memory-efficient node until backward
            one_head = layer_act if head_layers else tokens * m.hidden_size * compute_bytes * 2
            norm = tokens * m.hidden_size * (8 if precision in ("autocast", "fp32") else 6) / (tp if sp else 1)
            hidden = tokens * m.hidden_size * compute_bytes  # the CE input, gathered under SP
            bwd = tokens * (HEAD_BACKWARD_COEFFS["d"] * m.hidden_size + HEAD_BACKWARD_COEFFS["f"] * m.ffn_size) / tp
            ce = ce_buffer_bytes(m, tokens, tp, compute_bytes, mtp.loss_memory)
            if layout.memory_efficient_heads:
                heads["head_activations"] = one_head + norm + hidden
                heads["head_backward"] = bwd
                heads["ce_buffers"] = ce
            else:
                heads["head_activations"] = mtp.n_heads * (one_head + norm + hidden)
                heads["head_backward"] = bwd
                heads["ce_buffers"] = ce + (mtp.n_heads - 1) * (ce - tokens * 4 * 6)
            st.bytes.update(heads)
        # The step peaks either while the heads run (all trunk activations alive) or after the backward
        # (every gradient alive, activations gone): keep the larger phase.
        if sum(after.values()) > st.total:
            st.bytes = dict(after)
            st.phase = "after_backward"
        stages.append(st)
    return stages


def peak_bytes(cfg: Config, layout: Layout) -> float:
    return max(st.total for st in estimate(cfg, layout))


def breakdown_gib(cfg: Config, layout: Layout) -> dict:
    """The heaviest stage's parts in GiB (plus 'total')."""
    stages = estimate(cfg, layout)
    worst = max(stages, key=lambda s: s.total)
    out = {k: v / GiB for k, v in worst.bytes.items()}
    out["total"] = worst.total / GiB
    out["stage"] = worst.stage
    out["phase"] = worst.phase
    out["params_per_gpu"] = worst.params
    return out


def layout_from_config(cfg: Config, world_size: int, *, precision: Optional[str] = None,
                       compiled: Optional[bool] = None, engine: str = "auto") -> Layout:
    p, t = cfg.parallel, cfg.train
    dp = max(1, world_size // (p.tp * p.pp))
    per_step = t.micro_batch_size * dp
    accum = t.grad_accum or (t.global_batch_size // per_step if t.global_batch_size else 1)
    layout = Layout(tp=p.tp, pp=p.pp, dp=dp, zero_stage=p.zero_stage, sequence_parallel=p.sequence_parallel,
                    micro_batch=t.micro_batch_size, seq_length=cfg.data.seq_length, grad_accum=max(1, accum),
                    activation_checkpointing=t.activation_checkpointing,
                    compiled=t.compile if compiled is None else compiled, compiled_step=cfg.optimizer.compiled_step,
                    memory_efficient_heads=cfg.mtp.memory_efficient, fp8=bool(t.fp8))
    layout.precision = precision or default_precision(cfg, layout, engine)
    return layout


# ---------------------------------------------------------------------------------------------------------
# Layout recommendations


TP_EFFICIENCY = {1: 1.0, 2: 0.95, 4: 0.89, 8: 0.80}  # intra-node TP+SP communication (NVLink), rough
RECOMPUTE_COST = {"none": 1.0, "full": 4 / 3}  # full recomputation re-runs every trunk forward (+1/3 of 3 passes)


def throughput_proxy(cfg: Config, layout: Layout) -> float:
    """Relative tokens/s per GPU (1.0 = no parallelism overhead, full-size GEMMs). A ranking aid, not a
    prediction: pipeline bubble (pp-1)/(m+pp-1) for 1F1B, recomputation, TP efficiency, small-GEMM penalty."""
    m = max(1, layout.grad_accum)
    bubble = m / (m + layout.pp - 1) if layout.pp > 1 else 1.0
    ac = layout.activation_checkpointing
    if ac in RECOMPUTE_COST:
        recompute = RECOMPUTE_COST[ac]
    else:
        k = int(ac.split("_", 1)[1])
        recompute = 1 + (1 / 3) / k
    tokens = layout.micro_batch * layout.seq_length
    gemm = min(1.0, 0.85 + 0.05 * math.log2(max(1, tokens / 1024)))
    tp_eff = TP_EFFICIENCY.get(layout.tp, 0.7)
    zero = 0.98 if layout.zero_stage >= 2 else 1.0  # ZeRO-2's extra gather traffic, overlapped in part
    # ZeRO 0 under DeepSpeed runs fp32 weights under autocast: per-micro-batch weight casts, fp32 all-reduce
    regime = 0.97 if layout.precision == "autocast" else 1.0
    p2p = 1.0 - 0.01 * (layout.pp - 1)  # stage-to-stage sends and per-micro-batch scheduling
    return bubble / recompute * gemm * tp_eff * zero * regime * p2p


def _divides(tp: int, m: ModelConfig) -> bool:
    return (m.num_attention_heads % tp == 0 and m.kv_heads % tp == 0 and m.ffn_size % tp == 0)


def recommend(cfg: Config, gpus: int, gpu_memory_gib: float, *, gpus_per_node: int = 8, headroom: float = 0.10,
              reserved_gib: float = 2.5, global_batch: Optional[int] = None, engine: str = "auto",
              micro_batches=(1, 2, 4, 8), checkpointing=("none", "every_4", "every_2", "full"),
              limit: int = 15) -> list:
    """Layouts that fit ``gpus`` GPUs of ``gpu_memory_gib`` each (TP within a node), best throughput proxy first.

    Fits: estimated peak <= (memory - reserved_gib for the CUDA context / NCCL / cuBLAS) x (1 - headroom)."""
    m = cfg.model
    gbs = global_batch or cfg.train.global_batch_size or 1024
    budget = (gpu_memory_gib - reserved_gib) * (1 - headroom) * GiB
    trunk = trunk_layer_count(m, cfg.mtp)
    rows = []
    tps = [t for t in (1, 2, 4, 8) if t <= gpus_per_node and gpus % t == 0 and _divides(t, m)]
    for tp, pp in itertools.product(tps, (1, 2, 4, 8, 16)):
        if gpus % (tp * pp) or pp > trunk + 1:
            continue
        dp = gpus // (tp * pp)
        for zero, mb, ac in itertools.product((0, 1, 2), micro_batches, checkpointing):
            if pp > 1 and zero > 1:
                continue
            if gbs % (mb * dp):
                continue
            accum = gbs // (mb * dp)
            layout = Layout(tp=tp, pp=pp, dp=dp, zero_stage=zero, sequence_parallel=tp > 1, micro_batch=mb,
                            seq_length=cfg.data.seq_length, grad_accum=accum, activation_checkpointing=ac,
                            compiled=cfg.train.compile, memory_efficient_heads=cfg.mtp.memory_efficient,
                            fp8=bool(cfg.train.fp8))
            layout.precision = default_precision(cfg, layout, engine)
            if layout.precision == "autocast" and dp > 1 and engine == "auto" and zero == 0:
                pass  # DeepSpeed ZeRO 0: fp32 weights under autocast, all-reduced grads
            peak = peak_bytes(cfg, layout)
            if peak > budget:
                continue
            rows.append({"layout": layout, "peak_gib": peak / GiB, "proxy": throughput_proxy(cfg, layout),
                         "headroom_gib": (budget - peak) / GiB})
    # best proxy first; among equals prefer less model parallelism, then more headroom
    rows.sort(key=lambda r: (-round(r["proxy"], 3), r["layout"].tp * r["layout"].pp, -r["headroom_gib"]))
    # keep the best micro-batch / checkpointing per (tp, pp, zero)
    seen, best = set(), []
    for r in rows:
        key = (r["layout"].tp, r["layout"].pp, r["layout"].zero_stage)
        if key in seen:
            continue
        seen.add(key)
        best.append(r)
    return best[:limit]


# ---------------------------------------------------------------------------------------------------------
# Calibration: bytes autograd saves per token for one layer


def measure_layer_saved_bytes(m: ModelConfig, *, precision: str = "autocast", compiled: bool = False,
                              device: str = "cpu", batch: tuple = (2, 4), seq: int = 64,
                              return_tensors: bool = False, fp8: bool = False):
    """Saved-for-backward bytes per token of one ``TransformerLayer``: forward at two batch sizes under
    ``saved_tensors_hooks``, unique storages (a view keeps its whole base alive), parameters excluded, and the
    slope taken so per-call constants (weight casts, RoPE tables) drop out."""
    torch.manual_seed(0)
    dev = torch.device(device)
    pdtype = torch.bfloat16 if precision in ("bf16", "bf16_master", "ds_bf16") else torch.float32
    layer = TransformerLayer(m, "calib.0", dtype=pdtype).to(dev)
    with torch.no_grad():
        for p in layer.parameters():
            p.normal_(0, 0.02) if p.dim() > 1 else p.fill_(1.0)
    if fp8:
        apply_fp8(layer)
    if compiled:
        layer.compile(dynamic=False)
    autocast = precision == "autocast"
    params = {p.untyped_storage().data_ptr() for p in layer.parameters()}
    results, listing = [], []
    for b in batch:
        x = torch.randn(b, seq, m.hidden_size, device=dev, dtype=pdtype, requires_grad=True)
        cos, sin = rope_cos_sin(torch.arange(seq, device=dev), m.head_dim, m.rope_theta, pdtype)
        seen = {}

        def pack(t):
            st = t.untyped_storage()
            if st.data_ptr() not in params:
                seen.setdefault(st.data_ptr(), (st.nbytes(), tuple(t.shape), str(t.dtype)))
            return t

        ctx = torch.autocast(dev.type, dtype=torch.bfloat16) if autocast else _null()
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), ctx:
            y = layer(x, cos, sin)
        y.float().sum().backward()
        results.append(sum(v[0] for v in seen.values()))
        listing = sorted(seen.values(), key=lambda v: -v[0])
    per_token = (results[1] - results[0]) / ((batch[1] - batch[0]) * seq)
    return (per_token, listing) if return_tensors else per_token


class _null:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


def formula_bytes_per_token(m: ModelConfig, precision: str, compiled: bool, fp8: bool = False) -> float:
    return layer_activation_bytes(m, 1, precision=precision, compiled=compiled, fp8=fp8)


def with_overrides(cfg: Config, **sections) -> Config:
    """A deep copy of cfg with {section: {key: value}} applied (no validation)."""
    out = copy.deepcopy(cfg)
    for section, values in sections.items():
        target = getattr(out, section)
        for k, v in values.items():
            setattr(target, k, v)
    return out


def asdict_layout(layout: Layout) -> dict:
    return dataclasses.asdict(layout)
