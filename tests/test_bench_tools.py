"""CPU smoke tests of the benchmark tools: tools/bench_train.py --tiny, tools/estimate_memory.py, the memory model's
activation formula against saved-tensor hooks, and the perf passes (master weights, attention layout)."""
import copy
import functools
import importlib
import json
import os
import subprocess
import sys

import pytest
import torch

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, os.path.join(ROOT, "tools"))

from megatron_mtp.config import Config, ModelConfig  # noqa: E402
from megatron_mtp.training import memory_model as mm  # noqa: E402
from megatron_mtp.training.master_weights import MasterWeightAdamW  # noqa: E402

import attention_layout  # noqa: E402  (tools/)


@pytest.fixture
def torch_ce(monkeypatch):
    """Run the fused cross-entropy on its pure-PyTorch path (these tests are about the tools, not the kernel);
    everything the tools patch is restored afterwards."""
    lce = importlib.import_module("megatron_mtp.ops.linear_cross_entropy")
    lce = sys.modules["megatron_mtp.ops.linear_cross_entropy"]
    orig = lce.linear_cross_entropy
    monkeypatch.setattr(lce, "linear_cross_entropy", functools.partial(orig, backend="torch"))
    monkeypatch.setattr(lce, "_bench_original", None, raising=False)
    return lce


def test_bench_train_tiny_writes_rows_and_profile(tmp_path, torch_ce):
    import bench_train

    out = tmp_path / "bench.json"
    payload = bench_train.main(["--tiny", "--shapes", "tiny-gqa", "--variants", "hf,eager-autocast,eager-bf16",
                                "--heads", "1,4", "--steps", "1", "--warmup", "1", "--ce-backend", "torch",
                                "--profile", "eager-autocast:4", "--profile-top", "5", "--output", str(out),
                                "--output-dir", str(tmp_path)])
    data = json.loads(out.read_text())
    assert data["device"].startswith("CPU") and data["command"]
    rows = {(r["variant"], r["n_heads"]): r for r in data["rows"]}
    assert set(rows) == {("hf", None), ("eager-autocast", 1), ("eager-autocast", 4), ("eager-bf16", 1)}
    for r in rows.values():
        assert "error" not in r, r.get("traceback", r.get("error"))
        assert r["step_ms"] > 0 and r["tokens_per_s"] > 0 and r["tflops"] > 0
    # compute-matched: the same parameter count for n=1 and n=4, and the FLOP ratio counts 3 more unembeddings
    assert rows[("eager-autocast", 1)]["params"] == rows[("eager-autocast", 4)]["params"]
    s = data["summary"]["tiny-gqa"]["eager-autocast"]
    assert s["n4_over_n1_flops"] > 1.0 and s["n4_over_n1_step_time"] > 0
    assert rows[("eager-autocast", 4)]["profile"]["top"]
    assert rows[("eager-autocast", 1)]["predicted_peak_gib"] > 0
    assert data["attention"]["tiny-gqa"]["model"]["chosen"]
    assert (tmp_path / "train_tiny-gqa.json").is_file()
    assert payload["rows"]


def test_bench_train_isolate_runs_peer_and_fp8_rows_in_child_processes(tmp_path):
    """--isolate: our rows in one child process, the peer in another; every row comes back with its regime, and
    the FP8 row (torch._scaled_mm's CPU kernel here) against its bf16 twin is in the summary."""
    import subprocess

    out = tmp_path / "iso.json"
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "bench_train.py"), "--tiny", "--shapes",
                           "tiny-gqa", "--isolate", "--skip-extras", "--rows", "fast:1,fast-fp8:1,hf:1", "--steps", "1",
                           "--warmup", "1", "--ce-backend", "torch", "--profile", "", "--output", str(out)],
                          capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-2000:]
    data = json.loads(out.read_text())
    rows = {r["variant"]: r for r in data["rows"]}
    assert set(rows) == {"fast", "fast-fp8", "hf"}
    assert all("error" not in r and r["regime"] for r in rows.values()), data["rows"]
    assert rows["fast"]["process"] == rows["fast-fp8"]["process"] != rows["hf"]["process"]
    assert rows["fast-fp8"]["precision"] == "bf16_master+fp8"
    assert "fast-fp8 n=1 / fast n=1" in data["summary"]["tiny-gqa"]["tokens_per_s_ratios"]


