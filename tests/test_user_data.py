"""A user's own corpus and tokenizer: every mix-up fails early with one sentence, the right set-up just works."""
import json
import os
import subprocess
import sys

import pytest

from megatron_mtp.config import ConfigError, load_config
from megatron_mtp.data.errors import DataError
from megatron_mtp.data.indexed_dataset import IndexedDataset
from megatron_mtp.data.preprocess import preprocess
from megatron_mtp.data.tokenizer_training import train_bpe_tokenizer
from megatron_mtp.data.tokenizers import (build_tokenizer, read_tokenizer_info, resolve_config_tokenizer,
                                          resolve_tokenizer_spec)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOCS = [f"def f{i}(x):\n    return x * {i} + {i % 7}  # doc {i}\n" * (1 + i % 5) for i in range(120)]


@pytest.fixture(scope="module")
def user(tmp_path_factory):
    """A JSONL corpus, a BPE tokenizer trained on it, and the corpus preprocessed with it and at byte level."""
    root = tmp_path_factory.mktemp("user")
    corpus = root / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"text": d}) + "\n" for d in DOCS))
    tok = train_bpe_tokenizer(DOCS, vocab_size=300, output_path=str(root / "tokenizer.json"), show_progress=False)
    hf = preprocess(str(corpus), str(root / "hf"), tokenizer_model=tok, append_eod=True, progress=False)
    byte = preprocess(str(corpus), str(root / "byte"), tokenizer_type="byte", append_eod=True, progress=False)
    return {"root": root, "corpus": str(corpus), "tokenizer": tok, "hf_prefix": hf.output_prefixes["text"],
            "byte_prefix": byte.output_prefixes["text"]}


def train_cli(args, cwd=REPO, timeout=300):
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run([sys.executable, "-m", "megatron_mtp.train", *args], capture_output=True, text=True,
                          timeout=timeout, cwd=cwd, env=env)


def tiny_args(run_dir, *extra):
    return ["--config", os.path.join(REPO, "configs/tiny.yaml"), "--train.iters", "2", "--train.micro_batch_size", "2",
            "--train.grad_accum", "1", "--logging.interval", "1", "--logging.tensorboard", "false",
            "--logging.plot", "false", "--data.seq_length", "32", "--train.run_dir", str(run_dir), *extra]


def test_type_is_inferred_from_the_model_and_checked(user, tmp_path):
    tok = user["tokenizer"]
    assert resolve_tokenizer_spec(None, tok) == ("hf", tok)
    assert resolve_tokenizer_spec(None, None) == ("byte", None)
    # The silent case: a tokenizer.json without a type used to tokenise at byte level.
    info = read_tokenizer_info(user["hf_prefix"])
    assert info["type"] == "hf" and info["sha256"] == build_tokenizer("hf", tok).content_hash()
    expected = sum(len(build_tokenizer("hf", tok).encode(d)) + 1 for d in DOCS)
    assert int(IndexedDataset(user["hf_prefix"]).sequence_lengths.sum()) == expected
    sp = tmp_path / "spm.model"
    sp.write_bytes(b"not really")
    with pytest.raises(DataError, match="does not match .* which is a sentencepiece tokenizer"):
        build_tokenizer("hf", str(sp))
    with pytest.raises(DataError, match="byte tokenizer takes no model file"):
        preprocess(user["corpus"], str(tmp_path / "x"), tokenizer_type="byte", tokenizer_model=tok, progress=False)
    assert not any(name.startswith("x_") for name in os.listdir(tmp_path))  # refused before writing
    (tmp_path / "vocab.txt").write_text("a\n")
    with pytest.raises(DataError, match="cannot tell the type"):
        build_tokenizer(None, str(tmp_path / "vocab.txt"))


def test_hf_tokenizer_directory_is_accepted(user, tmp_path):
    from transformers import PreTrainedTokenizerFast

    hf = PreTrainedTokenizerFast(tokenizer_file=user["tokenizer"], eos_token="<|endoftext|>", pad_token="<|pad|>")
    hf.save_pretrained(str(tmp_path / "tok"))
    from_dir = build_tokenizer(None, str(tmp_path / "tok"))
    from_file = build_tokenizer(None, user["tokenizer"])
    assert from_dir.name == "hf" and (from_dir.vocab_size, from_dir.eod, from_dir.pad) == \
        (from_file.vocab_size, from_file.eod, from_file.pad)
    assert from_dir.encode(DOCS[3]) == from_file.encode(DOCS[3]) == hf.encode(DOCS[3])
    assert from_dir.content_hash() == from_file.content_hash()  # same tokenizer, whatever the JSON formatting
    with pytest.raises(DataError, match="holds neither tokenizer.json"):
        build_tokenizer(None, str(tmp_path))


