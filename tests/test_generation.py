"""KV-cache generation: the cache (GQA, left padding, per-sequence lengths, rollback) against recomputing
the full forward, plain greedy / sampled generation, EOD and budget stops, sampling filters, loading a
checkpoint and the tools/generate.py command line."""
import os
import sys
import types

import pytest
import torch

from megatron_mtp.config import ModelConfig, MTPConfig
from megatron_mtp.inference import (DraftTree, KVCache, SamplingParams, generate, load_model, next_tokens,
                                    probabilities, sample)
from megatron_mtp.model.mtp_model import MTPModel
from megatron_mtp.parallel.layers import initialize_parameters

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def tiny_model(vocab=16, n_heads=3, layers=5, seed=0, sharpen=30.0, dtype=torch.float64, hidden=32):
    cfg = ModelConfig(vocab_size=vocab, hidden_size=hidden, num_layers=layers, num_attention_heads=4, num_kv_heads=2,
                      ffn_hidden_size=64, make_vocab_size_divisible_by=8)
    model = MTPModel(cfg, MTPConfig(n_heads=n_heads), dtype=dtype)
    initialize_parameters(model, seed)
    with torch.no_grad():  # random init predicts ~uniform tokens; sharpen so decoding decisions are clear
        model.output.output_weight.mul_(sharpen)
    return model.eval()


def random_prompts(lengths, vocab, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (n,), generator=g).tolist() for n in lengths]


def full_logits(model, seq, heads="all"):
    return [l[0, -1] for l in model.logits(torch.tensor([seq]), heads=heads)]


def recompute_greedy(model, prompt, n, eod=None):
    seq, out = list(prompt), []
    for _ in range(n):
        t = int(full_logits(model, seq, "first")[0].argmax())
        if t == eod:
            break
        out.append(t)
        seq.append(t)
    return out


def test_kv_cache_matches_full_forward_with_padding_rollback_and_gqa():
    model = tiny_model(n_heads=3)
    prompts = random_prompts([5, 2, 7], 16, seed=1)
    width = max(map(len, prompts))
    pads = [width - len(p) for p in prompts]
    cache = KVCache(3, 32, "cpu", start=pads)
    tokens = torch.tensor([[0] * pad + p for pad, p in zip(pads, prompts)])

    def step(inputs):
        s = inputs.size(1)
        return model.logits(inputs, heads="all", positions=cache.positions(s), kv_cache=cache,
                            attn_mask=cache.attention_mask(s))

    out = step(tokens)
    cache.advance(width)
    for b, p in enumerate(prompts):  # prefill: every head's logits at each sequence's last prompt token
        for h, ref in enumerate(full_logits(model, p)):
            torch.testing.assert_close(out[h][b, -1], ref)
    assert all(k.shape[1] == 2 for k in cache._k.values())  # GQA: 2 KV heads stored, not 4 query heads
    seqs = [list(p) for p in prompts]
    g = torch.Generator().manual_seed(5)
    # Multi-token steps with a different commit per sequence (speculative rollback), then single tokens.
    for commit in ([1, 3, 2], [3, 1, 1], [1, 1, 1], [2, 3, 1]):
        chunk = torch.randint(0, 16, (3, 3), generator=g)
        out = step(chunk)
        for b in range(3):
            for j in range(3):  # every position of the chunk sees exactly its own prefix
                prefix = seqs[b] + chunk[b, : j + 1].tolist()
                for h, ref in enumerate(full_logits(model, prefix)):
                    torch.testing.assert_close(out[h][b, j], ref)
        cache.advance(torch.tensor(commit))
        for b in range(3):
            seqs[b] += chunk[b, : commit[b]].tolist()
        assert cache.lengths_host() == [width + len(s) - len(p) for s, p in zip(seqs, prompts)]
    # Explicit rollback to shorter lengths, then continue: the stale slots are overwritten.
    cache.rollback([n - 2 for n in cache.lengths_host()])
    seqs = [s[:-2] for s in seqs]
    nxt = torch.randint(0, 16, (3, 1), generator=g)
    out = step(nxt)
    for b in range(3):
        for h, ref in enumerate(full_logits(model, seqs[b] + nxt[b].tolist())):
            torch.testing.assert_close(out[h][b, 0], ref)
    with pytest.raises(ValueError):
        cache.rollback([0, 0, 0])  # below the prompts' padding start is not a length a sequence holds


def test_greedy_generation_equals_recomputing_every_step():
    model = tiny_model(n_heads=2, layers=4)
    prompts = random_prompts([3, 8, 1], 16, seed=2)
    out = generate(model, prompts, 12)
    assert out.tokens == [recompute_greedy(model, p, 12) for p in prompts]
    assert out.stats.tokens == 36 and out.stats.tokens_per_forward == 1.0 and out.stats.forwards == 12