def test_bench_train_merge_combines_separate_calls_and_recomputes_the_ratios(tmp_path):
    """--merge: ours and the peers measured by separate calls of one session become one payload whose summary
    holds the cross ratios (ours FP8 / bf16, torchao's FP8 / its bf16 + compile); an unreadable input is left out."""
    import bench_train

    def row(variant, n, ms, impl="megatron_mtp"):
        return {"shape": "7b-layer", "impl": impl, "variant": variant, "n_heads": n, "micro_batch": 8,
                "step_ms": ms, "tokens_per_s": 16384 / (ms * 1e-3), "flops_per_token": 1.0, "peak_mem_gib": 20.0,
                "tflops": 1.0, "mfu_989": 0.5}

    ours = {"device": "H100", "command": "ours", "rows": [row("fast", 1, 177.0), row("fast-fp8", 1, 139.0)],
            "matmul_tflops_measured": 800.0}
    peers = {"device": "H100", "command": "peers", "rows": [row("hf-compile", None, 185.0, "hf_llama"),
                                                            row("hf-fp8", None, 145.0, "hf_llama")]}
    paths = []
    for name, payload in (("ours", ours), ("peers", peers)):
        paths.append(tmp_path / f"{name}.json")
        paths[-1].write_text(json.dumps(payload))
    out = tmp_path / "merged.json"
    bench_train.main(["--merge", str(paths[0]), str(paths[1]), str(tmp_path / "missing.json"), "--output", str(out)])
    data = json.loads(out.read_text())
    assert [r["command"] for r in data["rows"]] == ["ours", "ours", "peers", "peers"]
    ratios = data["summary"]["7b-layer"]["tokens_per_s_ratios"]
    assert ratios["fast-fp8 n=1 / fast n=1"] == pytest.approx(177.0 / 139.0)
    assert ratios["hf-fp8 / hf-compile (torchao's FP8 gain)"] == pytest.approx(185.0 / 145.0)
    assert data["merged_from"] == ["ours.json", "peers.json"] and data["matmul_tflops_measured"] == 800.0


def test_compare_loss_runs_reports_absolute_gaps_and_held_out_evals(tmp_path):
    import compare_loss_runs

    curves = {"bf16": [{"step": s, "loss": 4.0, "loss_head_1": 1.0, "loss_head_2": 3.0} for s in (10, 20)],
              "fp8": [{"step": s, "loss": 4.04, "loss_head_1": 1.02, "loss_head_2": 3.02} for s in (10, 20, 30)]}
    out = compare_loss_runs.compare(curves, tail=2, tolerance=0.01)
    assert out["final"]["fp8"]["steps"] == 20  # compared where both runs got to
    rel, gap = out["relative_difference_fp8_vs_bf16"], out["absolute_difference_fp8_vs_bf16"]
    assert gap["loss_head_1"] == pytest.approx(0.02) and gap["loss_head_2"] == pytest.approx(0.02)
    assert rel["loss_head_1"] == pytest.approx(0.02) and rel["loss_head_2"] == pytest.approx(0.02 / 3)
    assert out["within_tolerance"] is False
    evals = {label: {"heads": [{"head": 1, "loss": v}], "samples": 4} for label, v in (("bf16", 2.0), ("fp8", 2.01))}
    ev = compare_loss_runs.compare_evals(evals)
    assert ev["relative_difference_fp8_vs_bf16"]["loss_head_1"] == pytest.approx(0.005)
    assert ev["heads"]["fp8"]["loss_head_1"] == 2.01
    valids = {"bf16": [{"step": 20, "valid_loss": 2.0, "valid_loss_head_1": 2.0}],
              "fp8": [{"step": 20, "valid_loss": 2.2, "valid_loss_head_1": 2.2},
                      {"step": 30, "valid_loss": 9.0, "valid_loss_head_1": 9.0}]}
    val = compare_loss_runs.compare_validation(valids)
    assert val["step"] == 20 and val["absolute_difference_fp8_vs_bf16"]["loss_head_1"] == pytest.approx(0.2)
    assert compare_loss_runs.compare_validation({"bf16": [], "fp8": valids["fp8"]}) == {}


