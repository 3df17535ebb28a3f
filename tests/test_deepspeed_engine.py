"""The DeepSpeed engine follows the single-process run: data parallelism with ZeRO 1 and 2, resume from
DeepSpeed's own checkpoint files, and the generated DeepSpeed config with the user JSON merged over it.

Every distributed run goes through ``megatron_mtp.training.loop.train`` (the real path), float32 on CPU with
gloo, 10 steps, n=4 heads, gradient accumulation 2 and the same global batch of 8 samples as the
single-process reference: the loss, every head's loss and the grad norm in ``metrics.jsonl`` agree within
1e-4 at every step; the parameters after 10 steps (gathered by init key) agree within 1e-4; activation
checkpointing changes no loss by more than 1e-6. One spawned process group per world size runs all its
layouts one after another (spawning and importing DeepSpeed costs seconds on busy cores).

The layout runs and comparisons live in tests/ds_layouts.py (shared with tests/test_pipeline.py).
"""
import json
import os

import pytest
import torch

os.environ.setdefault("DS_ACCELERATOR", "cpu")

from megatron_mtp.config import ConfigError, load_config, validate, validate_layout  # noqa: E402
from ds_layouts import (CKPT_TOL, HEAD_KEYS, STEPS, assert_same_curve, assert_same_params, baseline,  # noqa: E402
                        check_layout, two_process_results)

@pytest.fixture(scope="session")
def reference(tiny_dataset, tmp_path_factory):
    return baseline(tiny_dataset, str(tmp_path_factory.mktemp("reference")))


@pytest.fixture(scope="session")
def two_process(tiny_dataset, tmp_path_factory, reference):
    return two_process_results(tiny_dataset, str(tmp_path_factory.mktemp("layouts")))


@pytest.mark.parametrize("name", ["dp2_zero1", "dp2_zero2"])
def test_data_parallel_zero_follows_single_process(two_process, reference, name):
    check_layout(two_process, reference, name)
    # ZeRO shards the optimizer, not the model: every DP rank ends with the full, equal parameters
    ranks = two_process[name]["params_by_rank"]
    assert set(ranks) == {(0, 0), (0, 1)}
    for key, value in ranks[(0, 0)].items():
        assert torch.equal(value, ranks[(0, 1)][key]), key


def test_activation_checkpointing_keeps_losses_data_parallel(two_process):
    plain, ckpt = two_process["dp2_zero1"]["metrics"], two_process["dp2_zero1_ckpt"]["metrics"]
    assert_same_curve(ckpt, plain, "dp2_zero1_ckpt", tol=CKPT_TOL)


def test_pipeline_with_deepspeed_bf16_optimizer(two_process, reference):
    """PP=2, ZeRO-1, DeepSpeed's bf16 optimizer (bf16 weights, fp32 master weights and accumulation; run on
    CPU here): the heads' gradients reach the fp32 master copy, so the curve follows the fp32 one within bf16
    rounding (losses 1%, grad norm 5%; a lost head gradient moves the first grad norm by ~20%). It did not when the heads ran in the pipe's loss_fn, after the stage module: DeepSpeed
    cleared their gradients when the backward reached the module's output."""
    got, ref = two_process["pp2_zero1_bf16"]["metrics"], reference["base"]["metrics"]
    assert [r["step"] for r in got] == list(range(1, STEPS + 1))
    for record, want in zip(got, ref):
        for key in HEAD_KEYS:
            assert record[key] == pytest.approx(want[key], rel=1e-2), (record["step"], key)
        assert record["grad_norm"] == pytest.approx(want["grad_norm"], rel=5e-2), record["step"]


def test_resume_from_deepspeed_checkpoint(two_process, reference):
    """Steps 6..10 after resuming from step 5 equal the uninterrupted single-process run (tied, PP=2, ZeRO-1),
    and so does the run that wrote the checkpoints."""
    check_layout(two_process, reference, "resume_source", against="base_tied")
    records = two_process["resume"]["metrics"]
    assert_same_curve(records, reference["base_tied"]["metrics"], "resume", steps=list(range(6, STEPS + 1)))
    assert_same_params(two_process["resume"]["params"], reference["base_tied"]["params"], "resume")


def test_resume_checkpoint_layout(two_process):
    """The step directories hold DeepSpeed's files (tag = the directory); the manager's pointer names the
    newest complete one, and DeepSpeed wrote no pointer of its own."""
    root = os.path.join(two_process["resume_source"]["run_dir"], "checkpoints")
    with open(os.path.join(root, "latest")) as f:
        assert f.read().strip() == "step_00000010"
    assert sorted(os.listdir(root)) == ["latest", "step_00000005", "step_00000010"]
    step = os.path.join(root, "step_00000010")
    names = set(os.listdir(step))
    assert {"meta.json", "rank_00000.pt", "rank_00001.pt"} <= names
    assert any(n.startswith("layer_") and n.endswith("-model_states.pt") for n in names), names
    assert any(n.startswith("zero_pp_rank_") and n.endswith("optim_states.pt") for n in names), names
    with open(os.path.join(step, "meta.json")) as f:
        meta = json.load(f)
    assert (meta["pp"], meta["dp"], meta["engine"]) == (2, 1, "deepspeed-v1")


# ---------------------------------------------------------------------------------------------------------
# The generated DeepSpeed config and the user JSON (no processes)


def _cfg(**overrides):
    args = [f"--{k}={v}" for k, v in overrides.items()]
    cfg = load_config(None, ["--train.micro_batch_size=2", "--train.global_batch_size=16"] + args)
    validate_layout(cfg, cfg.parallel.tp * cfg.parallel.pp * 2)  # dp = 2
    return cfg