def test_sampled_generation_equals_recomputing_every_step():
    model = tiny_model(n_heads=2, layers=4, sharpen=5.0)
    params = SamplingParams(greedy=False, temperature=0.9, top_k=10, top_p=0.95)
    prompt = random_prompts([4], 16, seed=3)[0]
    out = generate(model, [prompt], 15, params, generator=torch.Generator().manual_seed(11))
    g = torch.Generator().manual_seed(11)  # the same draws, from full forwards of the whole sequence
    seq, ref = list(prompt), []
    for _ in range(15):
        t, _ = next_tokens(full_logits(model, seq, "first")[0][None], params, g)
        ref.append(int(t))
        seq.append(int(t))
    assert out.tokens[0] == ref
    assert len(set(ref)) > 1


def test_eod_and_budget_stop_each_sequence():
    model = tiny_model(n_heads=2, layers=4)
    prompts = random_prompts([4, 6, 3, 5], 16, seed=4)
    free = [recompute_greedy(model, p, 10) for p in prompts]
    eod = free[0][3]  # sequence 0 meets this token at step 4; others may or may not
    out = generate(model, prompts, 10, eod=eod)
    for b, p in enumerate(prompts):
        expect = recompute_greedy(model, p, 10, eod=eod)
        assert out.tokens[b] == expect
        assert out.finished_by_eod[b] == (len(expect) < 10 and eod in free[b])
    assert out.finished_by_eod[0] and len(out.tokens[0]) == free[0].index(eod)
    one = generate(model, prompts[:1], 1)
    assert len(one.tokens[0]) == 1 and one.stats.forwards == 1


def test_sampling_filters_and_sampler():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    p = probabilities(logits, SamplingParams(greedy=False, top_p=0.8))
    torch.testing.assert_close(p, torch.tensor([[0.625, 0.375, 0.0, 0.0]]))
    p = probabilities(logits, SamplingParams(greedy=False, top_p=0.81))
    assert (p > 0).sum() == 3
    p = probabilities(logits, SamplingParams(greedy=False, top_k=1))
    torch.testing.assert_close(p, torch.tensor([[1.0, 0.0, 0.0, 0.0]]))
    p = probabilities(logits, SamplingParams(greedy=False, temperature=0.5))
    ref = torch.tensor([0.25, 0.09, 0.0225, 0.0025])
    torch.testing.assert_close(p[0], ref / ref.sum())
    rows = torch.tensor([[0.5, 0.3, 0.15, 0.05]]).expand(40000, 4)
    counts = torch.bincount(sample(rows, torch.Generator().manual_seed(0)), minlength=4).double() / 40000
    torch.testing.assert_close(counts, rows[0].double(), atol=0.01, rtol=0)
    with pytest.raises(ValueError):
        SamplingParams(greedy=False, temperature=0.0)


def _save_run(tmp_path):
    from megatron_mtp.checkpoint.manager import CheckpointManager
    from megatron_mtp.config import Config
    from megatron_mtp.training.local_engine import LocalEngine

    cfg = Config()
    cfg.model.hidden_size, cfg.model.num_layers, cfg.model.num_attention_heads = 32, 4, 4
    cfg.model.num_kv_heads, cfg.model.ffn_hidden_size, cfg.mtp.n_heads = 2, 64, 3
    cfg.train.run_dir = str(tmp_path / "run")
    cfg.train.global_batch_size, cfg.train.grad_accum = 8, 1
    model = MTPModel(cfg.model, cfg.mtp)
    initialize_parameters(model, 7)
    engine = LocalEngine(model, cfg, torch.device("cpu"), torch.float32)
    CheckpointManager(cfg, engine, 0).save(3, types.SimpleNamespace(state_dict=lambda: {"consumed_samples": 0}))
    return cfg.train.run_dir, model