def test_estimate_memory_recommends_fitting_layouts(tmp_path, capsys):
    import estimate_memory

    out = tmp_path / "plan.json"
    rc = estimate_memory.main(["--config", os.path.join(ROOT, "configs/7b.yaml"), "--gpus-per-node", "8",
                               "--gpu-memory-gib", "80", "--recommend", "--json", str(out)])
    assert rc == 0
    text = capsys.readouterr().out
    assert "recommended layouts" in text and "configured layout" in text
    plan = json.loads(out.read_text())
    rows = plan["recommended"]
    assert rows and all(r["peak_gib"] <= plan["usable_gib"] for r in rows)
    assert [r["proxy"] for r in rows] == sorted((r["proxy"] for r in rows), reverse=True)
    for r in rows:
        lay = r["layout"]
        assert lay["tp"] * lay["pp"] * lay["dp"] == 8
        assert not (lay["pp"] > 1 and lay["zero_stage"] > 1)
    # a bad override is one sentence, not a trace
    assert estimate_memory.main(["--config", os.path.join(ROOT, "configs/7b.yaml"), "--parallel.tp", "3"]) == 2


@pytest.mark.parametrize("precision", ["autocast", "bf16_master"])
def test_activation_formula_matches_saved_tensors(precision):
    """The per-layer activation formula equals the bytes autograd saves (eager; CPU saved-tensor hooks)."""
    for kv in (2, 4):
        m = ModelConfig(hidden_size=64, num_attention_heads=4, num_kv_heads=kv, ffn_hidden_size=176, num_layers=2,
                        vocab_size=128)
        measured = mm.measure_layer_saved_bytes(m, precision="bf16" if precision == "bf16_master" else precision,
                                                seq=32)
        assert measured == mm.formula_bytes_per_token(m, precision, compiled=False)


def test_activation_formula_matches_saved_tensors_with_fp8_linears():
    """train.fp8: the linears save e4m3 inputs; the FP8 formula equals what autograd saves (eager, CPU), for two
    SwiGLU widths and hidden sizes so that both the d and the f coefficients are pinned."""
    for d, f, kv in ((64, 176, 2), (128, 352, 4)):
        m = ModelConfig(hidden_size=d, num_attention_heads=4, num_kv_heads=kv, ffn_hidden_size=f, num_layers=2,
                        vocab_size=128)
        measured = mm.measure_layer_saved_bytes(m, precision="bf16", seq=32, fp8=True)
        assert measured == mm.formula_bytes_per_token(m, "bf16_master", compiled=False, fp8=True)
        assert measured < mm.formula_bytes_per_token(m, "bf16_master", compiled=False)


