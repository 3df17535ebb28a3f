"""Config loading, overrides and the one-sentence errors for bad configs."""
import subprocess
import sys

import pytest
import yaml

from megatron_mtp.config import ConfigError, load_config, validate_layout


def test_yaml_and_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"model": {"num_layers": 8}, "mtp": {"n_heads": 2}}))
    cfg = load_config(str(path), ["--mtp.n_heads", "3", "--train.iters=7", "--mtp.loss_weights", "[1, 0.5, 0.25]",
                                  "--mtp.memory_efficient", "false"])
    assert cfg.model.num_layers == 8
    assert cfg.mtp.n_heads == 3 and cfg.train.iters == 7
    assert cfg.mtp.loss_weights == [1, 0.5, 0.25]
    assert cfg.mtp.memory_efficient is False


def test_resolved_config_round_trips(tmp_path):
    cfg = load_config("configs/tiny.yaml", ["--train.iters", "3"])
    cfg.save(str(tmp_path / "config.yaml"))
    again = load_config(str(tmp_path / "config.yaml"))
    assert again.to_dict() == cfg.to_dict()


@pytest.mark.parametrize(
    "overrides, fragment",
    [
        (["--mtp.n_heads", "6"], "mtp.n_heads (6) must be smaller than model.num_layers (6)"),
        (["--model.hidden_size", "130"], "model.hidden_size (130) must be divisible by model.num_attention_heads"),
        (["--model.num_kv_heads", "3"], "model.num_kv_heads (3) must divide model.num_attention_heads"),
        (["--model.bogus", "1"], "unknown config key 'model.bogus'"),
        (["--nosuch.key", "1"], "unknown config section 'nosuch'"),
        (["--train.iters", "ten"], "train.iters must be an integer"),
        (["--mtp.memory_efficient", "maybe"], "mtp.memory_efficient must be true or false"),
        (["--mtp.head_type", "mlp"], "mtp.head_type must be transformer or linear"),
        (["--mtp.loss_memory", "small"], "mtp.loss_memory must be fast or lean"),
        (["--mtp.loss_weights", "[1, 1]"], "mtp.loss_weights has 2 entries but mtp.n_heads is 4"),
        (["--parallel.pp", "2", "--parallel.zero_stage", "2"], "DeepSpeed's pipeline engine supports ZeRO stage 0 or 1"),
        (["--data.seq_length", "5000"], "data.seq_length (5000) exceeds model.max_seq_length"),
        (["--train.activation_checkpointing", "some"], "train.activation_checkpointing must be none, full or every_<k>"),
        (["--parallel.tp", "3"], "parallel.tp (3) must divide model.num_attention_heads"),
    ],
)
def test_bad_configs_fail_with_one_sentence(overrides, fragment):
    with pytest.raises(ConfigError) as info:
        load_config("configs/tiny.yaml", overrides)
    message = str(info.value)
    assert fragment in message
    assert message.count("\n") == 0 and message.endswith(".")


def test_batch_layout_errors():
    cfg = load_config("configs/tiny.yaml", ["--train.global_batch_size", "20", "--train.grad_accum", "none"])
    with pytest.raises(ConfigError, match=r"global_batch_size \(20\) must be a multiple of train.micro_batch_size"):
        validate_layout(cfg, world_size=2)
    cfg = load_config("configs/tiny.yaml", ["--train.global_batch_size", "32", "--train.grad_accum", "3"])
    with pytest.raises(ConfigError, match="contradicts"):
        validate_layout(cfg, world_size=1)
    cfg = load_config("configs/tiny.yaml", ["--parallel.tp", "2"])
    with pytest.raises(ConfigError, match=r"world size \(3\) must be divisible by parallel.tp x parallel.pp"):
        validate_layout(cfg, world_size=3)


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(str(tmp_path / "nope.yaml"))
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(str(bad))


def test_cli_reports_config_error_and_exit_code(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "megatron_mtp.train", "--config", "configs/tiny.yaml", "--mtp.n_heads", "9",
         "--train.run_dir", str(tmp_path / "run")],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().startswith("config error: mtp.n_heads (9) must be smaller than model.num_layers")
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "run").exists()  # failed before anything was written


