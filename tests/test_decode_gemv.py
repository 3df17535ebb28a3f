"""The decode step's GEMV layer kernels (``ops/decode_gemv.py``, the decoder's ``layer_kernels="triton"``)
against the torch layer programs (``decode_qkv`` / ``decode_mlp``), on the CPU through Triton's interpreter.

The kernels multiply with products and sums, not ``tl.dot``, so the interpreter runs bf16 as well as fp32 (its
conversions to bf16 truncate, so bf16 is checked loosely here). On a GPU, ``test_generation.py::test_cuda_graph_path_gives_the_eager_tokens`` runs them captured and compiled.
"""
import pytest
import torch

from megatron_mtp.ops import decode_gemv as kernels
from test_decode_attention import needs_triton, run_interpreted


@needs_triton
def test_gemv_layer_kernels_equal_the_torch_programs():
    """Every layout the decoder hands them: one layer or m stacked draft heads, the residual stream shared by the
    m layers or one per layer, batch x new tokens from 1 to MAX_ROWS (a row count that is not a power of two),
    GQA groups of 1-4, head dims 8-32, hidden and FFN sizes that are not multiples of the K block, per-sequence
    cache slots (one clamped at the last slot), RoPE tables per sequence or shared. fp32 to 2e-6; bf16 loosely
    (see the bound)."""
    out = run_interpreted("""
        import json, torch
        from megatron_mtp.model.transformer import decode_qkv, decode_mlp
        from megatron_mtp.ops import decode_gemv as kernels

        g = torch.Generator().manual_seed(0)
        errors = {}
        for dtype in (torch.float32, torch.bfloat16):
            for b, s, n_kv, group, hd, hidden, ffn, m, shared, rope_b in [
                    (1, 1, 2, 3, 8, 32, 48, 1, True, 1), (2, 3, 1, 2, 16, 40, 24, 2, True, 2),
                    (1, 4, 2, 4, 8, 64, 96, 3, False, 1), (4, 2, 2, 1, 32, 600, 80, 1, False, 4),
                    (1, 8, 1, 2, 16, 48, 40, 2, True, 1)]:
                cap = 20
                def rand(*shape, scale=1.0):
                    return (torch.randn(*shape, generator=g) * scale).to(dtype)
                x = rand(*(() if shared else (m,)), b, s, hidden)
                nw = (1 + 0.1 * torch.randn(m, hidden, generator=g)).to(dtype)
                qkv_w = rand(m, n_kv * (group + 2) * hd, hidden, scale=hidden ** -0.5)
                angle = torch.rand(rope_b, s, hd, generator=g) * 6.3
                cos, sin = angle.cos().to(dtype), angle.sin().to(dtype)
                lengths = torch.tensor([3, cap - 1, 7, 0][:b])  # the second one's later slots clamp at the last
                bufs = [torch.randn(m * b, n_kv, cap, hd, generator=g).to(dtype) for _ in range(2)]
                ref_k, ref_v = (t.clone() for t in bufs)
                got_k, got_v = (t.clone() for t in bufs)
                ref = decode_qkv(x, nw, 1e-5, qkv_w, cos, sin, ref_k, ref_v, lengths, n_kv, group, hd)
                got = kernels.qkv(x, nw, 1e-5, qkv_w, cos, sin, got_k, got_v, lengths, n_kv, group, hd)
                o = rand(m * b, s, n_kv * group * hd)
                out_w = rand(m, hidden, n_kv * group * hd, scale=(n_kv * group * hd) ** -0.5)
                gu_w = rand(m, 2 * ffn, hidden, scale=hidden ** -0.5)
                down_w = rand(m, hidden, ffn, scale=ffn ** -0.5)
                ref_y = decode_mlp(x, o, out_w, nw, 1e-5, gu_w, down_w)
                got_y = kernels.mlp(x, o, out_w, nw, 1e-5, gu_w, down_w)
                key = f"{dtype} b{b} s{s} kv{n_kv} g{group} hd{hd} h{hidden} f{ffn} m{m} shared{shared}"
                errors[key] = [[list(a.shape) == list(c.shape), ((a.float() - c.float()).abs().max()
                                / c.float().abs().max()).item()]
                               for a, c in ((got, ref), (got_k, ref_k), (got_v, ref_v), (got_y, ref_y))]
        try:
            kernels.linear_residual(torch.zeros(1, kernels.MAX_ROWS + 1, 8), torch.zeros(1, kernels.MAX_ROWS + 1, 4),
                                    torch.zeros(1, 4, 8))
            refused = ""
        except ValueError as exc:
            refused = str(exc)
        print(json.dumps({"errors": errors, "refused": refused}))
    """)
    assert f"serve up to {kernels.MAX_ROWS} token rows" in out["refused"]
    assert len(out["errors"]) == 10
    for key, results in out["errors"].items():
        # Relative to the largest value. bf16: Triton's interpreter truncates fp32 -> bf16 where a GPU rounds to
        # nearest, so each of the kernels' roundings may land one ulp off the torch program's (a dozen ulps of
        # the largest value at most here); the GPU tests compare bf16 on the device.
        bound = 2e-6 if "float32" in key else 5e-2
        for name, (same_shape, err) in zip(("q", "k cache", "v cache", "mlp"), results):
            assert same_shape and err < bound, (key, name, err)


