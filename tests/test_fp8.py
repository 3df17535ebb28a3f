"""FP8 training (``train.fp8``, ``ops/fp8.py``): the scaled GEMMs' math, the config and device checks, the model
pass, tensor parallelism, and a checkpoint round trip.

On CPU, torch's ``_scaled_mm`` has a (slow) FP8 kernel, so the same code path runs here at tiny sizes:
exactly against an emulated reference (operands quantized and dequantized with the same scales, then an
fp32 matmul, tight tolerance: this checks the scales, the formats and every transpose), and loosely against
the plain fp32 linear (FP8's rounding: e4m3 forward ~3-4%, e5m2 gradients ~6% relative, both bounded here).
The tests marked ``cuda`` run on Hopper/Ada GPUs only (tools/bench_train_gpu.sh runs them): bf16 operands at
real sizes, eager and compiled, whose measured errors are written to $FP8_CHECK_JSON when set.
"""
import json
import os

import pytest
import torch
import torch.nn.functional as F

from megatron_mtp.config import Config, ConfigError, load_config, validate
from megatron_mtp.ops.fp8 import E4M3, E5M2, apply_fp8, check_fp8_device, fp8_linear, to_float8

HAS_FP8_GPU = torch.cuda.is_available() and torch.cuda.get_device_capability() >= (8, 9)
cuda = pytest.mark.skipif(not HAS_FP8_GPU, reason="needs a GPU with FP8 tensor cores (compute capability >= 8.9)")
RESULTS = {}


def rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def quantized(t, dtype):
    """t rounded through the FP8 format (the values the GEMM sees, dequantized) in fp32."""
    t8, inv = to_float8(t, dtype)
    return t8.float() * inv


def emulated_linear_grads(x, w, g):
    """What the three FP8 GEMMs compute, done in fp32 on the quantized operands."""
    xq, wq, gq = quantized(x.reshape(-1, x.size(-1)), E4M3), quantized(w, E4M3), quantized(g.reshape(-1, g.size(-1)), E5M2)
    y = xq @ wq.t()
    return y.view(*x.shape[:-1], -1), (gq @ wq).view(x.shape), gq.t() @ xq


def run_fp8(x, w, g):
    x = x.detach().clone().requires_grad_()
    w = w.detach().clone().requires_grad_()
    y = fp8_linear(x, w)
    y.backward(g)
    return y.detach(), x.grad, w.grad


def test_to_float8_saturates_at_amax_and_keeps_zero():
    t = torch.tensor([[-3.0, 0.5, 1.5, 0.0]] * 4)
    t8, inv = to_float8(t, E4M3)
    assert t8.dtype == E4M3 and t8.float().abs().max().item() == 448.0  # amax maps to e4m3's largest value
    assert torch.allclose(t8.float() * inv, t, rtol=2 ** -3)
    z8, zinv = to_float8(torch.zeros(4, 4), E5M2)
    assert torch.isfinite(zinv) and (z8.float() == 0).all()  # the amax floor: no inf/NaN scale on zeros


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fp8_linear_equals_emulated_gemms_and_is_close_to_the_plain_linear(dtype):
    torch.manual_seed(0)
    x = torch.randn(2, 16, 64).to(dtype)
    w = (torch.randn(48, 64) * 0.05).to(dtype)
    g = torch.randn(2, 16, 48).to(dtype)
    y, gx, gw = run_fp8(x, w, g)
    assert y.dtype == gx.dtype == gw.dtype == dtype and gx.shape == x.shape and gw.shape == w.shape
    ref_y, ref_gx, ref_gw = emulated_linear_grads(x.float(), w.float(), g.float())
    tight = 1e-5 if dtype == torch.float32 else 8e-3  # bf16 output rounding
    assert rel(y, ref_y) < tight and rel(gx, ref_gx) < tight and rel(gw, ref_gw) < tight
    xf, wf = x.float().requires_grad_(), w.float().requires_grad_()
    yf = F.linear(xf, wf)
    yf.backward(g.float())
    errs = rel(y, yf), rel(gx, xf.grad), rel(gw, wf.grad)
    # FP8 rounding is there (the path really ran in FP8) and bounded
    assert 1e-3 < errs[0] < 0.06 and 1e-3 < errs[1] < 0.1 and 1e-3 < errs[2] < 0.1, errs


