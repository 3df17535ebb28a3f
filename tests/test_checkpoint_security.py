"""Checkpoints are hostile input: nothing in one can run code, and corruption is caught by its checksums.

A ``.pt`` carrying an object whose ``__reduce__`` would create a marker file is planted in a checkpoint (with
meta.json's sizes and SHA-256s rewritten to match, as an attacker who controls the directory would). Resume,
``load_model`` (what generate uses), export and reshard each refuse it with one sentence, and the marker
never appears. A byte flipped inside a tensor file (same size) is named by the checksum check.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil

import pytest
import torch

from helpers import _train_in_process, tiny_overrides


class Payload:
    """Unpickling this calls open(marker, "w"): the file appearing means code ran."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.fixture(scope="module")
def saved_run(tmp_path_factory):
    base = tmp_path_factory.mktemp("security")
    run, data = str(base / "run"), str(base / "data")
    _train_in_process(tiny_overrides(run, data, **{"train.iters": 2}))
    return run, data


def _copy(saved_run, tmp_path) -> str:
    run = str(tmp_path / "run")
    shutil.copytree(saved_run[0], run)
    return run


def _ckpt(run: str) -> str:
    return os.path.join(run, "checkpoints", "step_00000002")


def _rewrite_manifest(ckpt: str, rel: str) -> None:
    """What an attacker who controls the directory does: make meta.json agree with the planted file."""
    path = os.path.join(ckpt, rel)
    with open(os.path.join(ckpt, "meta.json")) as f:
        meta = json.load(f)
    meta["files"][rel] = os.path.getsize(path)
    with open(path, "rb") as f:
        meta["sha256"][rel] = hashlib.sha256(f.read()).hexdigest()
    with open(os.path.join(ckpt, "meta.json"), "w") as f:
        json.dump(meta, f)


def _plant(run: str, rel: str, marker: str) -> None:
    path = os.path.join(_ckpt(run), rel)
    content = torch.load(path, weights_only=False)  # our own file, trusted here
    content["extra"] = Payload(marker)
    torch.save(content, path)
    _rewrite_manifest(_ckpt(run), rel)


@pytest.mark.parametrize("rel", ["rank_00000.pt", "model_tp00.pt"])
def test_malicious_pickle_runs_nowhere(saved_run, tmp_path, capsys, rel):
    from megatron_mtp.checkpoint.export import export
    from megatron_mtp.checkpoint.reshard import reshard
    from megatron_mtp.errors import CheckpointError, ModelLoadError
    from megatron_mtp.inference.loading import load_model
    from megatron_mtp.train import main

    run = _copy(saved_run, tmp_path)
    marker = str(tmp_path / "code_ran")
    _plant(run, rel, marker)
    refusal = re.compile(rf"file {rel} holds Python objects other than tensors and plain data \(\w+\.open\), which "
                         rf"could run code when loaded, so it is refused; use a checkpoint written by megatron_mtp\.$")

    # resume (a fresh run starting from the planted checkpoint)
    args = tiny_overrides(str(tmp_path / "resumed"), saved_run[1], **{"train.iters": 3, "checkpoint.load": run})
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("checkpoint error: ") and refusal.search(err) and len(err.splitlines()) == 1, err
    if rel == "model_tp00.pt":  # generate (load_model), export and reshard read the weights file
        with pytest.raises(ModelLoadError, match="could run code"):
            load_model(run)
        with pytest.raises(CheckpointError, match="could run code"):
            export(run, "hf", str(tmp_path / "hf"))
    with pytest.raises(CheckpointError, match="could run code"):
        reshard(run, str(tmp_path / "resharded"), tp=1, pp=1)
    assert not os.path.exists(marker), "unpickling ran code"


