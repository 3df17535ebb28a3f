"""Faults a run must survive or end cleanly on (docs/training.md, "Faults and failure model").

* Non-finite steps: a NaN loss or an infinite gradient skips the update (weights and Adam state bit-for-bit
  unchanged), is counted as ``skipped_iters``, and ``train.max_consecutive_skips`` of them in a row end the run
  with one sentence and exit status 3. A non-finite state is never saved, so rotation cannot prune the last
  good checkpoint. Across ranks (TP = 2 on LocalEngine; DP = 2 on DeepSpeed, ZeRO 0 and 1; PP = 2) a NaN or
  an infinity on ONE rank makes every rank skip the same step.
* A SIGSTOPped rank (either the one hosting the rendezvous store or not) ends the job within
  ``parallel.heartbeat_timeout_s`` with a message naming it.
* A second trainer on a locked run directory is refused with one sentence (exit 2); a lock left by a killed
  trainer is taken over.

The NaNs are injected by monkeypatching the model's forward (a NaN loss) or a gradient hook (an infinite
gradient with a finite loss) at chosen steps.
"""
from __future__ import annotations

import math
import os
import re
import signal
import subprocess
import sys
import time

import pytest
import torch

from dist_utils import run_distributed
from helpers import REPO, free_port, make_corpus, tiny_overrides


def _records(run_dir: str) -> list:
    from megatron_mtp.training.metrics import read_metrics

    return read_metrics(run_dir)


class _Injector:
    """Makes chosen (1-based) steps non-finite: ``nan_loss`` steps get a NaN loss (and so NaN gradients),
    ``inf_grad`` steps a finite loss with an infinite gradient; ``corrupt_after`` writes a NaN into a weight
    after that step's update, a state the step test cannot see. ``ranks`` limits it to some ranks."""

    def __init__(self, nan_loss=(), inf_grad=(), corrupt_after=None, ranks=None, inf_param_grad=()):
        self.nan_loss, self.inf_grad = set(nan_loss), set(inf_grad)
        self.corrupt_after, self.ranks = corrupt_after, ranks
        self.inf_param_grad = set(inf_param_grad)  # an infinite gradient on one parameter (any engine, pipeline too)
        self.step = 0
        self.skipped = []  # StepResult.skipped per step
        self.checksums = []  # float64 sum of this rank's parameters after each step

    def _mine(self) -> bool:
        import torch.distributed as dist

        rank = dist.get_rank() if dist.is_initialized() else 0
        return self.ranks is None or rank in self.ranks

    def install(self, monkeypatch) -> None:
        from megatron_mtp.model.mtp_model import MTPModel
        from megatron_mtp.training import deepspeed_engine, local_engine

        injector = self
        forward = MTPModel.forward

        def poisoned_forward(model, *args, **kwargs):
            loss, heads = forward(model, *args, **kwargs)
            if injector._mine() and injector.step in injector.nan_loss:
                loss = loss * math.nan
            if injector._mine() and injector.step in injector.inf_grad and torch.is_grad_enabled():
                loss = _InfGrad.apply(loss)
            return loss, heads

        monkeypatch.setattr(MTPModel, "forward", poisoned_forward)
        for cls in (local_engine.LocalEngine, deepspeed_engine.DeepSpeedEngine):
            monkeypatch.setattr(cls, "train_step", self._wrap(cls.train_step))

    def _wrap(self, train_step):
        injector = self

        def wrapped(engine, micro_batches, step):
            injector.step = step + 1
            hook = None
            if injector._mine() and injector.step in injector.inf_param_grad:
                hook = next(engine.model.parameters()).register_hook(lambda g: g * math.inf)
            result = train_step(engine, micro_batches, step)
            if hook is not None:
                hook.remove()
            injector.skipped.append(bool(result.skipped))
            if injector.corrupt_after == step + 1:
                with torch.no_grad():
                    next(engine.model.parameters()).view(-1)[0] = math.nan
            injector.checksums.append(sum(float(p.detach().double().sum()) for p in engine.model.parameters()))
            return result

        return wrapped