def test_fp8_linear_casts_each_operand_once_and_saves_the_transposed_fp8_copies():
    """The forward casts x and W once, in both layouts, and keeps only the transposed FP8 copies the backward GEMMs
    read: the backward never casts the weight again (dx uses the FP8 weight of the forward, even if the weight
    changed in between) and holds no bf16 or fp32 copy of x or W."""
    torch.manual_seed(1)
    x = torch.randn(32, 64).bfloat16().requires_grad_()
    w = (torch.randn(48, 64) * 0.05).bfloat16().requires_grad_()
    g = torch.randn(32, 48).bfloat16()
    y = fp8_linear(x, w)
    saved = y.grad_fn.saved_tensors
    assert [t.dtype for t in saved] == [E4M3, torch.float32, E4M3, torch.float32]
    assert saved[0].shape == (64, 32) and saved[2].shape == (64, 48)  # x8ᵀ [in, tokens], W8ᵀ [in, out]
    assert saved[0].is_contiguous() and saved[2].is_contiguous()
    _, ref_gx, ref_gw = emulated_linear_grads(x.detach().float(), w.detach().float(), g.float())
    with torch.no_grad():
        w.mul_(2.0)  # after the forward: the backward must not see it
    y.backward(g)
    assert rel(x.grad, ref_gx) < 8e-3 and rel(w.grad, ref_gw) < 8e-3
    with torch.no_grad():  # evaluation: no transposed copies are made (nothing is saved)
        assert fp8_linear(x, w).grad_fn is None


