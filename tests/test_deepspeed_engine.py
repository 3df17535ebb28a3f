"""The DeepSpeed engine follows the single-process run: data parallelism with ZeRO 1 and 2, resume from
DeepSpeed's own checkpoint files, and the generated DeepSpeed config with the user JSON merged over it.

Every distributed run goes through ``megatron_mtp.training.loop.train`` (the real path), float32 on CPU with
gloo, 10 steps, n=4 heads, gradient accumulation 2 and the same global batch of 8 samples as the
single-process reference: the loss, every head's loss and the grad norm in ``metrics.jsonl`` agree within
1e-4 at every step; the parameters after 10 steps (gathered by init key) agree within 1e-4; activation
checkpointing changes no loss by more than 1e-6. One spawned process group per world size runs all its
layouts one after another (spawning and importing DeepSpeed costs seconds on busy cores).

``run_layouts`` and ``baseline`` are shared with tests/test_pipeline.py.
"""
import json
import os

import pytest
import torch

os.environ.setdefault("DS_ACCELERATOR", "cpu")

from dist_utils import run_distributed  # noqa: E402
from megatron_mtp.config import ConfigError, config_from_dict, load_config, validate, validate_layout  # noqa: E402
from megatron_mtp.training.metrics import read_metrics  # noqa: E402

STEPS, TOL, CKPT_TOL = 10, 1e-4, 1e-6
GLOBAL_BATCH, SEQ = 8, 16
EVAL_BATCHES = 2  # global eval micro-batches of 4 samples each


# ---------------------------------------------------------------------------------------------------------
# Configs


def make_config(data: dict, run_dir: str, micro_batch_size: int, **sections) -> dict:
    """The tiny run: 2 trunk + 4 head layers, hidden 32, GQA 4/2 heads, vocab 64, sequence 16, global batch 8,
    warm-up then cosine decay over 10 steps, clipping at 0.5 (active at every step)."""
    config = {
        "model": {"vocab_size": data["vocab_size"], "hidden_size": 32, "num_layers": 6, "num_attention_heads": 4,
                  "num_kv_heads": 2, "ffn_hidden_size": 64, "max_seq_length": 32,
                  "make_vocab_size_divisible_by": 8},
        "mtp": {"n_heads": 4},
        "parallel": {},
        "data": {"paths": [data["prefix"]], "seq_length": SEQ, "split": "1,0,0", "cache_dir": data["cache_dir"]},
        "optimizer": {"lr": 1e-2, "min_lr": 1e-3, "warmup_iters": 2, "decay_iters": STEPS, "clip_grad": 0.5},
        "train": {"iters": STEPS, "micro_batch_size": micro_batch_size, "global_batch_size": GLOBAL_BATCH,
                  "seed": 1234, "run_dir": run_dir, "device": "cpu", "dtype": "float32"},
        "logging": {"interval": 1, "tensorboard": False, "plot": False},
        "checkpoint": {"save": False},
    }
    for section, values in sections.items():
        config[section].update(values)
    return config


def eval_batches(vocab: int) -> list:
    gen = torch.Generator().manual_seed(99)
    return [torch.randint(0, vocab, (4, SEQ + 1), generator=gen) for _ in range(EVAL_BATCHES)]


# ---------------------------------------------------------------------------------------------------------
# The worker: train, then dump parameters by init key and evaluate fixed batches


def _gather_params(engine) -> dict:
    """Full (TP-unsharded) parameters of this rank's model by init key."""
    import torch.distributed as dist

    from megatron_mtp.parallel import state
    from megatron_mtp.parallel.layers import unshard

    s = state.get_state()
    out = {}
    for p in engine.model.parameters():
        key = getattr(p, "init_key", None)
        if key is None:
            continue
        t = p.detach().float().cpu().contiguous()
        if s.tp > 1 and getattr(p, "partition_dim", -1) >= 0:
            shards = [torch.empty_like(t) for _ in range(s.tp)]
            dist.all_gather(shards, t, group=s.tp_group)
            t = unshard(shards, p)
        out.setdefault(key, t)
    return out


