"""The bottom layer: user errors and their exit codes, the atomic writer, weights-only loading."""
from __future__ import annotations

import io
import os
import pickle

import numpy as np
import pytest
import torch

from megatron_mtp import errors
from megatron_mtp.io_utils import (UnsafeFileError, atomic_save_path, atomic_torch_save, atomic_write_json,
                                   atomic_write_text, load_torch, sha256_file)


def test_every_user_error_has_a_kind_and_keeps_its_builtin_base():
    from megatron_mtp.checkpoint.manager import CheckpointError
    from megatron_mtp.config import ConfigError
    from megatron_mtp.data.errors import DataError
    from megatron_mtp.inference.loading import ModelLoadError
    from megatron_mtp.parallel.distributed import LaunchError
    from megatron_mtp.parallel.state import LayoutError

    expected = {ConfigError: ("config", ValueError), LayoutError: ("config", ValueError),
                DataError: ("data", ValueError), LaunchError: ("launch", RuntimeError),
                CheckpointError: ("checkpoint", RuntimeError), ModelLoadError: ("checkpoint", RuntimeError)}
    for cls, (kind, builtin) in expected.items():
        assert issubclass(cls, errors.UserError) and issubclass(cls, builtin) and cls.kind == kind
        assert errors.exit_code(cls("x")) == errors.EXIT_CODES[kind] == 2


def test_report_says_config_errors_once():
    out = io.StringIO()
    assert errors.report(errors.ConfigError("bad key."), rank=1, stream=out) == 2 and out.getvalue() == ""
    assert errors.report(errors.DataError("bad corpus."), rank=1, stream=out) == 2
    assert out.getvalue() == "data error: bad corpus.\n"



@pytest.mark.parametrize("tool, argv, kind, words", [
    ("preprocess", ["--input", "x.jsonl", "--output-prefix", "{tmp}/out"], "input", "give --tokenizer-model"),
    ("preprocess", ["--input", "{tmp}/none.jsonl", "--output-prefix", "{tmp}/out", "--tokenizer-type", "byte"],
     "data", "none.jsonl"),
    ("train_tokenizer", ["--input", "{tmp}/none.jsonl", "--output", "{tmp}/tok.json"], "data", "none.jsonl"),
    ("estimate_memory", ["--config", "configs/tiny.yaml", "--gpus", "3", "--parallel.tp", "2"], "input",
     "3 GPUs do not divide"),
    ("estimate_memory", ["--config", "{tmp}/none.yaml"], "config", "none.yaml"),
    ("generate", ["--load", "{tmp}", "--prompt", "x", "--greedy", "--temperature", "0.5"], "input",
     "--greedy and --temperature exclude each other"),
    ("generate", ["--load", "{tmp}/none", "--prompt", "x"], "checkpoint", "none"),
    ("eval_perplexity", ["--load", "{tmp}/none"], "checkpoint", "none"),
    ("eval_humaneval", ["--load", "{tmp}", "--k", "1,a", "--allow-unsandboxed"], "input", "--k takes comma-separated integers"),
    ("eval_humaneval", ["--load", "{tmp}", "--tree", "8", "--allow-unsandboxed"], "input", "--tree needs --speculative"),
    ("eval_humaneval", ["--load", "{tmp}", "--speculative", "--tree", "0,1", "--allow-unsandboxed"], "input",
     "lacks its parent"),
    ("eval_humaneval", ["--load", "{tmp}", "--dynamic-tree", "--allow-unsandboxed"], "input", "needs --tree NODES"),
])
def test_every_tool_reports_a_user_error_in_one_line(tool, argv, kind, words, tmp_path, capsys):
    """Each command-line tool says ``<kind> error: <sentence>`` through errors.report and exits 2."""
    import importlib

    main = importlib.import_module(f"megatron_mtp.cli.{tool}").main
    code = main([a.replace("{tmp}", str(tmp_path)) for a in argv])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith(f"{kind} error: ") and words in err[0], err


def test_atomic_writes_replace_whole_files_and_leave_nothing_behind(tmp_path):
    path = str(tmp_path / "a.json")
    atomic_write_text(path, "old")
    atomic_write_json(path, {"x": 1})
    assert open(path).read() == '{\n "x": 1\n}\n'

    def broken(f):
        f.write("half")
        raise OSError("disk full")

    from megatron_mtp.io_utils import atomic_write

    with pytest.raises(OSError, match="disk full"):
        atomic_write(path, broken, mode="w")
    assert open(path).read() == '{\n "x": 1\n}\n' and os.listdir(tmp_path) == ["a.json"]
    png = str(tmp_path / "plot.png")
    atomic_save_path(png, lambda tmp: (tmp.endswith(".png") or pytest.fail(tmp), open(tmp, "wb").write(b"x")))
    assert sorted(os.listdir(tmp_path)) == ["a.json", "plot.png"]


def test_load_torch_takes_tensors_and_rng_states_but_no_code(tmp_path):
    path = str(tmp_path / "ok.pt")
    atomic_torch_save({"w": torch.ones(2), "rng": np.random.get_state(), "t": (1, 2.0, "s", None)}, path)
    loaded = load_torch(path)
    assert torch.equal(loaded["w"], torch.ones(2)) and loaded["rng"][0] == "MT19937"
    assert len(sha256_file(path)) == 64

    class Runs:
        def __reduce__(self):
            return (os.getcwd, ())

    bad = str(tmp_path / "bad.pt")
    torch.save({"w": torch.ones(2), "x": Runs()}, bad)
    with pytest.raises(UnsafeFileError, match="getcwd") as info:
        load_torch(bad)
    assert isinstance(info.value, pickle.UnpicklingError) and info.value.path == bad