def test_generated_config_cpu_fp32():
    from megatron_mtp.training.deepspeed_engine import ds_config

    cfg = _cfg(**{"parallel.zero_stage": 2, "optimizer.clip_grad": 0.7, "parallel.reduce_bucket_size": 1000})
    ds = ds_config(cfg, torch.device("cpu"), torch.float32)
    assert (ds["train_batch_size"], ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"]) == (16, 2, 4)
    assert ds["gradient_clipping"] == 0.7
    assert ds["zero_optimization"]["stage"] == 2 and ds["zero_optimization"]["reduce_bucket_size"] == 1000
    assert "bf16" not in ds and "fp16" not in ds and "optimizer" not in ds and "scheduler" not in ds


def test_generated_config_gpu_bf16():
    from megatron_mtp.training.deepspeed_engine import ds_config

    ds = ds_config(_cfg(**{"parallel.zero_stage": 1}), torch.device("cuda"), torch.bfloat16)
    assert ds["bf16"] == {"enabled": True} and ds["data_types"] == {"grad_accum_dtype": "fp32"}
    assert ds["zero_optimization"]["overlap_comm"] is True
    # no ZeRO: DeepSpeed has no bf16 mode with fp32 accumulation, so it stays fp32 under our autocast
    assert "bf16" not in ds_config(_cfg(), torch.device("cuda"), torch.bfloat16)
    pp = ds_config(_cfg(**{"parallel.pp": 2, "train.activation_checkpointing": "every_2"}),
                   torch.device("cpu"), torch.float32)
    assert pp["pipeline"]["activation_checkpoint_interval"] == 2


def _write_json(tmp_path, content) -> str:
    path = tmp_path / "ds.json"
    path.write_text(json.dumps(content))
    return str(path)


def test_user_json_merges_over_ours(tmp_path):
    from megatron_mtp.training.deepspeed_engine import ds_config, merge_user_config

    cfg = _cfg(**{"parallel.zero_stage": 1})
    ours = ds_config(cfg, torch.device("cpu"), torch.float32)
    user = {"train_batch_size": 16, "zero_optimization": {"stage": 1, "reduce_bucket_size": 123},
            "gradient_accumulation_steps": "auto", "flops_profiler": {"enabled": False}}
    merged = merge_user_config(ours, _write_json(tmp_path, user))
    assert merged["zero_optimization"]["reduce_bucket_size"] == 123
    assert merged["zero_optimization"]["allgather_bucket_size"] == ours["zero_optimization"]["allgather_bucket_size"]
    assert merged["gradient_accumulation_steps"] == 4 and merged["flops_profiler"] == {"enabled": False}
    assert merge_user_config(ours, None) is ours


@pytest.mark.parametrize("user, words", [
    ({"train_batch_size": 64}, "train_batch_size=64"),
    ({"zero_optimization": {"stage": 2}}, "zero_optimization.stage=2"),
    ({"gradient_clipping": 5.0}, "optimizer.clip_grad"),
    ({"fp16": {"enabled": True}}, "fp16.enabled"),
    ({"optimizer": {"type": "Adam"}}, "'optimizer'"),
    ({"scheduler": {"type": "WarmupLR"}}, "'scheduler'"),
])
def test_user_json_contradictions_are_one_sentence(tmp_path, user, words):
    from megatron_mtp.training.deepspeed_engine import ds_config, merge_user_config

    ours = ds_config(_cfg(**{"parallel.zero_stage": 1}), torch.device("cpu"), torch.float32)
    with pytest.raises(ConfigError) as err:
        merge_user_config(ours, _write_json(tmp_path, user))
    message = str(err.value)
    assert words in message and "parallel.deepspeed_config" in message
    assert message.count(". ") == 0 and "\n" not in message


def test_user_json_must_exist_and_parse(tmp_path):
    from megatron_mtp.training.deepspeed_engine import merge_user_config

    with pytest.raises(ConfigError, match="does not exist"):
        merge_user_config({}, str(tmp_path / "missing.json"))
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        merge_user_config({}, str(bad))


def test_batch_layout_errors():
    """micro-batch x grad-accumulation x DP must be the global batch; ZeRO-2 cannot run with a pipeline."""
    cfg = load_config(None, ["--train.micro_batch_size=3", "--train.global_batch_size=16"])
    with pytest.raises(ConfigError, match="multiple of train.micro_batch_size"):
        validate_layout(cfg, 2)
    cfg = load_config(None, ["--train.micro_batch_size=2", "--train.global_batch_size=16", "--train.grad_accum=2"])
    with pytest.raises(ConfigError, match="contradicts train.global_batch_size"):
        validate_layout(cfg, 2)
    cfg = load_config(None, [])
    cfg.parallel.pp, cfg.parallel.zero_stage = 2, 2
    with pytest.raises(ConfigError, match="ZeRO stage 0 or 1 only"):
        validate(cfg)


def test_mpu_answers_from_our_groups():
    """Without torch.distributed the unit describes one process; DeepSpeed's bwc helpers read it."""
    from deepspeed.utils import bwc

    from megatron_mtp.parallel import state
    from megatron_mtp.training.deepspeed_engine import MegatronMPU

    state.destroy_model_parallel()
    mpu = MegatronMPU()
    assert (mpu.get_model_parallel_rank(), mpu.get_model_parallel_world_size()) == (0, 1)
    assert (mpu.get_data_parallel_rank(), mpu.get_data_parallel_world_size()) == (0, 1)
    assert mpu.get_data_parallel_group_ranks() == [0]
    assert bwc.bwc_tensor_model_parallel_world_size(mpu) == 1
    assert bwc.bwc_pipeline_parallel_world_size(mpu) == 1
    assert not hasattr(mpu, "get_sequence_parallel_world_size")  # not DeepSpeed-Ulysses