def test_vocab_size_comes_from_the_tokenizer_or_is_checked(user, tmp_path):
    cfg = load_config(os.path.join(REPO, "configs/tiny.yaml"), ["--data.tokenizer_model", user["tokenizer"]])
    assert cfg.model.vocab_size is None and cfg.data.tokenizer_type is None
    tokenizer = resolve_config_tokenizer(cfg)
    assert (cfg.model.vocab_size, cfg.data.tokenizer_type) == (tokenizer.vocab_size, "hf")
    from megatron_mtp.config import BYTE_VOCAB_SIZE

    assert load_config(os.path.join(REPO, "configs/tiny.yaml")).model.vocab_size == BYTE_VOCAB_SIZE  # byte level
    assert build_tokenizer("byte").vocab_size == BYTE_VOCAB_SIZE
    small = load_config(None, ["--data.tokenizer_model", user["tokenizer"], "--model.vocab_size", "100"])
    with pytest.raises(ConfigError, match=r"model.vocab_size \(100\) is smaller than the vocabulary"):
        resolve_config_tokenizer(small)
    # Naming no tokenizer at all leaves a smaller vocabulary to the user (data tokenised elsewhere).
    assert resolve_config_tokenizer(load_config(None, ["--model.vocab_size", "64"])).name == "byte"
    with pytest.raises(ConfigError, match=r"model.vocab_size \(64\) is smaller"):
        resolve_config_tokenizer(load_config(None, ["--model.vocab_size", "64", "--data.tokenizer_type", "byte"]))
    with pytest.raises(ConfigError, match="byte tokenizer takes no model file"):
        load_config(None, ["--data.tokenizer_model", user["tokenizer"], "--data.tokenizer_type", "byte"])
    # From the command line: one sentence, exit 2, and nothing written.
    proc = train_cli(tiny_args(tmp_path / "run", "--data.tokenizer_model", user["tokenizer"],
                               "--model.vocab_size", "100", "--data.paths", f"[{user['hf_prefix']}]"))
    assert proc.returncode == 2 and proc.stderr.startswith("config error: model.vocab_size (100) is smaller")
    assert "Traceback" not in proc.stderr and not (tmp_path / "run").exists()


def test_training_refuses_data_of_another_tokenizer(user, tmp_path):
    proc = train_cli(tiny_args(tmp_path / "run", "--data.tokenizer_model", user["tokenizer"],
                               "--data.paths", f"[{user['byte_prefix']}]"))
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.startswith(f"data error: {user['byte_prefix']} was tokenised with the byte tokenizer")
    assert "but training uses the hf tokenizer" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "run").exists()  # refused before the run wrote anything


def test_help_lists_every_config_key_and_print_config_writes_nothing(user, tmp_path):
    from megatron_mtp.config import config_reference

    proc = train_cli(["--help"])
    assert proc.returncode == 0
    docs = open(os.path.join(REPO, "docs", "training.md")).read()
    for section, key, type_name, default, meaning in config_reference():
        assert f"--{section}.{key} " in proc.stdout, key
        assert meaning and f"`{section}.{key}`" in docs, key  # every key has a meaning, and docs list it
    assert "[int, default: 4]" in " ".join(proc.stdout.split())  # e.g. mtp.n_heads: type and default

    import yaml

    proc = train_cli(tiny_args(tmp_path / "run", "--data.tokenizer_model", user["tokenizer"], "--mtp.n_heads=2",
                               "--print-config"))
    assert proc.returncode == 0, proc.stderr
    printed = yaml.safe_load(proc.stdout)
    vocab = build_tokenizer(None, user["tokenizer"]).vocab_size
    assert printed["model"]["vocab_size"] == vocab and printed["data"]["tokenizer_type"] == "hf"
    assert printed["mtp"]["n_heads"] == 2 and not (tmp_path / "run").exists()
    # A removed key (every config.yaml older versions saved holds data.num_workers) is ignored, with a warning.
    proc = train_cli(["--config", os.path.join(REPO, "configs/tiny.yaml"), "--data.num_workers", "2", "--print-config"])
    assert proc.returncode == 0 and "num_workers" not in proc.stdout
    assert proc.stderr.startswith("WARNING: config key data.num_workers was removed and is ignored")


