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