def test_fp8_linear_under_autocast_returns_the_autocast_dtype():
    x, w = torch.randn(16, 32), torch.randn(16, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = fp8_linear(x, w)
    assert y.dtype == torch.bfloat16


def test_fp8_linear_falls_back_to_the_plain_gemm_when_tokens_do_not_suit_fp8():
    x, w = torch.randn(5, 32), torch.randn(16, 32)  # 5 tokens: not a multiple of 16
    assert torch.equal(fp8_linear(x, w), F.linear(x, w))


def test_config_fp8_flag_and_its_combinations():
    cfg = load_config("configs/tiny.yaml", [])
    assert cfg.train.fp8 is False  # off by default
    cfg = load_config("configs/tiny.yaml", ["--train.fp8", "true", "--train.device", "auto"])
    assert cfg.train.fp8 is True
    with pytest.raises(ConfigError, match=r"^train.fp8 needs a GPU with FP8 tensor cores, but train.device is cpu"):
        load_config("configs/tiny.yaml", ["--train.fp8", "true"])  # tiny.yaml trains on the CPU
    with pytest.raises(ConfigError, match=r"train.dtype is float32; set train.dtype to auto or bfloat16"):
        load_config("configs/tiny.yaml", ["--train.fp8", "true", "--train.device", "cuda", "--train.dtype", "float32"])
    cfg = Config()
    cfg.train.fp8 = "yes"
    with pytest.raises(ConfigError, match=r"train.fp8 must be true or false"):
        validate(cfg)


def test_fp8_device_check_names_the_problem():
    with pytest.raises(ConfigError, match=r"^train.fp8 needs an NVIDIA GPU .* but this run is on cpu; set train.fp8 false\.$"):
        check_fp8_device("cpu")
    with pytest.raises(ConfigError, match=r"compute capability 8.9 or newer.* has 8\.0; set train.fp8 false\.$"):
        check_fp8_device("cuda", capability=(8, 0))  # an A100
    check_fp8_device("cuda", capability=(9, 0))  # an H100: no error


def tiny_cfg(**model):
    cfg = Config()
    cfg.model.vocab_size, cfg.model.hidden_size, cfg.model.num_layers = 96, 64, 3
    cfg.model.num_attention_heads, cfg.model.num_kv_heads, cfg.model.ffn_hidden_size = 4, 2, 96
    cfg.model.make_vocab_size_divisible_by = 32
    for k, v in model.items():
        setattr(cfg.model, k, v)
    cfg.mtp.n_heads = 2
    cfg.data.seq_length = 16
    cfg.optimizer.warmup_iters = 0
    return cfg


def test_apply_fp8_routes_every_trunk_and_head_linear_and_leaves_the_state_dict_alone():
    from megatron_mtp.model.builder import build_model

    cfg = tiny_cfg()
    plain = build_model(cfg, "cpu", seed=3, compile=False)
    model = build_model(cfg, "cpu", seed=3, compile=False)
    assert apply_fp8(model) == 4 * cfg.model.num_layers  # qkv, out, gate_up, down per layer, heads included
    assert all(m.gemm is fp8_linear for m in model.modules() if hasattr(m, "gemm"))
    assert list(model.state_dict()) == list(plain.state_dict())  # no scaling state: checkpoints are unchanged
    tokens = torch.randint(0, 96, (2, 17), generator=torch.Generator().manual_seed(0))
    loss8, heads8 = model(tokens)
    loss, heads = plain(tokens)
    assert 1e-5 < abs(loss8.item() - loss.item()) / loss.item() < 0.02, (loss8.item(), loss.item())
    with pytest.raises(ConfigError, match=r"divisible by 16 .* trunk.0.qkv is 80 x 40 on this rank"):
        apply_fp8(build_model(tiny_cfg(hidden_size=40, ffn_hidden_size=96), "cpu", compile=False))


def test_build_model_applies_train_fp8_only_where_the_device_has_it():
    """build_model follows train.fp8 and checks the device first; tools that rebuild a model of an FP8 run on a
    CPU (merging, export) pass fp8=False and get the plain model."""
    from megatron_mtp.model.builder import build_model

    cfg = tiny_cfg()
    cfg.train.fp8 = True
    with pytest.raises(ConfigError, match=r"but this run is on cpu; set train.fp8 false\.$"):
        build_model(cfg, "cpu", seed=1, compile=False)
    model = build_model(cfg, "cpu", seed=1, compile=False, fp8=False)
    assert all(m.gemm is F.linear for m in model.modules() if hasattr(m, "gemm"))


def test_fp8_training_resumes_from_a_checkpoint_exactly(tmp_path):
    """No scaling state: a run saved after two FP8 steps and resumed takes the same third step as the run that
    never stopped."""
    from megatron_mtp.model.builder import build_model
    from megatron_mtp.training.local_engine import LocalEngine

    cfg = tiny_cfg()
    gen = torch.Generator().manual_seed(1)
    batches = [torch.randint(0, 96, (2, 17), generator=gen) for _ in range(3)]

    def engine(seed):
        model = build_model(cfg, "cpu", seed=seed, compile=False)
        apply_fp8(model)
        return LocalEngine(model, cfg, torch.device("cpu"), torch.float32)

    a = engine(5)
    for step in (1, 2):
        a.train_step([batches[step - 1]], step)
    a.save_to(str(tmp_path))
    b = engine(99)  # other initial weights: everything must come from the checkpoint
    b.load_from(str(tmp_path))
    ra, rb = a.train_step([batches[2]], 3), b.train_step([batches[2]], 3)
    assert torch.equal(ra.loss, rb.loss) and torch.equal(ra.grad_norm, rb.grad_norm)
    for (name, pa), pb in zip(a.model.named_parameters(), b.model.parameters()):
        assert torch.equal(pa, pb), name


def _tp_fp8_worker(rank, world, sequence_parallel):
    """TP=2 (+SP) FP8 loss and gradients, and the TP=1 FP8 model's in the same process; returns the relative
    differences (plain floats: tensors do not outlive a spawned process)."""
    import torch.distributed as dist

    from megatron_mtp.model.builder import build_model
    from megatron_mtp.parallel import state
    from megatron_mtp.parallel.layers import unshard
    from megatron_mtp.training.grads import allreduce_sequence_parallel_grads

    state.initialize_model_parallel(world, 1)
    try:
        cfg = tiny_cfg()
        cfg.parallel.tp, cfg.parallel.sequence_parallel = world, sequence_parallel
        tokens = torch.randint(0, 96, (2, 17), generator=torch.Generator().manual_seed(0))
        out = {}
        for name, single in (("tp", False), ("ref", True)):
            model = build_model(cfg, "cpu", seed=7, compile=False, single_process=single)
            apply_fp8(model)
            with (state.single_process_layout() if single else torch.enable_grad()):
                loss, _ = model(tokens)
                loss.backward()
                if not single:
                    allreduce_sequence_parallel_grads(model)
            out[name] = (loss.item(), {p.init_key: p for p in model.parameters()})
        errs = {"loss": abs(out["tp"][0] - out["ref"][0]) / out["ref"][0]}
        for key, p in out["tp"][1].items():
            g = p.grad
            if getattr(p, "partition_dim", -1) >= 0:
                parts = [torch.empty_like(g) for _ in range(world)]
                dist.all_gather(parts, g.contiguous(), group=state.tp_group())
                g = unshard(parts, p)
            ref = out["ref"][1][key].grad
            errs[key] = rel(g[: ref.size(0)], ref)  # vocabulary padding grows with tp: real rows only
        return errs
    finally:
        state.destroy_model_parallel()


def test_fp8_under_tensor_and_sequence_parallelism_matches_one_process():
    """TP=2 with sequence parallelism and FP8 against TP=1 with FP8: each rank scales its own shard, so the two
    agree within FP8 rounding (not bitwise); every gradient is compared after unsharding."""
    from dist_utils import run_distributed

    errs = run_distributed(_tp_fp8_worker, 2, True)[0]
    assert errs.pop("loss") < 0.01
    assert len(errs) > 10 and max(errs.values()) < 0.15, errs


# ---------------------------------------------------------------------------------------------------------
# GPU (Hopper / Ada): bf16 operands at a real layer's size, eager and compiled


def _record(name, **errs):
    RESULTS[name] = {k: round(v, 5) for k, v in errs.items()}
    print(f"fp8 check {name}: {RESULTS[name]}")
    path = os.environ.get("FP8_CHECK_JSON")
    if path:
        meta = {"device": torch.cuda.get_device_name(), "torch": torch.__version__}
        with open(path, "w") as f:
            json.dump({"meta": meta, "checks": RESULTS}, f, indent=1)


@cuda
def test_cuda_fp8_linear_against_emulation_and_bf16():
    torch.manual_seed(0)
    x = torch.randn(4, 1024, 2048, device="cuda").bfloat16()
    w = (torch.randn(5632, 2048, device="cuda") * 0.02).bfloat16()
    g = torch.randn(4, 1024, 5632, device="cuda").bfloat16()
    y, gx, gw = run_fp8(x, w, g)
    ref_y, ref_gx, ref_gw = emulated_linear_grads(x.float(), w.float(), g.float())
    emu = dict(y=rel(y, ref_y), dx=rel(gx, ref_gx), dw=rel(gw, ref_gw))
    xb, wb = x.clone().requires_grad_(), w.clone().requires_grad_()
    yb = F.linear(xb, wb)
    yb.backward(g)
    vs_bf16 = dict(y=rel(y, yb), dx=rel(gx, xb.grad), dw=rel(gw, wb.grad))
    _record("eager_vs_emulated", **emu)
    _record("eager_vs_bf16", **vs_bf16)
    assert max(emu.values()) < 1e-2  # the GEMMs compute exactly the quantized product (bf16 output rounding)
    assert vs_bf16["y"] < 0.06 and vs_bf16["dx"] < 0.1 and vs_bf16["dw"] < 0.1


@cuda
def test_cuda_fp8_transformer_layer_compiled_in_one_graph_matches_eager_and_bf16():
    from megatron_mtp.config import ModelConfig
    from megatron_mtp.model.transformer import TransformerLayer, rope_cos_sin

    m = ModelConfig(hidden_size=2048, num_attention_heads=16, num_kv_heads=4, ffn_hidden_size=5632)
    torch.manual_seed(0)
    layer = TransformerLayer(m, "trunk.0", dtype=torch.bfloat16).cuda()
    with torch.no_grad():
        for p in layer.parameters():
            p.normal_(0.0, 0.02) if p.dim() > 1 else p.fill_(1.0)
    cos, sin = rope_cos_sin(torch.arange(1024, device="cuda"), m.head_dim, m.rope_theta, torch.bfloat16)
    x = torch.randn(4, 1024, 2048, device="cuda").bfloat16()
    g = torch.randn_like(x)

    def run(fn):
        xi = x.clone().requires_grad_()
        for p in layer.parameters():
            p.grad = None
        y = fn(xi, cos, sin)
        y.backward(g)
        return y.detach(), xi.grad, layer.mlp.gate_up.weight.grad.clone(), layer.attn.qkv.weight.grad.clone()

    bf16 = run(layer)
    apply_fp8(layer)
    eager = run(layer)
    compiled_fn = torch.compile(layer.forward, fullgraph=True)  # no graph break around the FP8 casts
    compiled = run(compiled_fn)
    names = ("y", "dx", "dw_gate_up", "dw_qkv")
    vs_bf16 = {n: rel(a, b) for n, a, b in zip(names, compiled, bf16)}
    vs_eager = {n: rel(a, b) for n, a, b in zip(names, compiled, eager)}
    _record("layer_compiled_vs_bf16", **vs_bf16)
    _record("layer_compiled_vs_eager_fp8", **vs_eager)
    # One GEMM's FP8 error is ~4% forward (e4m3) and ~6% backward (e5m2) (the test above); a layer chains four,
    # and its weight gradients see the upstream ones too. Compiled against eager FP8 is of the same order, not
    # bitwise: inductor's bf16 intermediates differ in the last bit, which moves the amax and per-tensor scale and
    # flips elements near a rounding boundary to the neighbouring FP8 value (one FP8 step is 12-25%), and these
    # flips compound through the backward (measured on an H100: y 0.023, dx 0.039, dW 0.054 / 0.099).
    assert vs_bf16["y"] < 0.06 and vs_bf16["dx"] < 0.1 and vs_bf16["dw_gate_up"] < 0.15 and vs_bf16["dw_qkv"] < 0.15
    assert max(vs_eager.values()) < 0.15