def test_load_checkpoint_and_generate_cli(tmp_path, capsys):
    run_dir, model = _save_run(tmp_path)
    x = torch.randint(0, 258, (2, 7))
    cfg, loaded, tok = load_model(run_dir)
    assert cfg.mtp.n_heads == 3 and tok.eod == 256
    for a, b in zip(model.logits(x, heads="all"), loaded.logits(x, heads="all")):
        torch.testing.assert_close(a, b)
    sys.path.insert(0, os.path.join(REPO, "tools"))
    try:
        import generate as generate_tool
    finally:
        sys.path.pop(0)
    rc = generate_tool.main(["--load", run_dir, "--prompt", "def f(x):", "--prompt", "import os",
                             "--max-new-tokens", "6", "--speculative", "--heads", "3", "--compare", "--no-progress",
                             "--no-stop-at-eod"])
    captured = capsys.readouterr()
    assert rc == 0
    assert captured.out.count("### prompt") == 2
    assert "tokens/forward" in captured.err and "acceptance head 2" in captured.err and "speedup" in captured.err
    assert "2/2 outputs identical to plain" in captured.err
    for tree, want in ((["6"], "draft tree: 6 nodes"), (["0;1;0,0"], "draft tree: 4 nodes"),
                       (["5", "--dynamic-tree"], "draft tree: dynamic: 5 of 20 candidate nodes")):
        rc = generate_tool.main(["--load", run_dir, "--prompt", "def f(x):", "--prompt", "import os",
                                 "--max-new-tokens", "6", "--speculative", "--tree", *tree, "--compare", "--no-progress",
                                 "--no-stop-at-eod"])
        captured = capsys.readouterr()
        assert rc == 0 and "2/2 outputs identical to plain" in captured.err
        assert want in captured.err, captured.err
        assert ("head accuracy by rank" in captured.err) == tree[0].isdigit()
    assert generate_tool.main(["--load", str(tmp_path / "missing"), "--prompt", "x"]) == 2
    assert generate_tool.main(["--load", run_dir, "--prompt", "x", "--speculative", "--heads", "5"]) == 2
    assert "error:" in capsys.readouterr().err



def test_generate_cli_no_compile_reaches_the_decoder(tmp_path, capsys, monkeypatch):
    """``--no-compile`` asks the decoder for its uncompiled step; without it the decoder picks (on for CUDA)."""
    from megatron_mtp.cli import generate as cli

    run_dir, _ = _save_run(tmp_path)
    seen = []
    real = cli.generate

    def spy(*args, **kwargs):
        seen.append(kwargs.get("compile"))
        return real(*args, **kwargs)

    monkeypatch.setattr(cli, "generate", spy)
    for flag, want in ((["--no-compile"], False), ([], None)):
        assert cli.main(["--load", run_dir, "--prompt", "x", "--max-new-tokens", "2", "--no-progress"] + flag) == 0
        assert seen[-1] is want
    capsys.readouterr()

def test_rollback_after_rejection_leaves_cache_equal_to_fresh_prefill():
    """After speculative decoding with rejections, every layer's committed keys/values of every sequence
    equal a fresh prefill over that sequence's committed tokens (rejected slots leave no trace)."""
    from megatron_mtp.inference.generation import decoder_for

    model = tiny_model(n_heads=3, layers=5, sharpen=8.0)
    prompts = random_prompts([3, 7, 5], 16, seed=6)
    out = generate(model, prompts, 9, heads=3)
    assert 0 < sum(out.stats.accepted) < sum(out.stats.proposed)  # drafts were rejected and rolled back
    dec = decoder_for(model)
    (st,) = dec._states.values()
    assert_cache_is_a_fresh_prefill(model, st, prompts, heads=3)


def assert_cache_is_a_fresh_prefill(model, st, prompts, heads: int) -> None:
    """Every layer's committed keys and values (trunk and heads 1..``heads``) of every sequence of decoder
    state ``st`` equal a fresh prefill over that sequence's committed tokens."""
    emitted = st.out.tolist()
    for b, p in enumerate(prompts):
        committed = p + emitted[b][: int(st.out_len[b]) - 1]  # the last emitted token is not yet in the cache
        assert int(st.cache.lengths[b] - st.cache.start[b]) == len(committed)
        n = len(committed)
        fresh = KVCache(1, n, "cpu")
        model.logits(torch.tensor([committed]), heads="all", positions=fresh.positions(n), kv_cache=fresh,
                     attn_mask=fresh.attention_mask(n))
        fresh.advance(n)
        for key in fresh._k:
            if key.startswith("heads.") and int(key.split(".")[1]) >= heads:
                continue  # heads the decoding did not use did not run
            for got, ref in zip(st.cache.committed(key, b), fresh.committed(key, 0)):
                torch.testing.assert_close(got, ref)


def test_streaming_callback_sees_every_token_once():
    model = tiny_model(n_heads=3, layers=5)
    prompts = random_prompts([4, 2], 16, seed=8)
    free = generate(model, prompts, 11, heads=3)
    eod = free.tokens[1][4]
    seen = {0: [], 1: []}
    out = generate(model, prompts, 11, heads=3, eod=eod, callback=lambda b, new: seen[b].extend(new))
    assert [seen[0], seen[1]] == out.tokens == generate(model, prompts, 11, eod=eod).tokens


