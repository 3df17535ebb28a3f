"""Crash safety, pre-emption and bad checkpoints.

* SIGKILL at random moments while a training process saves a checkpoint every step, 12 times in a row:
  each time the next process resumes from the newest complete checkpoint (the one ``latest`` named when the
  process died), and after all the crashes the loss of every step equals an uninterrupted run's, bit for bit.
  Training processes are forked from a pre-imported server (``multiprocessing`` forkserver), so a kill
  costs no interpreter start-up.
* SIGUSR1 to a running ``python -m megatron_mtp.train`` saves a checkpoint at the next step boundary and
  exits 0; training resumes from it.
* Missing rank files, a model shape that differs from the config, a torn file, a ``latest`` pointing
  nowhere and a wrong path each give ``checkpoint error: <one sentence>`` and exit status 2.
"""
from __future__ import annotations

import json
import multiprocessing as mp
import os
import random
import shutil
import signal
import subprocess
import sys
import time

import pytest

from helpers import REPO, _train_in_process, losses, tiny_overrides

KILLS = 12


def _child(args: list, log_path: str) -> None:
    """A training process (what ``mtp-train`` runs), its output in ``log_path``."""
    fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    import torch

    torch.set_num_threads(1)
    from megatron_mtp.train import main

    os._exit(main(args))


def _latest_step(run_dir: str) -> int:
    try:
        with open(os.path.join(run_dir, "checkpoints", "latest")) as f:
            return int(f.read().strip().split("_")[1])
    except (FileNotFoundError, IndexError, ValueError):
        return 0


def test_sigkill_during_saves_always_resumes(tmp_path):
    from megatron_mtp.checkpoint.formats import open_checkpoint
    from megatron_mtp.checkpoint.manager import resolve_checkpoint, verify_checkpoint

    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(["torch", "torch.optim", "torch._dynamo", "numpy", "megatron_mtp.train",
                                "megatron_mtp.training.loop", "megatron_mtp.checkpoint.manager",
                                "megatron_mtp.data.builder", "megatron_mtp.ops.linear_cross_entropy",
                                "test_checkpoint_crash"])
    run, data = str(tmp_path / "run"), str(tmp_path / "data")
    args = tiny_overrides(run, data, **{"train.iters": 1000, "checkpoint.interval": 1, "checkpoint.keep_last": 2})
    rng = random.Random(1234)
    log = str(tmp_path / "train.log")
    resumed_at = []
    for round_ in range(KILLS + 1):
        before = _latest_step(run)
        open(log, "w").close()
        proc = ctx.Process(target=_child, args=(args, log))
        proc.start()
        deadline = time.time() + 120
        if round_ < KILLS:
            while _latest_step(run) <= before and proc.is_alive() and time.time() < deadline:
                time.sleep(0.01)  # wait for this process's first own checkpoint ...
            assert proc.is_alive(), open(log).read()[-3000:]
            time.sleep(rng.uniform(0.0, 0.25))  # ... then kill it somewhere in the following saves
            os.kill(proc.pid, signal.SIGKILL)
            proc.join(30)
            assert proc.exitcode == -signal.SIGKILL
        else:  # the last process is stopped politely after a few steps
            while _latest_step(run) < before + 3 and proc.is_alive() and time.time() < deadline:
                time.sleep(0.01)
            os.kill(proc.pid, signal.SIGUSR1)
            proc.join(60)
            assert proc.exitcode == 0, open(log).read()[-3000:]
        text = open(log).read()
        if before:
            assert f"resumed from {os.path.join(run, 'checkpoints', f'step_{before:08d}')} at step {before}" in text, text[-3000:]
            resumed_at.append(before)
        # whatever moment the kill hit, the run dir holds a complete, loadable newest checkpoint
        ckpt = resolve_checkpoint(run)
        meta = verify_checkpoint(ckpt)
        assert meta["step"] == _latest_step(run) >= before
        reader = open_checkpoint(ckpt)
        assert len(reader.weights()) == len(reader.infos) and reader.optimizer_state() is not None
    assert len(resumed_at) == KILLS and resumed_at == sorted(resumed_at)

    # After 12 crashes: one metrics record per step, each equal to an uninterrupted run's.
    final = _latest_step(run)
    crashed = losses(run)
    assert [r[0] for r in crashed] == list(range(1, final + 1))
    straight = str(tmp_path / "straight")
    _train_in_process(tiny_overrides(straight, data, **{"train.iters": 1000}), stop_after=final)
    assert losses(straight) == crashed
    leftovers = [n for n in os.listdir(os.path.join(run, "checkpoints")) if not n.startswith("step_") and n != "latest"]
    assert not leftovers, leftovers
    steps = sorted(n for n in os.listdir(os.path.join(run, "checkpoints")) if n.startswith("step_"))
    assert steps[-2:] == [f"step_{final - 1:08d}", f"step_{final:08d}"] and len(steps) <= 3  # keep_last 2