def test_flipped_byte_is_reported_by_the_checksum(saved_run, tmp_path, capsys):
    from megatron_mtp.errors import ModelLoadError
    from megatron_mtp.inference.loading import load_model
    from megatron_mtp.train import main

    run = _copy(saved_run, tmp_path)
    path = os.path.join(_ckpt(run), "model_tp00.pt")
    size = os.path.getsize(path)
    with open(path, "r+b") as f:  # a byte in the middle of the tensor data: same size, still a valid zip
        f.seek(size // 2)
        byte = f.read(1)
        f.seek(size // 2)
        f.write(bytes([byte[0] ^ 0x40]))
    sentence = "has a corrupted file model_tp00.pt (its SHA-256 differs from the one recorded in meta.json)"
    args = tiny_overrides(str(tmp_path / "resumed"), saved_run[1], **{"train.iters": 3, "checkpoint.load": run})
    assert main(args) == 2
    err = capsys.readouterr().err
    assert sentence in err and len(err.strip().splitlines()) == 1, err
    with pytest.raises(ModelLoadError, match="corrupted file model_tp00.pt"):
        load_model(run)


def test_loading_a_model_hashes_only_the_files_it_reads(saved_run, tmp_path, capsys):
    """load_model reads the weights, not the per-rank RNG/data file: a corrupted rank file does not stop it
    (its model is intact), while resuming, which needs that file, names it."""
    from megatron_mtp.inference.loading import load_model
    from megatron_mtp.train import main

    run = _copy(saved_run, tmp_path)
    path = os.path.join(_ckpt(run), "rank_00000.pt")
    with open(path, "r+b") as f:
        f.seek(os.path.getsize(path) // 2)
        byte = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte[0] ^ 0x01]))
    load_model(run)
    args = tiny_overrides(str(tmp_path / "resumed"), saved_run[1], **{"train.iters": 3, "checkpoint.load": run})
    assert main(args) == 2
    assert "has a corrupted file rank_00000.pt" in capsys.readouterr().err


def test_skipping_checksums_warns(saved_run, tmp_path, capsys, monkeypatch):
    """For huge checkpoints on trusted storage: no hashing when loading, nor when saving; both say so."""
    from megatron_mtp.inference.loading import load_model

    monkeypatch.setenv("MTP_SKIP_CHECKSUMS", "1")
    load_model(saved_run[0])
    err = capsys.readouterr().err
    assert "MTP_SKIP_CHECKSUMS is set: the SHA-256 checksums of checkpoint" in err and "NOT verified" in err
    run = str(tmp_path / "unhashed")
    _train_in_process(tiny_overrides(run, saved_run[1], **{"train.iters": 1}))
    assert "is saved WITHOUT SHA-256 checksums" in capsys.readouterr().err
    with open(os.path.join(run, "checkpoints", "step_00000001", "meta.json")) as f:
        assert "sha256" not in json.load(f)
    monkeypatch.delenv("MTP_SKIP_CHECKSUMS")
    load_model(run)
    assert "was saved without SHA-256 checksums" in capsys.readouterr().err


def test_deepspeed_files_load_weights_only(tmp_path, capsys):
    """DeepSpeed's own loader unpickles with weights_only=False; ours replaces it (training/ds_compat.py)."""
    pytest.importorskip("deepspeed")
    from megatron_mtp.train import main

    run, data = str(tmp_path / "ds"), str(tmp_path / "data")
    extra = {"train.iters": 2, "parallel.zero_stage": 1}
    _train_in_process(tiny_overrides(run, data, **extra))
    ckpt = _ckpt(run)
    rel = "zero_pp_rank_0_mp_rank_00_optim_states.pt"
    assert os.path.isfile(os.path.join(ckpt, rel))
    marker = str(tmp_path / "code_ran")
    _plant(run, rel, marker)
    capsys.readouterr()
    assert main(tiny_overrides(run, data, **{**extra, "train.iters": 3})) == 2  # resume the run itself
    err = capsys.readouterr().err
    assert f"file {rel} holds Python objects other than tensors" in err and "could run code" in err, err
    assert not os.path.exists(marker)