@pytest.mark.parametrize("kwargs, match", [
    (dict(heads=0), "1..3"),  # 0 is an error, not "all heads"
    (dict(heads=4), "1..3"),
    (dict(max_new_tokens=0), "at least 1"),
    (dict(prompts=[]), "at least one prompt"),
    (dict(prompts=[[1, 2], []]), "at least one token"),
    (dict(prompts=[[1, 99]]), "outside the vocabulary"),
    (dict(prompts=[[1] * 60], max_new_tokens=5), "max_seq_length 64"),
    (dict(sampling=SamplingParams(greedy=True, temperature=float("nan"))), None),  # greedy ignores it
], ids=["heads0", "heads4", "budget0", "batch0", "empty_prompt", "vocab", "too_long", "greedy_nan_ok"])
def test_generate_arguments_are_range_checked(kwargs, match):
    cfg = ModelConfig(vocab_size=16, hidden_size=32, num_layers=4, num_attention_heads=4, num_kv_heads=2,
                      ffn_hidden_size=64, make_vocab_size_divisible_by=8, max_seq_length=64)
    model = MTPModel(cfg, MTPConfig(n_heads=3), dtype=torch.float32).eval()
    args = dict(prompts=[[1, 2, 3]], max_new_tokens=4, heads=1)
    args.update(kwargs)
    if match is None:
        assert len(generate(model, **args).tokens[0]) == 4
        return
    with pytest.raises(ValueError, match=match):
        generate(model, **args)


@pytest.mark.parametrize("temperature", [float("nan"), -1.0, 0.0, float("inf")])
def test_sampling_temperature_must_be_positive_and_finite(temperature):
    with pytest.raises(ValueError, match="temperature"):
        SamplingParams(greedy=False, temperature=temperature)
    with pytest.raises(ValueError, match="top_p"):
        SamplingParams(greedy=False, top_p=float("nan"))


def test_generate_cli_rejects_bad_arguments(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)  # (the Triton kernels then need a GPU)
    run_dir, _ = _save_run(tmp_path)
    sys.path.insert(0, os.path.join(REPO, "tools"))
    try:
        import generate as generate_tool
    finally:
        sys.path.pop(0)
    base = ["--load", run_dir, "--prompt", "def f(x):", "--max-new-tokens", "4", "--no-progress"]
    cases = {
        "--heads": (["--speculative", "--heads", "0"], "--heads must lie in 1..3"),
        "--temperature nan": (["--temperature", "nan"], "temperature must be a positive finite"),
        "--temperature -1": (["--temperature", "-1"], "temperature must be a positive finite"),
        "--batch-size": (["--batch-size", "0"], "--batch-size must be at least 1"),
        "too long": (["--max-new-tokens", "4090"], "exceeds the model's max_seq_length"),
        "--layer-kernels": (["--layer-kernels", "triton"], "layer_kernels='triton' needs Triton and a CUDA device"),
        "--attention": (["--attention", "flash_decoding"], "attention='flash_decoding' needs Triton and a CUDA"),
        "--tree alone": (["--tree", "8"], "--tree needs --speculative"),
        "--tree bad": (["--speculative", "--tree", "0,1"], "lacks its parent"),
        "--tree deep": (["--speculative", "--tree", "0;0,0;0,0,0"], "needs 4 heads"),
        "--tree 1": (["--speculative", "--tree", "1"], "at least 2 nodes"),
        "--dynamic-tree alone": (["--speculative", "--dynamic-tree"], "--dynamic-tree needs --tree NODES"),
        "--dynamic-tree paths": (["--speculative", "--tree", "0;1", "--dynamic-tree"], "takes a node count"),
    }
    for name, (extra, message) in cases.items():
        assert generate_tool.main(base + extra) == 2, name
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err, (name, err)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
@pytest.mark.parametrize("compile_layers, gemv, attention, layers",
                         [(False, False, "sdpa", "torch"), (True, False, "sdpa", "torch"), (True, True, "sdpa", "torch"),
                          (True, False, "fused", "torch"), (True, False, "flex", "torch"),
                          (False, False, "flash_decoding", "torch"), (True, False, "flash_decoding", "torch"),
                          (False, False, "flash_decoding", "triton"), (True, False, "flash_decoding", "triton")],
                         ids=["graphs", "graphs+compile", "graphs+compile+gemv", "graphs+compile+fused",
                              "graphs+compile+flex", "graphs+flash_decoding", "graphs+compile+flash_decoding",
                              "graphs+triton_layers", "graphs+compile+triton_layers"])