@needs_triton
def test_decoder_with_gemv_layers_gives_the_torch_tokens():
    """The decoder's eager step with the GEMV layer kernels (and either attention) emits exactly the torch
    programs' tokens (fp32, greedy): plain and speculative (k = 2, 3: the stacked draft heads), a batch of mixed
    prompt lengths whose prefill (rows > MAX_ROWS) takes the torch programs, and a batch of 3 whose k = 3 steps
    (9 rows) do too; a draft tree's steps through both kernels."""
    out = run_interpreted("""
        import json, sys, torch
        sys.path.insert(0, "tests")
        from test_generation import random_prompts, tiny_model
        from megatron_mtp.inference import generate

        model = tiny_model(n_heads=3, layers=2, dtype=torch.float32, hidden=32)
        prompts = random_prompts([3, 9, 1], 16, seed=2)
        ref = generate(model, prompts, 10, graphs=False, compile=False, attention="sdpa", layer_kernels="torch").tokens
        got = {f"{attention} k{k}": generate(model, prompts, 10, heads=k, graphs=False, compile=False,
                                             attention=attention, layer_kernels="triton").tokens
               for attention in ("sdpa", "flash_decoding") for k in (1, 2, 3)}
        one = generate(model, prompts[:1], 10, heads=3, graphs=False, compile=False, layer_kernels="triton").tokens
        # A draft tree of 4 nodes: at batch 1 its steps (4 rows, 8 folded query rows) take both kernels with the
        # tree's mask, depth positions and cache compaction; at batch 3 (12 rows) torch's programs.
        from megatron_mtp.inference import DraftTree
        tree = DraftTree.parse("0;1;0,0")
        trees = {f"tree b{b}": generate(model, prompts[:b], 10, graphs=False, compile=False, attention="flash_decoding",
                                        layer_kernels="triton", tree=tree).tokens for b in (1, 3)}
        print(json.dumps({"ref": ref, "got": got, "one": one, "trees": trees}))
    """)
    for key, tokens in out["got"].items():
        assert tokens == out["ref"], key
    assert out["one"] == out["ref"][:1]
    assert out["trees"] == {"tree b1": out["ref"][:1], "tree b3": out["ref"]}


