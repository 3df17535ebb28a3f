"""Exact resume: 20 steps straight vs 10 steps, a stop (SIGUSR1 at a step boundary, as Slurm pre-emption
sends it), and 10 resumed steps give bitwise-identical losses, parameters and Adam state.

* PP = 1: one process, LocalEngine, in this process (with dropout, so the RNG streams must be restored).
* PP = 2 x TP = 2: four gloo ranks running the DeepSpeed pipeline engine (``run_ds_scenario``, shared with
  tests/test_reshard.py, which also reshards the step-10 checkpoint to TP = 1 x PP = 4).

What must survive a restart: the LR schedule position (step), the RNG states (python, numpy, torch, the TP
tracker), the data position (``MicroBatchIterator.consumed_samples``), the optimizer state, and the metrics
log (the resumed run appends; records a crashed run logged after its last checkpoint are dropped).
"""
from __future__ import annotations

import json
import os

import torch

from helpers import ITERS, STOP, _train_in_process, assert_bitwise, final_state, losses, run_ds_scenario, tiny_overrides


def test_exact_resume_single_process(tmp_path):
    data = str(tmp_path / "data")
    common = {"model.hidden_dropout": 0.1, "model.attention_dropout": 0.1}  # RNG matters
    straight, split = str(tmp_path / "straight"), str(tmp_path / "split")
    _train_in_process(tiny_overrides(straight, data, **common))
    summary = _train_in_process(tiny_overrides(split, data, **common), stop_after=STOP)
    assert summary["step"] == STOP
    ckpts = os.listdir(os.path.join(split, "checkpoints"))
    assert "step_00000010" in ckpts and open(os.path.join(split, "checkpoints", "latest")).read().strip() == "step_00000010"
    # A crash after the checkpoint would have logged a few more steps: resume must drop them.
    with open(os.path.join(split, "metrics.jsonl"), "a") as f:
        f.write(json.dumps({"step": 11, "loss": 0.0, "loss_head_1": 0.0, "loss_head_2": 0.0}) + "\n")
        f.write('{"step": 12, "lo')  # torn last line
    _train_in_process(tiny_overrides(split, data, **common))

    a, b = losses(straight), losses(split)
    assert [r[0] for r in a] == list(range(1, ITERS + 1))
    assert a == b  # every step's total and per-head loss, bit for bit
    wa, oa, sa = final_state(straight)
    wb, ob, sb = final_state(split)
    assert sa == sb == ITERS
    assert_bitwise(wa, wb, "parameters")
    assert float(oa["step"]) == float(ob["step"]) == ITERS
    assert_bitwise({k: v["exp_avg"] for k, v in oa["state"].items()}, {k: v["exp_avg"] for k, v in ob["state"].items()},
                   "exp_avg")
    assert_bitwise({k: v["exp_avg_sq"] for k, v in oa["state"].items()},
                   {k: v["exp_avg_sq"] for k, v in ob["state"].items()}, "exp_avg_sq")


def test_exact_resume_pipeline_tensor_parallel(tmp_path_factory):
    dirs = run_ds_scenario(str(tmp_path_factory.getbasetemp() / "ds_scenario"))
    a, b = losses(dirs["straight"]), losses(dirs["split"])
    assert [r[0] for r in a] == list(range(1, ITERS + 1))
    assert a == b
    wa, oa, _ = final_state(dirs["straight"])
    wb, ob, _ = final_state(dirs["split"])
    assert_bitwise(wa, wb, "parameters")
    assert oa is not None and ob is not None
    assert_bitwise({k: v["exp_avg_sq"] for k, v in oa["state"].items()},
                   {k: v["exp_avg_sq"] for k, v in ob["state"].items()}, "exp_avg_sq")
    # the merged single-process model of a TP x PP checkpoint is the checkpoint's model
    from megatron_mtp.checkpoint.merge import load_merged_model

    cfg, model, tokenizer = load_merged_model(dirs["split"])
    assert cfg.parallel.tp == cfg.parallel.pp == 1 and tokenizer.eod == 256
    for name, p in model.named_parameters():
        w = wb[p.init_key]
        assert torch.equal(p.detach().narrow(0, 0, w.size(0)), w), name  # vocabulary padding aside
