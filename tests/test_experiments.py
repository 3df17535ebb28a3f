"""The experiment runner end to end at its CPU smoke sizes: data, training through the loop, evaluation,
results.json / results.md / plots (the pipeline, not the science)."""
import json
import subprocess
import sys

import pytest

from megatron_mtp.experiments.__main__ import scale_schedule


@pytest.mark.parametrize("experiment", ["polynomial", "induction", "bytes", "finetune"])
def test_smoke_run_writes_results(tmp_path, experiment):
    out = tmp_path / experiment
    proc = subprocess.run(
        [sys.executable, "-m", "megatron_mtp.experiments", "run", experiment, "--size", "smoke", "--device", "cpu",
         "--seeds", "0", "--out", str(out)],
        capture_output=True, text=True, timeout=600, env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    data = json.loads((out / "results.json").read_text())
    assert data["complete"] and data["experiment"] == experiment and data["jobs"] == len(data["runs"])
    assert all(r["status"] == "ok" for r in data["runs"]), [r.get("error") for r in data["runs"]]
    assert data["summary"]["rows"] and data["environment"]["device"] == "cpu"
    assert "| n |" in (out / "results.md").read_text() or "| pretraining n |" in (out / "results.md").read_text()
    assert list(out.glob("*.png"))
    run = data["runs"][0]
    if experiment == "polynomial":
        assert {r["n"] for r in data["summary"]["rows"]} == {1, 2, 4}
        assert 0.0 <= run["in_domain"]["accuracy"] <= 1.0 and run["in_domain"]["samples"] == 8
    elif experiment == "induction":
        assert [p["step"] for p in run["curve"]] == [2, 4]  # evaluated after every segment of the loop
    elif experiment == "bytes":
        eight = next(r for r in data["runs"] if r["job"]["n"] == 8)
        assert [s["k"] for s in eight["speculative"]] == list(range(1, 9))
        # greedy self-speculative decoding is lossless: every k reproduces plain decoding
        assert all(s["same_as_plain"] == 1.0 for s in eight["speculative"])
    else:
        assert sorted((r["pretrain_n"], r["n_prime"]) for r in data["summary"]["rows"]) == [(1, 1), (4, 1), (4, 4)]


def test_schedule_scaling_keeps_every_count_positive():
    spec = {"iters": 1200, "eval_every": 150, "warmup": 100, "batch": 32, "models": {"a": (1, 2, 3)}}
    assert scale_schedule(spec, 0.5) == {"iters": 600, "eval_every": 75, "warmup": 50, "batch": 32,
                                         "models": {"a": (1, 2, 3)}}
    assert scale_schedule(spec, 1e-6)["iters"] == 1