def test_cuda_graph_path_gives_the_eager_tokens(compile_layers, gemv, attention, layers):
    """fp32 on the GPU: the captured (and compiled) decoder emits exactly the eager decoder's tokens (SDPA,
    torch's layer programs), for plain, speculative and draft-tree decoding, batch 1 and a batch of mixed prompt lengths
    (with the GEMV layer kernels: steps of 4 and 8 rows through them, of 12 through torch's), with an EOD in
    play; replays of the same graphs on new prompts stay right."""
    # (FlexAttention's GPU kernels take head dims of 16 and more)
    model = tiny_model(n_heads=3, layers=5, dtype=torch.float32, hidden=64 if attention == "flex" else 32).cuda()
    for lengths, seed in (([6], 1), ([3, 9, 1, 6], 2), ([5, 2, 8, 4], 3)):
        prompts = random_prompts(lengths, 16, seed=seed)
        eager = generate(model, prompts, 20, graphs=False, compile=False, attention="sdpa", layer_kernels="torch")
        eod = eager.tokens[0][7]
        eager_eod = generate(model, prompts, 20, eod=eod, graphs=False, compile=False, attention="sdpa",
                             layer_kernels="torch")
        for k in (1, 2, 3):
            fast = generate(model, prompts, 20, heads=k, graphs=True, compile=compile_layers, gemv=gemv,
                            attention=attention, layer_kernels=layers)
            assert fast.tokens == eager.tokens, (lengths, k)
            fast = generate(model, prompts, 20, heads=k, eod=eod, graphs=True, compile=compile_layers, gemv=gemv,
                            attention=attention, layer_kernels=layers)
            assert fast.tokens == eager_eod.tokens and fast.finished_by_eod == eager_eod.finished_by_eod
            assert fast.stats.tokens == eager_eod.stats.tokens
        for tree in (DraftTree.parse("0;1;0,0;1,0"), DraftTree.parse("0;1;2;0,0;0,1;1,0;0,0,0;0,1,0"),
                     DraftTree.parse("0;1;2;0,0;0,1;1,0;0,0,0;0,1,0").dynamic(5)):
            fast = generate(model, prompts, 20, eod=eod, graphs=True, compile=compile_layers, gemv=gemv,
                            attention=attention, layer_kernels=layers, tree=tree)
            assert fast.tokens == eager_eod.tokens, (lengths, tree)
    from megatron_mtp.inference.generation import decoder_for

    dec = decoder_for(model, graphs=True, compile=compile_layers, gemv=gemv, attention=attention, layer_kernels=layers)
    assert dec.compile_error is None and dec.gemv == gemv and dec.attention == attention
    assert dec.layer_kernels == layers


def test_a_failing_step_is_captured_again_with_plainer_programs(monkeypatch, capsys):
    """A step whose capture fails (a compiler or Triton kernel error) is captured again without inductor (the
    Triton attention and layer kernels kept), then with SDPA and torch's layer programs, warning each time;
    with nothing plainer left the error surfaces."""
    from megatron_mtp.inference.generation import Decoder

    monkeypatch.setenv("TRITON_INTERPRET", "1")  # a CPU decoder may then take the Triton kernels (none runs here)
    model = tiny_model(n_heads=2, layers=1, dtype=torch.float32)
    dec = Decoder(model, graphs=False, compile=True, attention="flash_decoding", layer_kernels="triton")
    tried = []

    def capture(self, fn, sampled):
        tried.append((self.programs.compiled, self.programs.names))
        if self.programs.names != ("sdpa", "torch"):
            raise RuntimeError("out of resources: shared memory")
        return "graph"

    monkeypatch.setattr(Decoder, "_capture", capture)
    assert dec._graph(("step", 1), lambda: None, False) == "graph"
    assert tried == [(True, ("flash_decoding", "triton")), (False, ("flash_decoding", "triton")),
                     (False, ("sdpa", "torch"))]
    assert "out of resources" in dec.compile_error and dec._graph(("step", 1), lambda: None, False) == "graph"
    err = capsys.readouterr().err
    assert "decoding with the uncompiled step" in err and "decoding with SDPA and torch's layer programs" in err

    plain = Decoder(model, graphs=False, compile=False, attention="sdpa", layer_kernels="torch")

    def fail(self, fn, sampled):
        raise RuntimeError("boom")

    monkeypatch.setattr(Decoder, "_capture", fail)
    with pytest.raises(RuntimeError, match="boom"):
        plain._graph(("step", 1), lambda: None, False)