# Every field has a range; a value outside it is one sentence naming the key, the value and the range.
@pytest.mark.parametrize(
    "key, value, message",
    [
        ("train.global_batch_size", "0", "train.global_batch_size must be positive (or none), got 0."),
        ("model.make_vocab_size_divisible_by", "0", "model.make_vocab_size_divisible_by must be positive, got 0."),
        ("model.ffn_hidden_size", "-1", "model.ffn_hidden_size must be positive (or none), got -1."),
        ("model.init_std", "-1", "model.init_std must be a finite number > 0, got -1.0."),
        ("optimizer.beta1", "2", "optimizer.beta1 must lie in [0, 1), got 2.0."),
        ("optimizer.lr", "inf", "optimizer.lr must be a finite number > 0, got inf."),
        ("optimizer.lr", "nan", "optimizer.lr must be a finite number > 0, got nan."),
        ("model.norm_eps", "-1", "model.norm_eps must be a finite number > 0, got -1.0."),
        ("model.num_kv_heads", "0", "model.num_kv_heads must be positive (or none), got 0."),
        ("optimizer.clip_grad", "-1", "optimizer.clip_grad must be a finite number >= 0, got -1.0."),
        ("checkpoint.interval", "-1", "checkpoint.interval must be non-negative, got -1."),
        ("train.grad_accum", "-1", "train.grad_accum must be positive (or none), got -1."),
        ("optimizer.beta2", "1", "optimizer.beta2 must lie in [0, 1), got 1.0."),
        ("optimizer.eps", "0", "optimizer.eps must be a finite number > 0, got 0.0."),
        ("optimizer.weight_decay", "-0.1", "optimizer.weight_decay must be a finite number >= 0, got -0.1."),
        ("optimizer.decay_iters", "0", "optimizer.decay_iters must be positive (or none), got 0."),
        ("model.rope_theta", "0", "model.rope_theta must be a finite number > 0, got 0.0."),
        ("model.hidden_dropout", "1", "model.hidden_dropout must lie in [0, 1), got 1.0."),
        ("model.attention_dropout", "-0.5", "model.attention_dropout must lie in [0, 1), got -0.5."),
        ("model.max_seq_length", "0", "model.max_seq_length must be positive, got 0."),
        ("mtp.n_heads", "0", "mtp.n_heads must be positive, got 0."),
        ("mtp.loss_weights", "[0, 0, 0, 0]",
         "mtp.loss_weights must be a list of non-negative finite numbers with a positive sum (or none), "
         "got [0, 0, 0, 0]."),
        ("parallel.zero_stage", "3", "parallel.zero_stage must be 0, 1 or 2, got 3."),
        ("parallel.reduce_bucket_size", "0", "parallel.reduce_bucket_size must be positive, got 0."),
        ("parallel.backend", "tcp", "parallel.backend must be nccl, gloo, mpi or ucc (or none), got 'tcp'."),
        ("parallel.timeout_minutes", "0", "parallel.timeout_minutes must be a finite number > 0, got 0.0."),
        ("parallel.heartbeat_timeout_s", "-1", "parallel.heartbeat_timeout_s must be a finite number >= 0, got -1.0."),
        ("data.split", "1,-1", "data.split must be up to three non-negative numbers with a positive sum, such as "
                              "'969,30,1', got '1,-1'."),
        ("data.num_workers", "-1", "data.num_workers must be non-negative, got -1."),
        ("data.tokenizer_type", "word", "data.tokenizer_type must be byte, hf or sentencepiece, got 'word'."),
        ("train.seed", "-1", f"train.seed must lie in 0..{2**62}, got -1."),
        ("train.run_dir", " ", "train.run_dir must be a non-empty string, got ' '."),
        ("train.eval_iters", "0", "train.eval_iters must be positive, got 0."),
        ("train.max_consecutive_skips", "0", "train.max_consecutive_skips must be positive, got 0."),
        ("checkpoint.keep_last", "0", "checkpoint.keep_last must be positive, got 0."),
        ("logging.interval", "0", "logging.interval must be positive, got 0."),
    ],
)
def test_every_value_is_range_checked(key, value, message):
    with pytest.raises(ConfigError) as info:
        load_config("configs/tiny.yaml", [f"--{key}", value])
    assert str(info.value) == message


def test_every_field_of_every_section_has_a_range():
    import dataclasses

    from megatron_mtp.config import _RANGES, Config, check_ranges

    sections = {f.name: f.default_factory for f in dataclasses.fields(Config)}
    assert set(_RANGES) == set(sections)
    for name, factory in sections.items():
        assert set(_RANGES[name]) == {f.name for f in dataclasses.fields(factory())}, name
    check_ranges(Config())  # the defaults are inside their ranges


def test_non_utf8_yaml_is_one_sentence(tmp_path):
    bad = tmp_path / "latin1.yaml"
    bad.write_bytes("model:\n  hidden_size: 128  # größe\n".encode("latin-1"))
    with pytest.raises(ConfigError) as info:
        load_config(str(bad))
    assert str(info.value) == f"config file {str(bad)!r} is not UTF-8 text; save it as UTF-8 YAML."


def test_cli_rejects_an_infinite_learning_rate_before_writing(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "megatron_mtp.train", "--config", "configs/tiny.yaml", "--optimizer.lr", "inf",
         "--train.run_dir", str(tmp_path / "run")],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip() == "config error: optimizer.lr must be a finite number > 0, got inf."
    assert not (tmp_path / "run").exists()