def _layout_worker(rank, world_size, jobs, out_dir):
    torch.set_num_threads(1)
    from megatron_mtp.checkpoint import manager
    from megatron_mtp.parallel import state
    from megatron_mtp.training.loop import train

    engines = []
    original_init = manager.CheckpointManager.__init__

    def recording_init(self, cfg, engine, rank_):
        engines.append(engine)
        original_init(self, cfg, engine, rank_)

    manager.CheckpointManager.__init__ = recording_init  # the loop hands every engine to its manager
    from megatron_mtp.training import deepspeed_engine

    gpu_only_bf16 = deepspeed_engine._is_bf16
    for job in jobs:
        cfg = config_from_dict(job["config"])
        # DeepSpeed's bf16 mode (bf16 weights, fp32 master copy and accumulation) is meant for GPUs; CPU runs
        # it too, which lets CI check the bf16 optimizer's bookkeeping against the pipeline schedule.
        deepspeed_engine._is_bf16 = (lambda device, dtype: dtype == torch.bfloat16) if job.get("ds_bf16") \
            else gpu_only_bf16
        train(cfg)
        engine = engines[-1]
        s = state.get_state()
        name = job["name"]
        params = _gather_params(engine)
        if s.tp_rank == 0:
            torch.save(params, os.path.join(out_dir, f"{name}.params.pp{s.pp_rank}.dp{s.dp_rank}.pt"))
        if job.get("eval"):
            mbs = cfg.train.micro_batch_size
            batches = [b[s.dp_rank * mbs:(s.dp_rank + 1) * mbs] for b in eval_batches(cfg.model.vocab_size)]
            heads = engine.eval_step(batches)
            if rank == world_size - 1:
                torch.save(heads.detach().float().cpu(), os.path.join(out_dir, f"{name}.eval.pt"))
        engine = None
        engines.clear()


def run_layouts(world_size: int, jobs: list, out_dir: str) -> dict:
    """Run ``jobs`` ([{"name", "config", "eval"?}]) in one process group of ``world_size``; return per job
    {"metrics": [...], "params": {init_key: tensor}, "params_by_rank": {(pp, dp): {...}}, "eval": tensor}."""
    os.makedirs(out_dir, exist_ok=True)
    run_distributed(_layout_worker, world_size, jobs, out_dir)
    results = {}
    for job in jobs:
        name = job["name"]
        by_rank = {}
        for file in os.listdir(out_dir):
            if file.startswith(f"{name}.params."):
                _, _, pp, dp, _ = file.rsplit(".", 4)
                by_rank[(int(pp[2:]), int(dp[2:]))] = torch.load(os.path.join(out_dir, file))
        merged = {}
        for (pp, dp), params in sorted(by_rank.items()):
            for key, value in params.items():
                if key in merged and dp == 0:  # a tied copy on another stage must be the same tensor
                    torch.testing.assert_close(value, merged[key], rtol=0, atol=TOL, msg=f"{name} {key} copies")
                merged.setdefault(key, value)
        eval_path = os.path.join(out_dir, f"{name}.eval.pt")
        results[name] = {
            "metrics": read_metrics(job["config"]["train"]["run_dir"]),
            "params": merged,
            "params_by_rank": by_rank,
            "eval": torch.load(eval_path) if os.path.exists(eval_path) else None,
            "run_dir": job["config"]["train"]["run_dir"],
        }
    return results


_BASELINES: dict = {}


def baseline(data: dict, root: str) -> dict:
    """The single-process references (untied and tied embeddings), run once per session."""
    key = data["prefix"]
    if key not in _BASELINES:
        base = os.path.join(root, "baseline")
        jobs = [{"name": name, "eval": True,
                 "config": make_config(data, os.path.join(base, name), 4, model=model)}
                for name, model in (("base", {}), ("base_tied", {"tie_embeddings": True}))]
        _BASELINES[key] = run_layouts(1, jobs, base)
    return _BASELINES[key]


