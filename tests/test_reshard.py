"""Resharding: a checkpoint converted to another TP/PP/DP layout continues the same run.

* TP = 2 x PP = 2 (DeepSpeed pipeline) saved at step 10, resharded to TP = 1 x PP = 4, continues with the
  losses of the uninterrupted TP = 2 x PP = 2 run at steps 11 and 12 (within 1e-5: step 12 also checks that
  the Adam moments were carried over).
* LocalEngine TP = 1 -> TP = 2 -> TP = 1 is lossless for weights and Adam state, in this process.
* Layouts the model cannot take are one-sentence CheckpointErrors.
"""
from __future__ import annotations

import json
import os

import pytest
import torch

from helpers import _train_in_process, assert_bitwise, final_state, losses, run_ds_scenario, tiny_overrides


def test_reshard_tp2pp2_to_tp1pp4_continues(tmp_path_factory):
    dirs = run_ds_scenario(str(tmp_path_factory.getbasetemp() / "ds_scenario"))
    out = dirs["resharded"]
    with open(os.path.join(out, "checkpoints", "step_00000010", "meta.json")) as f:
        meta = json.load(f)
    assert (meta["tp"], meta["pp"], meta["engine"]) == (1, 4, "universal-v1")
    straight = {r[0]: r for r in losses(dirs["straight"])}
    resumed = losses(out)
    assert [r[0] for r in resumed] == list(range(1, 13))  # the source log up to 10, then 11 and 12
    for step in (11, 12):
        got = resumed[step - 1]
        for a, b in zip(got[1:], straight[step][1:]):
            assert abs(a - b) <= 1e-5, (step, got, straight[step])
    # after the first save at the new layout the files are DeepSpeed's own again
    latest = open(os.path.join(out, "checkpoints", "latest")).read().strip()
    with open(os.path.join(out, "checkpoints", latest, "meta.json")) as f:
        assert json.load(f)["engine"] == "deepspeed-v1"


def test_reshard_local_tp_roundtrip(tmp_path):
    from megatron_mtp.checkpoint.formats import open_checkpoint
    from megatron_mtp.checkpoint.manager import resolve_checkpoint
    from megatron_mtp.checkpoint.reshard import reshard

    run = str(tmp_path / "run")
    _train_in_process(tiny_overrides(run, str(tmp_path / "data"), **{"train.iters": 3}))
    w1, o1, step = final_state(run)
    assert step == 3

    reshard(run, str(tmp_path / "tp2"), tp=2, pp=1)
    ckpt2 = resolve_checkpoint(str(tmp_path / "tp2"))
    files = sorted(os.listdir(ckpt2))
    assert "model_tp00.pt" in files and "model_tp01.pt" in files
    shard = torch.load(os.path.join(ckpt2, "model_tp01.pt"), weights_only=False)
    qkv = shard["model"]["trunk.0.attn.qkv.weight"]
    assert qkv.shape[0] == w1["trunk.0.qkv"].shape[0] // 2  # really cut in two
    # padded vocabulary: 258 rows -> 272 at tp=2 (multiple of 8 x 2), 136 per rank, padding zero
    assert shard["model"]["embedding.embed.weight"].shape[0] == 136
    assert torch.count_nonzero(shard["model"]["embedding.embed.weight"][258 - 136:]) == 0
    reader = open_checkpoint(ckpt2)
    assert (reader.tp, reader.step, reader.consumed_samples()) == (2, 3, 3 * 4)
    assert_bitwise(w1, reader.weights(), "weights tp2")

    reshard(str(tmp_path / "tp2"), str(tmp_path / "back"), tp=1, pp=1)
    w3, o3, _ = final_state(str(tmp_path / "back"))
    assert_bitwise(w1, w3, "weights back")
    for name in ("exp_avg", "exp_avg_sq"):
        assert_bitwise({k: v[name] for k, v in o1["state"].items()}, {k: v[name] for k, v in o3["state"].items()}, name)
    assert float(o3["step"]) == 3
    with open(os.path.join(str(tmp_path / "back"), "config.yaml")) as f:
        assert "tp: 1" in f.read()

    # DeepSpeed layouts get the layout-independent files, cut per rank at resume
    reshard(run, str(tmp_path / "pp2dp2"), tp=1, pp=2, dp=2)
    reader = open_checkpoint(resolve_checkpoint(str(tmp_path / "pp2dp2")))
    assert (reader.meta["engine"], reader.meta["world_size"], reader.cfg.train.grad_accum) == ("universal-v1", 4, 1)
    assert_bitwise(w1, reader.weights(), "weights universal")
    o4 = reader.optimizer_state()
    assert_bitwise({k: v["exp_avg"] for k, v in o1["state"].items()}, {k: v["exp_avg"] for k, v in o4["state"].items()},
                   "exp_avg universal")

    # and the resharded run resumes exactly where the original stopped (same layout again here)
    _train_in_process(["--config", os.path.join(str(tmp_path / "back"), "config.yaml"), "--train.iters", "4",
                       "--train.run_dir", str(tmp_path / "back")])
    assert [r[0] for r in losses(str(tmp_path / "back"))] == [1, 2, 3, 4]


def test_reshard_rejects_impossible_layouts(tmp_path, capsys):
    import subprocess
    import sys

    from megatron_mtp.checkpoint.manager import CheckpointError
    from megatron_mtp.checkpoint.reshard import reshard

    run = str(tmp_path / "run")
    _train_in_process(tiny_overrides(run, str(tmp_path / "data"), **{"train.iters": 1}))
    with pytest.raises(CheckpointError, match=r"parallel.tp \(3\) must divide"):
        reshard(run, str(tmp_path / "bad"), tp=3, pp=1)
    with pytest.raises(CheckpointError, match="exceeds the 4 pipeline pieces"):
        reshard(run, str(tmp_path / "bad2"), tp=1, pp=5)
    with pytest.raises(CheckpointError, match="no complete checkpoint"):
        reshard(str(tmp_path), str(tmp_path / "bad3"), tp=1, pp=1)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.run([sys.executable, os.path.join(root, "tools", "reshard_checkpoint.py"), "--load", run,
                           "--output", str(tmp_path / "bad4"), "--tp", "3", "--pp", "1"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    assert proc.stderr.startswith("checkpoint error: cannot reshard to tp=3") and len(proc.stderr.splitlines()) == 1