def test_sigusr1_to_train_subprocess_saves_and_exits(tmp_path):
    run, data = str(tmp_path / "run"), str(tmp_path / "data")
    args = tiny_overrides(run, data, **{"train.iters": 500})
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1",
               PYTHONUNBUFFERED="1")
    proc = subprocess.Popen([sys.executable, "-m", "megatron_mtp.train", *args], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines = []
    try:
        for line in proc.stdout:  # wait until it trains, then pre-empt it as Slurm would
            lines.append(line)
            if line.startswith("step "):
                proc.send_signal(signal.SIGUSR1)
                break
        out, _ = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
    out = "".join(lines) + out
    assert proc.returncode == 0, out[-3000:]
    assert "stop signal received: saving a checkpoint at step" in out
    step = _latest_step(run)
    assert 1 <= step < 500
    assert f"stop signal received: saving a checkpoint at step {step} " in out
    _train_in_process(args, stop_after=step + 2)  # continues from there
    assert [r[0] for r in losses(run)] == list(range(1, step + 3))


# ---------------------------------------------------------------------------------------------------------
# bad checkpoints


@pytest.fixture(scope="module")
def saved_run(tmp_path_factory):
    base = tmp_path_factory.mktemp("bad")
    run, data = str(base / "run"), str(base / "data")
    args = tiny_overrides(run, data, **{"train.iters": 2, "checkpoint.interval": 1})
    _train_in_process(args)
    return run, data


def _fresh_copy(saved_run, tmp_path) -> str:
    run = str(tmp_path / "run")
    shutil.copytree(saved_run[0], run)
    return run


def _main_error(args: list, capsys) -> str:
    from megatron_mtp.train import main

    saved = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGUSR1)}
    try:
        code = main(args)
    finally:
        for s, handler in saved.items():
            signal.signal(s, handler)
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert err.startswith("checkpoint error: ") and len(err.splitlines()) == 1, err
    return err


def _args(run: str, data: str, **extra) -> list:
    return tiny_overrides(run, data, **{"train.iters": 3, **extra})


def test_missing_rank_file(saved_run, tmp_path, capsys):
    run = _fresh_copy(saved_run, tmp_path)
    os.remove(os.path.join(run, "checkpoints", "step_00000002", "rank_00000.pt"))
    err = _main_error(_args(run, saved_run[1]), capsys)
    assert "step_00000002 is missing rank_00000.pt" in err and "earlier step_*" in err


def test_missing_model_file(saved_run, tmp_path, capsys):
    run = _fresh_copy(saved_run, tmp_path)
    os.remove(os.path.join(run, "checkpoints", "step_00000002", "model_tp00.pt"))
    err = _main_error(_args(run, saved_run[1]), capsys)
    assert "is missing model_tp00.pt" in err


def test_wrong_model_shape(saved_run, tmp_path, capsys):
    run = _fresh_copy(saved_run, tmp_path)
    err = _main_error(_args(run, saved_run[1], **{"model.hidden_size": 64}), capsys)
    assert "model.hidden_size=32 but the config has 64" in err and "use the config the checkpoint was saved with" in err


def test_torn_write(saved_run, tmp_path, capsys):
    run = _fresh_copy(saved_run, tmp_path)
    path = os.path.join(run, "checkpoints", "step_00000002", "model_tp00.pt")
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)
    err = _main_error(_args(run, saved_run[1]), capsys)
    assert "torn file model_tp00.pt" in err


def test_damaged_file_without_manifest_entry(saved_run, tmp_path, capsys):
    run = _fresh_copy(saved_run, tmp_path)
    ckpt = os.path.join(run, "checkpoints", "step_00000002")
    with open(os.path.join(ckpt, "meta.json")) as f:
        meta = json.load(f)
    meta.pop("files")  # an older checkpoint without a manifest: the load itself must still say it clearly
    meta.pop("sha256")  # (nor checksums: format 2)
    meta["format"] = 2
    with open(os.path.join(ckpt, "meta.json"), "w") as f:
        json.dump(meta, f)
    with open(os.path.join(ckpt, "rank_00000.pt"), "r+b") as f:
        f.truncate(100)
    err = _main_error(_args(run, saved_run[1]), capsys)
    assert "damaged file rank_00000.pt" in err