@pytest.fixture(scope="session")
def reference(tiny_dataset, tmp_path_factory):
    return baseline(tiny_dataset, str(tmp_path_factory.mktemp("reference")))


# ---------------------------------------------------------------------------------------------------------
# Comparisons


HEAD_KEYS = ["loss"] + [f"loss_head_{i}" for i in range(1, 5)]


def assert_same_curve(got: list, ref: list, name: str, tol: float = TOL, steps=None) -> None:
    steps = steps or list(range(1, STEPS + 1))
    assert [r["step"] for r in got] == steps, (name, [r["step"] for r in got])
    by_step = {r["step"]: r for r in ref}
    for record in got:
        want = by_step[record["step"]]
        for key in HEAD_KEYS:
            assert abs(record[key] - want[key]) <= tol, (name, record["step"], key, record[key], want[key])
        assert abs(record["grad_norm"] - want["grad_norm"]) <= tol * max(1.0, want["grad_norm"]), \
            (name, record["step"], record["grad_norm"], want["grad_norm"])
        assert record["lr"] == pytest.approx(want["lr"], rel=1e-12)


def assert_same_params(got: dict, ref: dict, name: str) -> None:
    assert set(got) == set(ref), (name, sorted(set(got) ^ set(ref)))
    for key in ref:
        torch.testing.assert_close(got[key], ref[key], rtol=0, atol=TOL, msg=f"{name}: parameter {key}")


def check_layout(results: dict, ref: dict, name: str, against: str = "base") -> None:
    assert_same_curve(results[name]["metrics"], ref[against]["metrics"], name)
    assert_same_params(results[name]["params"], ref[against]["params"], name)
    if results[name]["eval"] is not None:
        torch.testing.assert_close(results[name]["eval"], ref[against]["eval"], rtol=0, atol=TOL)


# ---------------------------------------------------------------------------------------------------------
# Two processes: DP=2 with ZeRO 1 and 2, activation checkpointing, resume; PP=2 (tests/test_pipeline.py
# checks those results: one process group of two serves both files)


def two_process_jobs(data: dict, root: str) -> list:
    def job(name, mbs, eval_=False, **sections):
        return {"name": name, "eval": eval_, "config": make_config(data, os.path.join(root, name), mbs, **sections)}

    resume = dict(parallel={"pp": 2, "zero_stage": 1}, model={"tie_embeddings": True})
    source = os.path.join(root, "resume_source")
    return [
        job("dp2_zero1", 2, eval_=True, parallel={"zero_stage": 1}),
        job("dp2_zero2", 2, parallel={"zero_stage": 2}),
        job("dp2_zero1_ckpt", 2, parallel={"zero_stage": 1}, train={"activation_checkpointing": "full"}),
        job("pp2", 4, eval_=True, parallel={"pp": 2}),
        job("pp2_tied", 4, parallel={"pp": 2, "pipeline_partition": "type:TransformerLayer"},
            model={"tie_embeddings": True}),
        job("pp2_ckpt", 4, parallel={"pp": 2}, train={"activation_checkpointing": "full"}),
        dict(job("pp2_zero1_bf16", 4, parallel={"pp": 2, "zero_stage": 1}, train={"dtype": "bfloat16"}),
             ds_bf16=True),
        # resume: 10 steps saving DeepSpeed checkpoints (ZeRO-1 shards, pipeline layer files, tied copies) at
        # steps 5 and 10; then a new run loads step 5 and continues to step 10
        job("resume_source", 4, checkpoint={"save": True, "interval": 5}, **resume),
        job("resume", 4, checkpoint={"save": False, "load": os.path.join(source, "checkpoints", "step_00000005")},
            **resume),
    ]


_TWO: dict = {}


def two_process_results(data: dict, root: str) -> dict:
    if data["prefix"] not in _TWO:
        _TWO[data["prefix"]] = run_layouts(2, two_process_jobs(data, os.path.join(root, "two")),
                                           os.path.join(root, "two"))
    return _TWO[data["prefix"]]


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
    assert (meta["pp"], meta["dp"], meta["engine"]) == (2, 1, "DeepSpeedEngine")


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