def test_decoder_reuses_and_bounds_its_buffers():
    """Prompts of many lengths reuse a bucket of up to twice the needed capacity and keep at most
    MAX_STATES buckets alive; the tokens stay those of recomputation."""
    from megatron_mtp.inference.generation import Decoder, decoder_for

    model = tiny_model(n_heads=2, layers=4)
    dec = decoder_for(model)
    for n in (200, 60, 330, 450, 570, 700):  # capacities 256, 128 -> reuses 256, 384, 512, 640, 768
        prompt = random_prompts([n], 16, seed=n)[0]
        out = generate(model, [prompt], 3, heads=2)
        assert out.tokens[0] == recompute_greedy(model, prompt, 3)
        assert len(dec._states) <= Decoder.MAX_STATES
    assert sorted(c for _, c in dec._states) == [384, 512, 640, 768]


def test_compiled_step_programs_give_the_eager_tokens(compile_with_eager_backend):
    """The step's programs as torch.compile traces them (whole-graph capture of the fused cache write, the
    batched draft heads, the verification and the in-place bookkeeping, fullgraph: no graph break; dynamo's
    eager backend keeps it fast on a CPU — the GPU tests run inductor) emit exactly the eager tokens, plain
    and speculative, for a batch of mixed prompt lengths."""
    model = tiny_model(n_heads=3, layers=5, dtype=torch.float32)
    prompts = random_prompts([3, 9, 1, 6], 16, seed=2)
    eager = generate(model, prompts, 12, graphs=False, compile=False)
    for k in (1, 3):
        assert generate(model, prompts, 12, heads=k, graphs=False, compile=True).tokens == eager.tokens, k
    from megatron_mtp.inference.generation import decoder_for

    for attention in ("fused", "flex"):
        assert decoder_for(model, graphs=False, compile=True, attention=attention).attention == attention
        assert generate(model, prompts, 12, heads=3, graphs=False, compile=True).tokens == eager.tokens, attention


def test_compiled_decoder_compiles_once_per_shape_class(compile_with_eager_backend):
    """A compiled decoder compiles each step program once per shape class that truly differs — one layer or
    a stack (the trunk vs k >= 3 draft heads), k = 1 or k >= 2 (the tail and the bookkeeping) — and never for
    a new batch size, prompt width or k: dynamo would otherwise specialise the sizes first seen as 1 (batch 1,
    one token, one draft head), and every new (batch, k) cost a compilation (tens of seconds on a GPU). The
    guards are dynamo's whatever the backend, so the eager backend keeps this fast (inductor's lowering can
    add a few of its own: ``tools/decode_compile_report.py`` counts them with inductor)."""
    from torch._dynamo.eval_frame import _debug_get_cache_entry_list
    from megatron_mtp.inference.generation import commit, greedy_tail, step_inputs
    from megatron_mtp.model.transformer import decode_mlp, decode_qkv

    programs = {"qkv": decode_qkv, "mlp": decode_mlp, "inputs": step_inputs, "tail": greedy_tail,
                "commit": commit}

    def graphs():
        return {name: len(_debug_get_cache_entry_list(fn.__code__)) for name, fn in programs.items()}

    def decode(b, k, greedy=True):
        prompts = random_prompts([2 + (3 * i) % 7 for i in range(b)], 16, seed=b + k)
        sampling = SamplingParams() if greedy else SamplingParams(greedy=False, temperature=0.9)
        return generate(model, prompts, 5, sampling=sampling, heads=k, graphs=False, compile=True,
                        generator=torch.Generator().manual_seed(0)).tokens

    model = tiny_model(n_heads=4, layers=2, dtype=torch.float32)
    for k in (1, 3):  # batch 1: every shape class once, greedy and sampling
        decode(1, k)
        decode(1, k, greedy=False)
    assert graphs() == {"qkv": 2, "mlp": 2, "inputs": 1, "tail": 2, "commit": 2}
    for b, k in ((1, 2), (1, 4), (4, 1), (4, 2), (4, 4), (3, 3)):  # new k, new batch sizes, new widths
        compiled = decode(b, k)
        decode(b, k, greedy=False)
        assert graphs() == {"qkv": 2, "mlp": 2, "inputs": 1, "tail": 2, "commit": 2}, (b, k)
    prompts = random_prompts([2 + (3 * i) % 7 for i in range(3)], 16, seed=6)
    assert compiled == generate(model, prompts, 5, graphs=False, compile=False).tokens