def test_memory_model_layout_rules():
    cfg = Config()
    cfg.model = ModelConfig(vocab_size=32000, hidden_size=1024, num_layers=10, num_attention_heads=8,
                            num_kv_heads=8, ffn_hidden_size=2816)
    cfg.mtp.n_heads = 2
    base = mm.Layout(micro_batch=2, seq_length=1024, precision="ds_bf16", dp=2, zero_stage=1)
    one = mm.estimate(cfg, base)[0]
    # TP shards every matrix; sequence parallelism shards the rest of the activations
    tp2 = mm.estimate(cfg, mm.Layout(**{**mm.asdict_layout(base), "tp": 2}))[0]
    tp2sp = mm.estimate(cfg, mm.Layout(**{**mm.asdict_layout(base), "tp": 2, "sequence_parallel": True}))[0]
    assert tp2.params < 0.55 * one.params
    assert tp2sp.bytes["activations"] < tp2.bytes["activations"] < one.bytes["activations"]
    # ZeRO-1 shards master weights and Adam moments over data parallelism
    z0 = mm.estimate(cfg, mm.Layout(**{**mm.asdict_layout(base), "dp": 1}))[0]
    assert one.bytes["optimizer"] == pytest.approx(z0.bytes["optimizer"] / 2)
    # 1F1B: stage i holds pp - i micro-batches in flight (layers placed by the balanced partition)
    pp4 = mm.estimate(cfg, mm.Layout(**{**mm.asdict_layout(base), "pp": 4, "grad_accum": 8}))
    per_layer = mm.layer_activation_bytes(cfg.model, 2 * 1024, precision="ds_bf16", compiled=False)
    pieces = mm.pipeline_pieces(cfg.model, cfg.mtp)
    bounds = mm.partition_balanced([w for _, w in pieces], 4)
    for st in pp4:
        layers = sum(1 for name, _ in pieces[bounds[st.stage]:bounds[st.stage + 1]] if name.startswith("trunk."))
        assert st.bytes["activations"] == pytest.approx(layers * per_layer * (4 - st.stage))
    assert sum(bounds[i + 1] - bounds[i] for i in range(4)) == len(pieces) and len(set(bounds)) == 5
    assert "ce_buffers" in pp4[-1].bytes and "ce_buffers" not in pp4[0].bytes
    # full checkpointing keeps only each layer's input, plus one layer being recomputed
    ckpt = mm.estimate(cfg, mm.Layout(**{**mm.asdict_layout(base), "activation_checkpointing": "full"}))[0]
    assert ckpt.bytes["activations"] < 0.2 * one.bytes["activations"] and ckpt.bytes["recompute"] == per_layer
    assert mm.partition_balanced([1, 1, 1, 1, 4], 2) == [0, 4, 5]


def test_attention_layout_pass_is_exact(torch_ce):
    from megatron_mtp.model.mtp_model import MTPModel
    from megatron_mtp.parallel.layers import initialize_parameters

    cfg = Config()
    cfg.model = ModelConfig(vocab_size=128, hidden_size=64, num_layers=3, num_attention_heads=4, num_kv_heads=2,
                            ffn_hidden_size=128, make_vocab_size_divisible_by=64)
    cfg.mtp.n_heads = 2
    model = MTPModel(cfg.model, cfg.mtp)
    initialize_parameters(model, 3)
    tokens = torch.randint(0, 128, (2, 17))
    ref_loss, _ = model(tokens)
    ref_loss.backward()
    for expand in (False, True):
        patched = copy.deepcopy(model)
        patched.zero_grad()
        assert attention_layout.apply_attention_layout(patched, expand_kv=expand) == 3
        loss, _ = patched(tokens)
        loss.backward()
        torch.testing.assert_close(loss, ref_loss, rtol=1e-6, atol=1e-6)
        for a, b in zip(model.parameters(), patched.parameters()):
            torch.testing.assert_close(a.grad, b.grad, rtol=1e-5, atol=1e-6)


def test_master_weights_engine_trains_in_bf16_with_fp32_masters(torch_ce):
    from megatron_mtp.model.mtp_model import MTPModel
    from megatron_mtp.parallel.layers import initialize_parameters
    from megatron_mtp.training.local_engine import LocalEngine

    cfg = Config()
    cfg.model = ModelConfig(vocab_size=128, hidden_size=64, num_layers=3, num_attention_heads=4, num_kv_heads=2,
                            ffn_hidden_size=128, make_vocab_size_divisible_by=64)
    cfg.mtp.n_heads = 2
    cfg.optimizer.warmup_iters = 0
    model = MTPModel(cfg.model, cfg.mtp)
    initialize_parameters(model, 3)
    ref = LocalEngine(copy.deepcopy(model), cfg, torch.device("cpu"), torch.float32)
    eng = LocalEngine(model, cfg, torch.device("cpu"), torch.bfloat16, master_weights=True)
    assert isinstance(eng.optimizer, MasterWeightAdamW)
    assert all(p.dtype == torch.bfloat16 for p in eng.model.parameters())
    assert all(m.dtype == torch.float32 for m in eng.optimizer.masters)
    gen = torch.Generator().manual_seed(0)
    for step in range(3):
        mbs = [torch.randint(0, 128, (2, 17), generator=gen) for _ in range(2)]  # two micro-batches: fp32 accum
        r_ref, r = ref.train_step(mbs, step), eng.train_step(mbs, step)
        assert abs(float(r.loss) - float(r_ref.loss)) < 0.05 * float(r_ref.loss)
        assert abs(float(r.grad_norm) - float(r_ref.grad_norm)) < 0.1 * float(r_ref.grad_norm)
    # the masters moved and the bf16 weights are their rounding
    for p, m in zip(eng.optimizer.params, eng.optimizer.masters):
        torch.testing.assert_close(p, m.to(torch.bfloat16))
    sd = eng.optimizer.state_dict()
    assert "master_weights" in sd and sd["state"]
    before = [m.clone() for m in eng.optimizer.masters]
    eng.optimizer.load_state_dict(sd)
    for a, b in zip(before, eng.optimizer.masters):
        torch.testing.assert_close(a, b)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message a machine without a GPU gets")