class _InfGrad(torch.autograd.Function):
    """Identity forward; backward hands an infinite gradient upstream (the loss itself stays finite)."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad * math.inf


def _run_main(args: list) -> int:
    from megatron_mtp.train import main

    saved = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGUSR1)}
    try:
        return main(args)
    finally:
        for s, handler in saved.items():
            signal.signal(s, handler)


def test_non_finite_steps_are_skipped_counted_and_stop_the_run(tmp_path, monkeypatch, capsys):
    from megatron_mtp.checkpoint.formats import open_checkpoint
    from megatron_mtp.checkpoint.manager import complete_checkpoints

    run, data = str(tmp_path / "run"), str(tmp_path / "data")
    injector = _Injector(inf_grad={3}, nan_loss=set(range(7, 100)))
    injector.install(monkeypatch)
    args = tiny_overrides(run, data, **{"train.iters": 20, "checkpoint.interval": 2, "checkpoint.keep_last": 3,
                                        "train.max_consecutive_skips": 3})
    assert _run_main(args) == 3
    out, err = capsys.readouterr()
    assert err.strip() == ("training error: the loss or gradient norm was not finite for 3 steps in a row (steps "
                           "7-9), so training stopped; resume from the last checkpoint with a lower optimizer.lr "
                           "or a stricter optimizer.clip_grad.")
    assert injector.skipped == [False, False, True, False, False, False, True, True, True]
    # a skip changes nothing: step 3 (finite loss, infinite gradient) and steps 7-9 leave the weights as they were
    sums = injector.checksums
    assert sums[2] == sums[1] and sums[6] == sums[5] == sums[7] == sums[8] and sums[3] != sums[2]

    records = {r["step"]: r for r in _records(run)}
    assert sorted(records) == list(range(1, 9))  # step 9 raised before it was logged
    assert [s for s, r in records.items() if r["skipped_iters"]] == [3, 7, 8]
    assert all(r["skipped_iters"] == 0 and math.isfinite(r["loss"]) for s, r in records.items() if s not in (3, 7, 8))
    assert math.isfinite(records[3]["loss"]) is False and math.isnan(records[7]["loss"])  # skipped: no loss to log
    assert "| skipped 1" in out and "step 3: the loss or gradient norm is not finite; update skipped (1 in a row" in out

    # checkpoints 4, 6, 8 (keep_last 3), all finite; 8 follows two skipped steps, so it equals 6 bit for bit
    steps = [s for s, _ in complete_checkpoints(os.path.join(run, "checkpoints"))]
    assert steps == [4, 6, 8]
    readers = {s: open_checkpoint(os.path.join(run, "checkpoints", f"step_{s:08d}")) for s in steps}
    for reader in readers.values():
        assert all(torch.isfinite(w).all() for w in reader.weights().values())
    w6, w8 = readers[6].weights(), readers[8].weights()
    assert w6.keys() == w8.keys() and all(torch.equal(w6[k], w8[k]) for k in w6)
    o6, o8 = readers[6].optimizer_state(), readers[8].optimizer_state()
    assert o6 is not None and o6["state"].keys() == o8["state"].keys()
    for key, moments in o6["state"].items():
        assert all(torch.equal(moments[m], o8["state"][key][m]) for m in moments), key
    assert float(o6["step"]) == float(o8["step"]) == 5  # Adam's step count: 6 steps taken, one (step 3) skipped


def test_a_non_finite_state_is_never_saved_and_the_last_good_checkpoint_survives(tmp_path, monkeypatch, capsys):
    from megatron_mtp.checkpoint.formats import open_checkpoint
    from megatron_mtp.checkpoint.manager import resolve_checkpoint

    run, data = str(tmp_path / "run"), str(tmp_path / "data")
    _Injector(corrupt_after=5).install(monkeypatch)  # a NaN weight after step 5's (finite) update
    args = tiny_overrides(run, data, **{"train.iters": 20, "checkpoint.interval": 2, "checkpoint.keep_last": 1})
    assert _run_main(args) == 3
    err = capsys.readouterr().err.strip()
    assert err.startswith("training error: the model's parameters are not finite at step 6, so no checkpoint was "
                          "written; resume from the newest one under"), err
    assert err.count("\n") == 0
    # keep_last 1: publishing step 6 would have pruned step 4, the last good state; nothing was written instead
    assert sorted(os.listdir(os.path.join(run, "checkpoints"))) == ["latest", "step_00000004"]
    reader = open_checkpoint(resolve_checkpoint(run))
    assert reader.step == 4 and all(torch.isfinite(w).all() for w in reader.weights().values())


# ---------------------------------------------------------------------------------------------------------
# Several ranks: a NaN on one rank only must make every rank skip the same step


def _skip_worker(rank: int, world_size: int, base: str, data: str, layouts: list):
    import pytest as _pytest

    from megatron_mtp.config import load_config
    from megatron_mtp.training import loop

    out = {}
    for name, extra in layouts:
        cfg = load_config(None, tiny_overrides(os.path.join(base, name), data, **{"train.iters": 4, **extra}))
        if extra.get("parallel.pp", 1) > 1:  # the pipeline runs its own stage modules: hook a parameter instead
            injector = _Injector(inf_param_grad={2, 3}, ranks={1})
        else:
            injector = _Injector(nan_loss={2}, inf_grad={3}, ranks={1})
        with _pytest.MonkeyPatch.context() as monkeypatch:
            injector.install(monkeypatch)
            loop.train(cfg)
        out[name] = (injector.skipped, injector.checksums)
    return out


def test_one_rank_non_finite_makes_every_rank_skip(tmp_path):
    data = str(tmp_path / "data")
    make_corpus(data)
    layouts = [("tp2", {"parallel.tp": 2}),
               ("dp2_zero0", {"parallel.zero_stage": 0, "train.grad_accum": 1}),
               ("dp2_zero1", {"parallel.zero_stage": 1, "train.grad_accum": 1}),
               ("pp2", {"parallel.pp": 2})]
    results = run_distributed(_skip_worker, 2, str(tmp_path), data, layouts, timeout=600)
    for name, _ in layouts:
        (skipped0, sums0), (skipped1, sums1) = results[0][name], results[1][name]
        assert skipped0 == skipped1 == [False, True, True, False], name
        for sums in (sums0, sums1):
            assert sums[1] == sums[0] and sums[2] == sums[1] and sums[3] != sums[2], (name, sums)


# ---------------------------------------------------------------------------------------------------------
# Bounded waits: a stopped rank ends the job, by name


def _start_ranks(world: int, args: list, logs: str, port: int) -> list:
    procs = []
    for rank in range(world):
        env = dict(os.environ, RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                   LOCAL_WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
                   OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", GLOO_SOCKET_IFNAME="lo",
                   PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
        for k in ("SLURM_PROCID", "SLURM_STEP_ID", "OMPI_COMM_WORLD_RANK", "TORCHELASTIC_USE_AGENT_STORE"):
            env.pop(k, None)
        with open(os.path.join(logs, f"rank{rank}.log"), "w") as log:
            procs.append(subprocess.Popen([sys.executable, "-m", "megatron_mtp.train", *args], cwd=REPO, env=env,
                                          stdout=log, stderr=subprocess.STDOUT))
    return procs


def _wait_for(path: str, text: str, procs: list, seconds: float = 180) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if os.path.exists(path) and text in open(path).read():
            return
        if any(p.poll() is not None for p in procs):
            break
        time.sleep(0.1)
    tail = open(path).read()[-3000:] if os.path.exists(path) else ""
    raise AssertionError(f"{text!r} never appeared in {path}:\n{tail}")


@pytest.mark.parametrize("stopped, heartbeat_s, timeout_min", [
    (1, 5, 5),    # the watchdog on rank 0 names rank 1
    (0, 5, 5),    # rank 0 hosts the rendezvous store, which stops with it: rank 1's watchdog names rank 0
    (1, 0, 0.1),  # no watchdog: the collective timeout (6 s) alone bounds the wait
])
def test_a_stopped_rank_ends_the_job_within_the_timeout(tmp_path, stopped, heartbeat_s, timeout_min):
    run, data, logs = str(tmp_path / "run"), str(tmp_path / "data"), str(tmp_path)
    port = free_port()
    args = tiny_overrides(run, data, **{"train.iters": 100000, "parallel.tp": 2, "checkpoint.save": False,
                                        "parallel.heartbeat_timeout_s": heartbeat_s,
                                        "parallel.timeout_minutes": timeout_min})
    procs = _start_ranks(2, args, logs, port)
    survivor = 1 - stopped
    try:
        _wait_for(os.path.join(logs, "rank0.log"), "step     3/", procs)
        os.kill(procs[stopped].pid, signal.SIGSTOP)
        start = time.monotonic()
        rc = procs[survivor].wait(timeout=90)
        elapsed = time.monotonic() - start
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()  # SIGKILL ends a stopped process too, as the launcher would
            p.wait()
    log = open(os.path.join(logs, f"rank{survivor}.log")).read()
    limit = heartbeat_s or timeout_min * 60
    # not before the limit (less the heartbeat interval the last beat may predate the stop by), not long after
    assert limit / 2 < elapsed < limit + 8, (elapsed, log[-2000:])
    if heartbeat_s:
        assert rc == 3, log[-3000:]
        who = f"rank {stopped}"
        lines = [line for line in log.splitlines() if "stopped answering" in line]
        assert len(lines) == 1, log[-3000:]
        assert lines[0].startswith(f"watchdog on rank {survivor}: {who} stopped answering for "), lines[0]
        assert lines[0].endswith("s (parallel.heartbeat_timeout_s is 5); ending the job.")
    else:
        assert rc != 0, log[-3000:]


def test_watchdog_names_the_silent_rank_and_not_one_that_left(capsys):
    """In-process: a store, rank 0's watchdog, rank 1 beating and then leaving normally, rank 2 never heard."""
    from datetime import timedelta

    import torch.distributed as dist

    from megatron_mtp.parallel.watchdog import EXIT_STATUS, Watchdog

    store = dist.TCPStore("127.0.0.1", 0, None, True, timedelta(seconds=10), wait_for_workers=False)
    exits: list = []
    rank1 = Watchdog(1, 3, "127.0.0.1", store.port, 1.0, exit_fn=exits.append).start()
    rank0 = Watchdog(0, 3, "127.0.0.1", store.port, 1.0, exit_fn=exits.append).start()
    time.sleep(0.5)
    rank1.stop()  # left normally: marked done, so nobody reports it
    deadline = time.monotonic() + 10
    while not exits and time.monotonic() < deadline:
        time.sleep(0.05)
    rank0.stop()
    assert exits == [EXIT_STATUS]
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and re.fullmatch(r"watchdog on rank 0: rank 2 stopped answering for \d+ s "
                                            r"\(parallel.heartbeat_timeout_s is 1\); ending the job\.", lines[0])