def test_default_layer_kernels_and_a_clear_error_without_triton(monkeypatch):
    """CPU decoders default to the torch programs; asking for the Triton ones where they cannot run, or for an
    unknown name, is one sentence."""
    from megatron_mtp.inference.generation import Decoder, default_layer_kernels
    from test_generation import tiny_model

    assert default_layer_kernels(torch.device("cpu")) == "torch"
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    model = tiny_model(n_heads=2, layers=1, dtype=torch.float32)
    assert Decoder(model).layer_kernels == "torch"
    with pytest.raises(ValueError, match="needs Triton and a CUDA device"):
        Decoder(model, layer_kernels="triton")
    with pytest.raises(ValueError, match="layer_kernels must be 'torch' or 'triton'"):
        Decoder(model, layer_kernels="cublas")


def test_tile_configurations_fit_the_register_budget():
    """Every row count up to MAX_ROWS gets at least one tile shape, each within the product-tile budget."""
    for rows in range(1, kernels.MAX_ROWS + 1):
        r_pad = 1 << (rows - 1).bit_length()
        for two in (False, True):
            configs = kernels._configs(r_pad, two)
            assert configs, (rows, two)
            for rows_w, bk in configs:
                assert r_pad * rows_w * bk * (2 if two else 1) <= kernels._TILE_BUDGET and bk >= 32


@needs_triton
def test_gemv_kernels_compile_for_hopper_without_spills():
    """With no GPU at hand, Triton still compiles for one: every tile configuration of one and four token rows,
    at the 1.1B shape, builds for sm_90 with vector weight loads (64 or 128 bits) and no local-memory spills (what a GPU run's
    autotuning then chooses among)."""
    import os
    import re
    import subprocess

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    tools = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
    if not os.path.exists(os.path.join(tools, "cuobjdump")):
        pytest.skip("this Triton build ships no NVIDIA tools")
    # (Integer arguments that are multiples of 16 are marked so, as Triton's launcher marks them at run time:
    # that is what lets it vectorise the weight loads.)
    kernels_ = {"qkv": (kernels._qkv_kernel, True, dict(K=2048, HEAD_DIM=64, GROUP=8), "BP"),
                "gate_up": (kernels._gate_up_kernel, True, dict(F=5632, K=2048), "BN"),
                "linear": (kernels._linear_residual_kernel, False, dict(N=2048, K=5632), "BN")}
    report = {}
    for name, (fn, two, shape, block) in kernels_.items():
        for r_pad in (1, 4):
            for rows_w, bk in kernels._configs(r_pad, two):
                consts = dict(shape, R_PAD=r_pad, BK=bk, **{block: rows_w})
                sig, attrs = {}, {}
                for i, arg in enumerate(fn.arg_names):
                    if arg in consts:
                        sig[arg] = "constexpr"
                    elif arg == "eps":
                        sig[arg] = "fp32"
                    elif arg[0].isupper():
                        sig[arg] = "*i64" if arg == "Lengths" else "*bf16"
                        attrs[(i,)] = [["tt.divisibility", 16]]
                    else:
                        sig[arg] = "i32"
                        if arg.startswith("s"):  # strides
                            attrs[(i,)] = [["tt.divisibility", 16]]
                compiled = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=consts, attrs=attrs),
                                          target=GPUTarget("cuda", 90, 32),
                                          options={"num_warps": kernels._warps(r_pad, rows_w, bk, two),
                                                   "num_stages": 3})
                path = f"/tmp/decode_gemv_{os.getpid()}.cubin"
                with open(path, "wb") as f:
                    f.write(compiled.asm["cubin"])
                usage = subprocess.run([os.path.join(tools, "cuobjdump"), "--dump-resource-usage", path],
                                       capture_output=True, text=True).stdout
                sass = subprocess.run([os.path.join(tools, "cuobjdump"), "-sass", path], capture_output=True,
                                      text=True).stdout
                os.remove(path)
                regs = int(re.search(r"REG:(\d+)", usage).group(1))
                local = int(re.search(r"LOCAL:(\d+)", usage).group(1))
                report[f"{name} rows{r_pad} {rows_w}x{bk}"] = (regs, local, bool(re.search(r"LDG\.E\.(128|64)", sass)))
    for key, (regs, local, wide) in report.items():
        assert local == 0 and regs <= 128 and wide, (key, regs, local, wide)