def test_compiled_step_programs_have_no_data_dependent_sizes(monkeypatch):
    """No tensor in the traced step programs has a data-dependent (unbacked) size, for every attention and
    for greedy and sampled steps: under size-oblivious tracing a slice with a symbolic end gets one, and
    torch 2.11 (the GPU image of the 2026-12-07 run) then fails to compile the step — the decoder fell back
    to its uncompiled step. torch 2.13 defers such guards to runtime asserts, so only this check sees it."""
    import torch._dynamo
    from torch.fx.experimental.symbolic_shapes import free_unbacked_symbols

    seen = []

    def backend(gm, example_inputs):
        for node in gm.graph.nodes:
            value = node.meta.get("example_value")
            if isinstance(value, torch.Tensor) and free_unbacked_symbols(value):
                seen.append(f"{node.format_node()} {node.meta.get('stack_trace', '').strip().splitlines()[-1:]}")
        return gm.forward

    original = torch.compile
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: original(fn, **{**kw, "backend": backend, "options": None}))
    torch._dynamo.reset()
    from megatron_mtp.inference.generation import decoder_for

    model = tiny_model(n_heads=4, layers=2, dtype=torch.float32, hidden=64)
    for attention in ("sdpa", "fused", "flex"):
        decoder_for(model, graphs=False, compile=True, attention=attention)
        for b, k in ((1, 1), (2, 3)):
            generate(model, random_prompts([5, 7][:b], 16, seed=k), 4, heads=k, graphs=False, compile=True)
        generate(model, random_prompts([5], 16), 4, heads=3, graphs=False, compile=True,
                 sampling=SamplingParams(greedy=False, temperature=0.8), generator=torch.Generator().manual_seed(0))
        generate(model, random_prompts([5, 7], 16), 4, graphs=False, compile=True,
                 tree=DraftTree.parse("0;1;0,0;1,0;0,0,0"))
        generate(model, random_prompts([5, 7], 16), 4, graphs=False, compile=True, tree=DraftTree.parse("0;1;0,0"),
                 sampling=SamplingParams(greedy=False, temperature=0.8), generator=torch.Generator().manual_seed(0))
    torch._dynamo.reset()
    assert not seen, seen[:3]


def test_fused_decode_attention_equals_sdpa():
    """The products-and-sums attention of compiled decoders against scaled_dot_product_attention: folded GQA
    rows, an additive mask with padding and per-row limits, two new tokens."""
    from megatron_mtp.model.transformer import decode_attention, decode_attention_fused

    g = torch.Generator().manual_seed(0)
    b, n_kv, group, s, cap, hd = 2, 2, 3, 2, 16, 8
    q = torch.randn(b, n_kv, group * s, hd, generator=g)
    k_all, v_all = torch.randn(b, n_kv, cap, hd, generator=g), torch.randn(b, n_kv, cap, hd, generator=g)
    cache = KVCache(b, cap, "cpu", start=[0, 3])
    cache.advance(torch.tensor([7, 9]))
    mask = cache.attention_bias(s, group, torch.float32)
    torch.testing.assert_close(decode_attention_fused(q, k_all, v_all, mask, s),
                               decode_attention(q, k_all, v_all, mask, s), rtol=1e-5, atol=1e-5)


def test_flex_decode_attention_equals_sdpa():
    """The FlexAttention decode attention (its eager reference path here; compiled on a GPU it is the
    flash-decoding kernel) against scaled_dot_product_attention: folded GQA rows, an additive mask with
    padding and per-row limits, two new tokens, and the draft heads' stacked batch (the mask repeated)."""
    import warnings

    from megatron_mtp.inference.generation import decode_attention_flex
    from megatron_mtp.model.transformer import decode_attention, fold_mask

    g = torch.Generator().manual_seed(0)
    b, n_kv, group, s, cap, hd = 2, 2, 3, 2, 16, 16
    cache = KVCache(b, cap, "cpu", start=[0, 3])
    cache.advance(torch.tensor([7, 9]))
    for m in (1, 3):
        q = torch.randn(m * b, n_kv, group * s, hd, generator=g)
        k_all, v_all = torch.randn(m * b, n_kv, cap, hd, generator=g), torch.randn(m * b, n_kv, cap, hd, generator=g)
        mask = fold_mask(cache.attention_bias(s, group, torch.float32), group, s, m * b)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # flex_attention's eager path warns that it is not compiled
            flex = decode_attention_flex(q, k_all, v_all, mask, s)
        torch.testing.assert_close(flex, decode_attention(q, k_all, v_all, mask, s), rtol=1e-5, atol=1e-5)