# ---------------------------------------------------------------------------------------------------------
# One run directory, one trainer


def _acquire_in_subprocess(run_dir: str, then: str = "") -> subprocess.CompletedProcess:
    code = ("import sys\nfrom megatron_mtp.training.run_lock import RunLockError, acquire\n"
            f"try:\n    note = acquire({run_dir!r})\nexcept RunLockError as exc:\n    print(exc)\n    sys.exit(2)\n"
            f"print('acquired', note)\n{then}")
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, env=env)


def test_run_lock_refuses_a_second_holder_and_takes_over_a_dead_ones(tmp_path):
    import socket

    from megatron_mtp.training import run_lock

    run = str(tmp_path / "run")
    assert run_lock.acquire(run) is None
    try:
        assert run_lock.acquire(run) is None  # this process again (an in-process train() that raised): fine
        other = _acquire_in_subprocess(run)
        assert other.returncode == 2
        assert other.stdout.strip().startswith(f"run directory {run} is in use by another trainer (pid {os.getpid()} "
                                               f"on host {socket.gethostname()}, started ")
        assert other.stdout.strip().endswith("); stop that trainer or choose another train.run_dir.")
    finally:
        run_lock.release(run)
    # a holder that is SIGKILLed leaves its record behind; the next one takes over and says from whom
    dead = _acquire_in_subprocess(run, then="import os, signal\nos.kill(os.getpid(), signal.SIGKILL)")
    assert dead.returncode == -signal.SIGKILL and dead.stdout.startswith("acquired None")
    note = run_lock.acquire(run)
    try:
        assert note is not None and note.startswith(f"took over the lock of {run} from a trainer that is gone (pid ")
    finally:
        run_lock.release(run)
    assert _acquire_in_subprocess(run).stdout.startswith("acquired None")  # released cleanly: nothing to take over


def test_second_trainer_on_a_run_dir_is_refused_on_every_rank(tmp_path):
    from megatron_mtp.training import run_lock

    run, data, logs = str(tmp_path / "run"), str(tmp_path / "data"), str(tmp_path)
    args = tiny_overrides(run, data, **{"parallel.tp": 2, "train.iters": 2})
    run_lock.acquire(run)  # this process plays the first trainer
    try:
        procs = _start_ranks(2, args, logs, free_port())
        codes = [p.wait(timeout=120) for p in procs]
    finally:
        run_lock.release(run)
        for p in procs:
            if p.poll() is None:
                p.kill()
    rank0, rank1 = (open(os.path.join(logs, f"rank{r}.log")).read() for r in range(2))
    assert codes == [2, 2], (rank0[-2000:], rank1[-2000:])
    errors = [line for line in rank0.splitlines() if "error" in line]
    assert len(errors) == 1 and errors[0].startswith(
        f"run directory error: run directory {run} is in use by another trainer (pid {os.getpid()} on host "), rank0
    assert "error" not in rank1 and "Traceback" not in rank0 + rank1
    assert sorted(os.listdir(run)) == ["trainer.lock"]  # nothing written
