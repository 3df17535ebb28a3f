"""The split-KV decode attention (``ops/decode_attention.py``, the decoder's ``attention="flash_decoding"``)
against scaled_dot_product_attention, on the CPU through Triton's interpreter.

The kernels run in a subprocess with ``TRITON_INTERPRET=1`` (Triton reads it when the kernels are defined).
fp32 only: the interpreter's bf16 ``tl.dot`` is wrong (it returns garbage for any bf16 product, kernel or
not), so bf16 is checked on the GPU (``test_generation.py::test_cuda_graph_path_gives_the_eager_tokens`` and
tools/bench_decode.py's equality counts).
"""
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from megatron_mtp.ops import decode_attention as kernels

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
needs_triton = pytest.mark.skipif(kernels.triton is None, reason="Triton is not installed (requirements-cpu.txt has it)")


def run_interpreted(code: str) -> dict:
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=REPO, OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@needs_triton
def test_flash_decoding_equals_sdpa_on_every_layout():
    """Folded GQA rows (1, 4, 9 new tokens — 72 rows: two row tiles, as a draft tree's step — and a prefill's 320,
    over MAX_ROWS, served by SDPA), padding and per-sequence lengths in the mask, capacities that are
    and are not a multiple of the block, one split and many (each a different share of the cache), head dims
    below the 16 a Triton product needs, the draft heads' stacked buffers (strided views), a bool mask."""
    out = run_interpreted("""
        import json, torch
        from megatron_mtp.inference.generation import decode_attention_flash
        from megatron_mtp.inference.kv_cache import KVCache
        from megatron_mtp.model.transformer import decode_attention, fold_mask
        from megatron_mtp.ops import decode_attention as kernels

        g = torch.Generator().manual_seed(0)
        errors = {}
        for b, n_kv, group, s, cap, hd, m, target in [(1, 4, 8, 1, 384, 64, 1, 264), (2, 2, 3, 4, 130, 16, 1, 264),
                                                      (2, 1, 2, 2, 200, 8, 3, 2), (3, 2, 1, 3, 64, 32, 1, 264),
                                                      (1, 2, 4, 2, 1000, 16, 2, 12), (2, 2, 8, 9, 128, 16, 1, 264),
                                                      (1, 1, 8, 40, 128, 16, 1, 264)]:
            kernels.TARGET_PROGRAMS = target  # few programs -> each split walks several blocks
            cache = KVCache(b, cap, "cpu", start=[0, 5, 2][:b])
            cache.advance(torch.tensor([cap - s - 3, cap // 2, 9][:b]))
            q = torch.randn(m * b, n_kv, group * s, hd, generator=g)
            k_all = torch.randn(2 * m * b, n_kv, cap, hd, generator=g)[m * b:]  # a view into a larger stack
            v_all = torch.randn(m * b, n_kv, cap, hd, generator=g)
            for kind in ("bias", "bool"):
                mask = (cache.attention_bias(s, group, torch.float32) if kind == "bias"
                        else cache.attention_mask(s)[:, :, None].expand(b, 1, group, s, cap).reshape(b, 1, group * s, cap))
                mask = fold_mask(mask, group, s, m * b)
                ref = decode_attention(q, k_all, v_all, mask, s)
                got = decode_attention_flash(q, k_all, v_all, mask, s)
                key = f"b{b} kv{n_kv} g{group} s{s} cap{cap} hd{hd} m{m} {kind} splits{kernels.num_splits(m * b * n_kv, cap)}"
                errors[key] = [list(got.shape) == list(ref.shape), (got - ref).abs().max().item()]
        try:  # the kernels alone refuse a prefill's rows in one sentence (the decoder routes those to SDPA)
            kernels.flash_decoding(torch.zeros(1, 1, 320, 16), k_all[:1, :1], v_all[:1, :1],
                                   torch.zeros(1, 1, 320, k_all.size(2)), 40)
            refused = ""
        except ValueError as exc:
            refused = str(exc)
        print(json.dumps({"errors": errors, "refused": refused}))
    """)
    assert "serves up to 256 query rows (a decode step, a draft tree's), got 320" in out["refused"]
    out = out["errors"]
    for key, (same_shape, err) in out.items():
        assert same_shape and err < 1e-5, (key, err)
    # one split of several blocks, one block per split, several blocks per split (the last one short)
    for want in ("splits(1, 256)", "splits(6, 64)", "splits(3, 384)"):
        assert any(key.endswith(want) for key in out), (want, list(out))


@needs_triton
def test_decoder_with_flash_decoding_gives_the_sdpa_tokens():
    """The decoder's eager step with the split-KV attention emits exactly the SDPA decoder's tokens (fp32,
    greedy): plain and speculative (k = 2, 3, the draft heads' stacked caches; a draft tree of two row tiles), a
    batch of mixed prompt lengths (left padding), and the speculative output equals plain greedy."""
    out = run_interpreted("""
        import json, sys, torch
        sys.path.insert(0, "tests")
        from test_generation import random_prompts, tiny_model
        from megatron_mtp.inference import generate

        model = tiny_model(n_heads=3, layers=2, dtype=torch.float32, hidden=32)
        prompts = random_prompts([3, 9, 1], 16, seed=2)
        ref = generate(model, prompts, 10, graphs=False, compile=False, attention="sdpa").tokens
        got = {k: generate(model, prompts, 10, heads=k, graphs=False, compile=False,
                           attention="flash_decoding").tokens for k in (1, 2, 3)}
        # a dynamic draft tree of 40 nodes: 80 query rows a KV head, two row tiles
        from megatron_mtp.inference import DraftTree
        tree = DraftTree.from_accuracy([[0.5, 0.2, 0.1, 0.05] * 2, [0.4, 0.2, 0.1, 0.05] * 2], 40, dynamic=True)
        got["tree"] = generate(model, prompts, 10, graphs=False, compile=False, attention="flash_decoding",
                               tree=tree).tokens
        print(json.dumps({"ref": ref, "got": got}))
    """)
    for k, tokens in out["got"].items():
        assert tokens == out["ref"], k


def test_default_attention_and_a_clear_error_without_triton(monkeypatch):
    """CPU decoders default to SDPA; asking for flash-decoding where its kernels cannot run is one sentence."""
    from megatron_mtp.inference.generation import Decoder, default_attention
    from test_generation import tiny_model

    assert default_attention(torch.device("cpu")) == "sdpa"
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    model = tiny_model(n_heads=2, layers=1, dtype=torch.float32)
    assert Decoder(model).attention == "sdpa"
    with pytest.raises(ValueError, match="needs Triton and a CUDA device"):
        Decoder(model, attention="flash_decoding")
    with pytest.raises(ValueError, match="attention must be one of"):
        Decoder(model, attention="flash")


def test_num_splits_cover_the_cache_in_whole_blocks():
    for programs in (1, 4, 16, 64, 300):
        for capacity in (1, 64, 65, 384, 1000, 4096):
            splits, per_split = kernels.num_splits(programs, capacity)
            assert per_split % kernels.BLOCK_N == 0 and splits >= 1
            assert (splits - 1) * per_split < capacity <= splits * per_split  # none empty, all covered
            assert splits == 1 or programs * splits <= kernels.TARGET_PROGRAMS + programs