def test_batched_draft_heads_equal_the_per_head_layers():
    """The draft heads as one batched layer (stacked weights, one stacked KV cache) give each head's own
    layer output and write each head's own keys and values, fp32 within rounding, batch 2 with padding."""
    from megatron_mtp.inference.generation import Decoder

    model = tiny_model(n_heads=4, layers=6, dtype=torch.float32)
    dec = Decoder(model, graphs=False, compile=False)
    prompts = random_prompts([5, 3], 16, seed=4)
    tokens = torch.tensor([[0] * (5 - len(p)) + p for p in prompts])
    results = []
    for batched in (True, False):
        st = dec.state(2, 32) if batched else type(dec.state(2, 32))(2, 32, "cpu", 4, 16)
        st.cache.reset([0, 2])
        if batched:
            h1, hd = dec._forward(st, tokens, 4)
        else:
            mask = st.cache.attention_bias(5, dec.group, torch.float32)
            pos = st.cache.positions(5)
            z, cos, sin = model.trunk_hidden(tokens, pos, st.cache, mask)
            hd = torch.stack([model.output.heads[i](z, cos, sin, st.cache, mask) for i in (1, 2, 3)])
        results.append((hd, {key: st.cache._k[key].clone() for key in st.cache._k if key.startswith("heads.")}))
    (batched_h, batched_k), (loop_h, loop_k) = results
    assert batched_h.shape == (3, 2, 5, 32)
    torch.testing.assert_close(batched_h, loop_h, rtol=1e-5, atol=1e-5)
    assert set(batched_k) >= {"heads.1", "heads.2", "heads.3"}
    for key in ("heads.1", "heads.2", "heads.3"):
        torch.testing.assert_close(batched_k[key], loop_k[key], rtol=1e-5, atol=1e-5)


def test_bench_decode_bandwidth_regime_writes_its_rows(tmp_path):
    """tools/bench_decode.py --bandwidth on the tiny shape (CPU): every row and the variant table land in the
    JSON, written through the atomic writer."""
    import json

    sys.path.insert(0, os.path.join(REPO, "tools"))
    try:
        import bench_decode
    finally:
        sys.path.pop(0)
    assert bench_decode.main(["--bandwidth", os.path.join(REPO, "configs", "tiny.yaml"), "--device", "cpu",
                              "--output-dir", str(tmp_path), "--tag", "t", "--prompt-tokens", "16",
                              "--max-new-tokens", "4", "--ks", "1,2", "--variants", "default",
                              "--forward-tokens", "5"]) == 0
    result = json.loads((tmp_path / "decode_t.json").read_text())
    assert [r["k"] for r in result["rows"] if r["kind"] == "generate"] == [1, 2]
    assert [r["tokens"] for r in result["rows"] if r["kind"] == "forward"] == [1, 2, 5]
    assert result["plain_decode_tokens_per_s"] > 0 and list(result["variants"]) == ["default"]
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".")]  # no temporary file left behind


def test_bench_decode_trained_rows_with_draft_trees(tmp_path):
    """tools/bench_decode.py --load (CPU, no peers): the k rows and, with --trees / --dynamic-trees, a row per
    calibrated draft tree whose outputs equal plain greedy's, the calibration (per-head, per-rank accuracies)
    in the JSON."""
    import json

    run_dir, _ = _save_run(tmp_path)
    sys.path.insert(0, os.path.join(REPO, "tools"))
    try:
        import bench_decode
    finally:
        sys.path.pop(0)
    out = tmp_path / "out"
    assert bench_decode.main(["--load", run_dir, "--device", "cpu", "--output-dir", str(out), "--tag", "t",
                              "--prompt-tokens", "24", "--max-new-tokens", "6", "--batch-sizes", "1",
                              "--prompts-batch1", "2", "--peers", "none", "--trees", "3,6", "--dynamic-trees", "4",
                              "--no-plot"]) == 0
    result = json.loads((out / "decode_t.json").read_text())
    rows = {(r["decoder"], r["k"]): r for r in result["rows"]}
    assert {d for d, _ in rows} == {"ours", "ours_tree3", "ours_tree6", "ours_dtree4"}
    assert [k for d, k in rows if d == "ours"] == [1, 2, 3]
    for name in ("ours_tree3", "ours_tree6", "ours_dtree4"):
        row = next(r for r in result["rows"] if r["decoder"] == name)
        assert row["identical_to_plain"] == "2/2" and row["tokens_per_forward"] >= 1.0
    cal = result["tree_calibration"]
    assert len(cal["accuracy_per_head_rank"]) == 2 and set(cal["trees"]) == {"tree3", "tree6", "dtree4"}
    assert next(r for r in result["rows"] if r["decoder"] == "ours_dtree4")["tree_dynamic"]
    assert bench_decode.main(["--load", run_dir, "--trees", "1", "--output-dir", str(out)]) == 2