def test_probe_gemm_tuning_says_it_needs_a_gpu():
    probe = os.path.join(ROOT, "tools", "probe_gemm_tuning.py")
    done = subprocess.run([sys.executable, probe], capture_output=True, text=True, timeout=300)
    assert done.returncode != 0 and "needs a CUDA GPU" in done.stderr


def test_bench_decode_gpu_runs_only_the_parts_asked_for(tmp_path):
    # The one-process GPU script, dry on the CPU: PARTS=n8 trains and benchmarks only the byte model (no n = 4
    # training, no transformers rows), and the run record says which parts ran.
    out = tmp_path / "out"
    env = {**os.environ, "QUICK": "1", "DEVICE": "cpu", "PARTS": "n8", "TRAIN_S": "60", "ITERS8": "3",
           "DEADLINE_S": "150", "OUT": str(out), "RUNS_DIR": str(tmp_path / "runs"), "OMP_NUM_THREADS": "1",
           "TREES": "6", "DYNAMIC_TREES": "5"}
    proc = subprocess.run([sys.executable, "tools/bench_decode_gpu.py"], env=env, cwd=ROOT, capture_output=True,
                          text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert sorted(os.listdir(out)) == ["decode_dry_n8.json", "decode_dry_run.json"]
    record = json.loads((out / "decode_dry_run.json").read_text())
    assert record["parts"] == ["n8"]
    assert [p["phase"] for p in record["phases"]] == ["warm-up code_n8 default", "bench n=8 k=1..8"]
    assert all(p["status"] == "done" for p in record["phases"])
    assert os.listdir(tmp_path / "runs") == ["code_100m_n8"]
    n8 = json.loads((out / "decode_dry_n8.json").read_text())
    assert [r["k"] for r in n8["rows"] if r["decoder"] == "ours"] == list(range(1, 9)) and n8["model"]["n_heads"] == 8
    assert [r["tree_nodes"] for r in n8["rows"] if r["decoder"] in ("ours_tree6", "ours_dtree5")] == [6, 5]
    assert [w["tree_nodes"] for w in record["warm_up"] if "tree_nodes" in w] == [6, 5]


@pytest.mark.parametrize("env, entry", [({"PARTS": "n8,1B"}, "unknown PARTS entry '1B'"),
                                        ({"VARIANTS_1B": "fused,gemv_fused"}, "unknown VARIANTS_1B entry 'gemv_fused'"),
                                        ({"VARIANTS_N4": "sdpa,flash"}, "unknown VARIANTS_N4 entry 'flash'"),
                                        ({"TREES": "16,x"}, "TREES takes node counts"),
                                        ({"DYNAMIC_TREES": "1"}, "DYNAMIC_TREES takes node counts")])
def test_bench_decode_gpu_refuses_unknown_selection_before_starting(tmp_path, env, entry):
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "tools/bench_decode_gpu.py"], cwd=ROOT, capture_output=True, text=True,
                          timeout=120, env={**os.environ, "QUICK": "1", "DEVICE": "cpu", "OUT": str(out),
                                            "RUNS_DIR": str(tmp_path / "runs"), **env})
    assert proc.returncode != 0 and entry in proc.stderr
    assert not out.exists() and not (tmp_path / "runs").exists()