def test_every_tool_is_a_console_script_with_defaults_in_its_help(capsys):
    import importlib
    import re

    setup = open(os.path.join(REPO, "setup.py")).read()
    scripts = dict(re.findall(r'"(mtp-[a-z-]+)=([\w.:]+)"', setup))
    assert {"mtp-train", "mtp-preprocess", "mtp-export", "mtp-generate", "mtp-eval-perplexity",
            "mtp-eval-humaneval", "mtp-reshard", "mtp-import", "mtp-train-tokenizer",
            "mtp-estimate-memory"} <= set(scripts)
    for name, target in scripts.items():
        module, function = target.split(":")
        with pytest.raises(SystemExit) as exit_info:
            getattr(importlib.import_module(module), function)(["--help"])
        assert exit_info.value.code == 0, name
        assert "default" in capsys.readouterr().out, name


@pytest.fixture(scope="module")
def moved_run(user, tmp_path_factory):
    """A run trained with a tokenizer named relative to the launch directory, then moved elsewhere."""
    import shutil

    root = tmp_path_factory.mktemp("runs")
    proc = train_cli(tiny_args("run", "--data.tokenizer_model", "tokenizer.json", "--data.paths",
                               f"[{user['hf_prefix']}]", "--train.iters", "3", "--train.eval_interval", "3",
                               "--train.eval_iters", "1", "--logging.tensorboard", "true"), cwd=str(user["root"]))
    assert proc.returncode == 0, proc.stderr[-3000:]
    moved = root / "moved"
    shutil.move(str(user["root"] / "run"), str(moved))
    return {"run": str(moved), "stdout": proc.stdout}


def test_run_directory_carries_its_tokenizer(user, moved_run):
    import yaml

    saved = yaml.safe_load(open(os.path.join(moved_run["run"], "config.yaml")))
    assert saved["data"]["tokenizer_model"] == "tokenizer" and saved["data"]["tokenizer_type"] == "hf"
    own = build_tokenizer(None, os.path.join(moved_run["run"], "tokenizer"))
    assert own.content_hash() == build_tokenizer(None, user["tokenizer"]).content_hash()
    assert saved["model"]["vocab_size"] == own.vocab_size


def test_moved_run_generates_exports_and_evaluates_from_anywhere(user, moved_run, tmp_path, monkeypatch, capsys):
    import importlib

    monkeypatch.chdir(tmp_path)  # neither the launch directory nor the run's
    run = moved_run["run"]
    generate = importlib.import_module("megatron_mtp.cli.generate")
    assert generate.main(["--load", run, "--prompt", "def f", "--max-new-tokens", "4", "--no-progress"]) == 0
    export = importlib.import_module("megatron_mtp.cli.export")
    assert export.main(["--load", run, "--format", "hf", "--output", "hf"]) == 0
    tokenizer = build_tokenizer(None, user["tokenizer"])
    config = json.load(open(tmp_path / "hf" / "config.json"))
    assert config["eos_token_id"] == tokenizer.eod and (tmp_path / "hf" / "tokenizer.json").is_file()
    from transformers import AutoTokenizer

    assert AutoTokenizer.from_pretrained(str(tmp_path / "hf")).encode(DOCS[5]) == tokenizer.encode(DOCS[5])
    perplexity = importlib.import_module("megatron_mtp.cli.eval_perplexity")
    assert perplexity.main(["--load", run, "--data", user["hf_prefix"], "--max-samples", "2", "--no-progress"]) == 0
    reshard = importlib.import_module("megatron_mtp.cli.reshard")
    assert reshard.main(["--load", run, "--output", "resharded", "--tp", "1", "--pp", "1"]) == 0
    assert build_tokenizer(None, str(tmp_path / "resharded" / "tokenizer")).content_hash() == tokenizer.content_hash()
    capsys.readouterr()


