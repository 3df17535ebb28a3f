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
    assert load_config(os.path.join(REPO, "configs/tiny.yaml")).model.vocab_size == 258  # byte level
    small = load_config(None, ["--data.tokenizer_model", user["tokenizer"], "--model.vocab_size", "100"])
    with pytest.raises(ConfigError, match=r"model.vocab_size \(100\) is smaller than the vocabulary"):
        resolve_config_tokenizer(small)
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
    proc = train_cli(["--config", os.path.join(REPO, "configs/tiny.yaml"), "--data.num_workers", "2"])
    assert proc.returncode == 2 and proc.stderr.startswith("config error: unknown config key 'data.num_workers': "
                                                           "it was removed")


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