def test_latest_pointing_nowhere(saved_run, tmp_path, capsys):
    run = _fresh_copy(saved_run, tmp_path)
    with open(os.path.join(run, "checkpoints", "latest"), "w") as f:
        f.write("step_00000099")
    err = _main_error(_args(run, saved_run[1]), capsys)
    assert "names 'step_00000099', which is missing or incomplete" in err and "delete the pointer" in err


def test_unfinished_and_missing_paths(saved_run, tmp_path, capsys):
    run = _fresh_copy(saved_run, tmp_path)
    err = _main_error(_args(str(tmp_path / "new"), saved_run[1], **{"checkpoint.load": str(tmp_path / "nope")}), capsys)
    assert "does not exist" in err
    partial = os.path.join(run, "checkpoints", "step_00000003.partial")
    os.makedirs(partial)
    err = _main_error(_args(str(tmp_path / "new2"), saved_run[1], **{"checkpoint.load": partial}), capsys)
    assert "unfinished save" in err


def test_layout_mismatch_names_the_tool(saved_run, tmp_path):
    """Resuming at another layout says to reshard (checked without launching two ranks)."""
    from types import SimpleNamespace

    from megatron_mtp.checkpoint.manager import CheckpointError, CheckpointManager
    from megatron_mtp.config import load_config
    from megatron_mtp.parallel import state

    run = _fresh_copy(saved_run, tmp_path)
    cfg = load_config(None, _args(run, saved_run[1]))
    saved = state._STATE
    state._STATE = state.ParallelState(tp=2)
    try:
        with pytest.raises(CheckpointError, match="saved at tp=1 pp=1 world size 1 but this run is tp=2.*reshard"):
            CheckpointManager(cfg, SimpleNamespace(model=None), 0).resume(SimpleNamespace(consumed_samples=0))
    finally:
        state._STATE = saved


def test_publish_prune_and_recovery_mechanics(tmp_path):
    """Pointer, pruning and the repair of an interrupted re-save, with a stand-in engine (no training)."""
    from types import SimpleNamespace

    from megatron_mtp.checkpoint.manager import (CheckpointManager, atomic_torch_save, latest_checkpoint,
                                                 verify_checkpoint)
    from megatron_mtp.config import Config

    class Engine:  # the part of training.engine.Engine that saving uses
        checkpoint_format = "local-v1"

        def save_to(self, d):
            atomic_torch_save({"x": 1}, os.path.join(d, "model_tp00.pt"))

        def parameter_marks(self):
            return []

        def optimizer_keys(self):
            return None

    cfg = Config()
    cfg.train.run_dir, cfg.checkpoint.keep_last = str(tmp_path / "run"), 2
    mgr = CheckpointManager(cfg, Engine(), 0)
    it = SimpleNamespace(state_dict=lambda: {"consumed_samples": 0})
    root = os.path.join(cfg.train.run_dir, "checkpoints")
    for step in (1, 2, 3):
        mgr.save(step, it)
    assert sorted(os.listdir(root)) == ["latest", "step_00000002", "step_00000003"]
    assert verify_checkpoint(latest_checkpoint(root))["files"].keys() == {"model_tp00.pt", "rank_00000.pt"}
    # an abandoned timeline's newer checkpoint is neither pruned nor preferred over the pointer
    shutil.copytree(os.path.join(root, "step_00000003"), os.path.join(root, "step_00000009"))
    mgr.save(4, it)
    assert latest_checkpoint(root).endswith("step_00000004")
    assert sorted(os.listdir(root)) == ["latest", "step_00000003", "step_00000004", "step_00000009"]
    # saving the step `latest` names again, interrupted between moving the old copy aside and the rename
    os.replace(os.path.join(root, "step_00000004"), os.path.join(root, "step_00000004.old"))
    assert latest_checkpoint(root).endswith("step_00000004")  # repaired
    mgr.save(4, it)  # a complete re-save replaces it
    assert not os.path.exists(os.path.join(root, "step_00000004.old"))
    # a crash between publishing the first directory and writing the first pointer: adopt the directory
    os.remove(os.path.join(root, "latest"))
    assert latest_checkpoint(root).endswith("step_00000009")
    # leftovers of interrupted saves are ignored, then cleaned up by the next save
    os.makedirs(os.path.join(root, "step_00000010.partial"))
    with open(os.path.join(root, "latest"), "w") as f:
        f.write("step_00000004")
    mgr.save(5, it)
    assert not any(n.endswith(".partial") for n in os.listdir(root))