def test_export_without_a_tokenizer_fails_and_writes_nothing(moved_run, tmp_path, capsys):
    import importlib
    import shutil

    run = tmp_path / "no-tokenizer"
    shutil.copytree(moved_run["run"], run)
    shutil.rmtree(run / "tokenizer")
    export = importlib.import_module("megatron_mtp.cli.export")
    assert export.main(["--load", str(run), "--format", "hf", "--output", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("checkpoint error: cannot export a complete tokenizer:") and len(err.splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_validation_and_saves_are_logged(moved_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from megatron_mtp.training.metrics import read_metrics

    run = moved_run["run"]
    valid = read_metrics(run, "valid")
    assert [r["step"] for r in valid] == [3]
    heads = [valid[0][f"valid_loss_head_{i}"] for i in range(1, 5)]
    assert all(h > 0 for h in heads) and valid[0]["valid_loss"] == pytest.approx(sum(heads))
    assert [r["step"] for r in read_metrics(run)] == [1, 2, 3]  # training records apart from validation
    events = EventAccumulator(os.path.join(run, "tensorboard")).Reload()
    assert {"valid/valid_loss", "valid/valid_loss_head_4", "train/loss_head_1"} <= set(events.Tags()["scalars"])
    assert events.Scalars("valid/valid_loss_head_2")[0].value == pytest.approx(heads[1], rel=1e-5)
    assert "saved checkpoint " in moved_run["stdout"] and "at step 3 in " in moved_run["stdout"]


def test_eval_perplexity_defaults_to_the_runs_validation_split(user, moved_run, capsys):
    import importlib

    perplexity = importlib.import_module("megatron_mtp.cli.eval_perplexity")
    assert perplexity.main(["--load", moved_run["run"], "--max-samples", "3", "--no-progress"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["data"].startswith("the validation split (969,30,1) of ") and user["hf_prefix"] in result["data"]
    assert result["samples"] >= 1 and len(result["heads"]) == 4 and all(h["tokens"] > 0 for h in result["heads"])


FAKE_WANDB = '''
import json, os
class _Run:
    def log(self, data, step=None):
        _write({"log": data, "step": step})
    def finish(self):
        _write({"finish": True})
def _write(record):
    with open(os.environ["FAKE_WANDB_LOG"], "a") as f:
        f.write(json.dumps(record) + "\\n")
def init(**kwargs):
    _write({"init": {k: v for k, v in kwargs.items() if k != "config"}, "has_config": "config" in kwargs})
    return _Run()
'''


def test_wandb_is_optional_and_offline(tmp_path, monkeypatch):
    import importlib.util

    from megatron_mtp.config import Config
    from megatron_mtp.training.metrics import check_logging

    cfg = Config()
    cfg.logging.wandb = True
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "wandb" else real_find_spec(name, *a))
    with pytest.raises(ConfigError, match="logging.wandb is true but the wandb package is not installed"):
        check_logging(cfg.logging)
    monkeypatch.undo()
    # The training loop's calls, through a stand-in module: offline mode, the run's id kept for resumes.
    (tmp_path / "fake" / "wandb").mkdir(parents=True)
    (tmp_path / "fake" / "wandb" / "__init__.py").write_text(FAKE_WANDB)
    log = tmp_path / "wandb.jsonl"
    env = dict(os.environ, FAKE_WANDB_LOG=str(log),
               PYTHONPATH=os.pathsep.join([str(tmp_path / "fake"), REPO, os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, "-m", "megatron_mtp.train",
                           *tiny_args(tmp_path / "run", "--logging.wandb", "true", "--logging.wandb_mode", "offline")],
                          capture_output=True, text=True, timeout=300, env=env, cwd=str(tmp_path))
    assert proc.returncode == 0, proc.stderr[-2000:]
    records = [json.loads(line) for line in log.read_text().splitlines()]
    assert records[0]["init"]["mode"] == "offline" and records[0]["has_config"]
    assert records[0]["init"]["id"] == (tmp_path / "run" / "wandb_run_id").read_text().strip()
    logged = [r for r in records if "log" in r]
    assert [r["step"] for r in logged] == [1, 2] and "train/loss_head_1" in logged[0]["log"]
    assert records[-1] == {"finish": True}


def test_export_is_sharded_readable_documented_and_loads_every_head(user, moved_run, tmp_path):
    import stat

    from transformers import AutoModelForCausalLM, LlamaForCausalLM

    from megatron_mtp.checkpoint.export import export_hf
    from megatron_mtp.checkpoint.merge import load_merged_model

    out = str(tmp_path / "hf")
    export_hf(moved_run["run"], out, max_shard_bytes=60_000)  # a tiny threshold: the tiny model needs shards
    files = sorted(os.listdir(out))
    index = json.load(open(os.path.join(out, "model.safetensors.index.json")))
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1 and shards == [n for n in files if n.startswith("model-")]
    assert "model.safetensors" not in files
    assert all(stat.S_IMODE(os.stat(os.path.join(out, n)).st_mode) == 0o644 for n in files)
    card = open(os.path.join(out, "README.md")).read()
    valid = json.loads([line for line in open(os.path.join(moved_run["run"], "metrics.jsonl"))
                        if "valid_loss" in line][-1])
    assert "**4 output heads**" in card and "3 steps" in card and user["hf_prefix"] in card
    assert f"head 2: {valid['valid_loss_head_2']:.4f}" in card and "trust_remote_code=True" in card

    cfg, ours, tokenizer = load_merged_model(moved_run["run"])
    ids = torch_ids(tokenizer.encode(DOCS[7])[:40])
    import torch

    with torch.no_grad():
        reference = ours.logits(ids, heads="all")
        plain = LlamaForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
        auto = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()  # no remote code: plain Llama
        assert type(auto).__name__ == "LlamaForCausalLM"
        remote = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32, trust_remote_code=True).eval()
        assert type(remote).__name__ == "MTPLlamaForCausalLM"
        assert (plain(ids).logits - reference[0]).abs().max().item() <= 1e-4
        heads = remote(ids).heads_logits
        generated = remote.generate(ids, max_new_tokens=4, do_sample=False, pad_token_id=tokenizer.eod)
        assert torch.equal(generated, plain.generate(ids, max_new_tokens=4, do_sample=False,
                                                     pad_token_id=tokenizer.eod))
    assert len(heads) == 4
    for i in range(4):
        assert (heads[i] - reference[i]).abs().max().item() <= 1e-4, i

    # Our own loader reads the sharded export back, every head included.
    _, again, _ = load_merged_model(out)
    with torch.no_grad():
        assert all((a - b).abs().max().item() <= 1e-6 for a, b in zip(again.logits(ids, heads="all"), reference))

    # Re-exporting below the threshold leaves one file, and no stale shard to shadow it.
    export_hf(moved_run["run"], out)
    assert "model.safetensors" in os.listdir(out) and not any(n.startswith("model-") for n in os.listdir(out))


def torch_ids(ids):
    import torch

    return torch.tensor([ids])


def test_a_run_directory_keeps_its_tokenizer(user, tmp_path):
    from megatron_mtp.data.tokenizers import install_run_tokenizer

    tokenizer = build_tokenizer(None, user["tokenizer"])
    assert install_run_tokenizer(tokenizer, str(tmp_path)) == "tokenizer"
    assert install_run_tokenizer(tokenizer, str(tmp_path)) == "tokenizer"  # the same one again: fine
    other = train_bpe_tokenizer(DOCS[:40], vocab_size=280, output_path=str(tmp_path / "other.json"),
                                show_progress=False)
    with pytest.raises(DataError, match="holds the hf tokenizer .* but this run was given the hf tokenizer"):
        install_run_tokenizer(build_tokenizer(None, other), str(tmp_path))
    assert install_run_tokenizer(build_tokenizer("byte"), str(tmp_path / "byte")) is None
    assert not (tmp_path / "byte").exists()


def test_data_without_a_record_warns_and_a_damaged_record_is_one_sentence(user, tmp_path, capsys):
    import numpy as np

    from megatron_mtp.data.indexed_dataset import IndexedDatasetBuilder
    from megatron_mtp.data.pipeline import check_data_tokenizers

    prefix = str(tmp_path / "megatron_made")  # as Megatron-LM writes it: .bin/.idx and nothing else
    with IndexedDatasetBuilder(prefix, np.uint16) as builder:
        builder.add_document(np.arange(10))
        builder.finalize()
    tokenizer = build_tokenizer(None, user["tokenizer"])
    check_data_tokenizers([prefix, user["hf_prefix"]], tokenizer, warn=True)
    out = capsys.readouterr().out
    assert f"WARNING: {prefix} carry no tokenizer record" in out and user["hf_prefix"] not in out
    (tmp_path / "megatron_made.tokenizer_info.json").write_text("{not json")
    with pytest.raises(DataError, match="megatron_made.tokenizer_info.json is not readable JSON"):
        check_data_tokenizers([prefix], tokenizer, warn=True)
