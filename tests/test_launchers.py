"""The launch scripts, for real: 2-process CPU (gloo) training runs of the tiny model.

- Slurm (launch_scripts/pretrain.sbatch: srun + torchrun; pretrain_srun_direct.sbatch: srun alone), submitted
  with ``sbatch --wait`` to a running cluster: start the local one with ``bash .ci/local_slurm.sh start``.
- OpenMPI (launch_scripts/pretrain_mpirun.sh): needs ``mpirun`` from Open MPI and a working mpi4py.
- torchrun (launch_scripts/pretrain_torchrun.sh): needs only torch.

Each good run must print ``rank R/2`` on both ranks, reach the last step, and write a metrics.jsonl whose
loss falls; each bad config must end with the ``config error:`` sentence and a non-zero exit status.
"""
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = REPO / "launch_scripts"
ITERS = 12
TIMEOUT_S = 300  # a hung rendezvous fails the test instead of hanging CI

# Variables a surrounding launcher may have left in this process; the jobs must find only their own.
_INHERITED = ("SLURM_", "SBATCH_", "SRUN_", "OMPI_", "PMIX_", "TORCHELASTIC_")
_LAUNCH_VARS = {"RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
                "GROUP_RANK", "ROLE_RANK"}
# The cluster .ci/local_slurm.sh starts; its clients find it through /etc/slurm unless a real config is there.
LOCAL_SLURM_CONF = Path(os.environ.get("MTP_SLURM_DIR", "/tmp/mtp-local-slurm")) / "slurm.conf"


def _env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items()
           if k == "SLURM_CONF" or not (k.startswith(_INHERITED) or k in _LAUNCH_VARS)}
    if "SLURM_CONF" not in env and LOCAL_SLURM_CONF.exists():
        env["SLURM_CONF"] = str(LOCAL_SLURM_CONF)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p)
    env.update(CONFIG="configs/tiny.yaml", PYTHON=sys.executable, OMP_NUM_THREADS="1", **extra)
    return env


def _slurm_up() -> bool:
    if not (shutil.which("sbatch") and shutil.which("sinfo")):
        return False
    if "SLURM_CONF" not in _env() and not Path("/etc/slurm/slurm.conf").exists():
        return False  # sinfo would retry for a minute looking for a config
    try:
        out = subprocess.run(["sinfo", "-h", "-o", "%t"], env=_env(), capture_output=True, text=True, timeout=20)
    except (subprocess.SubprocessError, OSError):
        return False
    states = out.stdout.split()
    return out.returncode == 0 and any(s in ("idle", "mix", "alloc", "comp") for s in states)


def _openmpi_ready() -> bool:
    if not shutil.which("mpirun"):
        return False
    try:
        version = subprocess.run(["mpirun", "--version"], capture_output=True, text=True, timeout=20).stdout
        # In a child: importing mpi4py.MPI initialises MPI, which must not happen inside pytest.
        mpi4py_ok = subprocess.run([sys.executable, "-c", "from mpi4py import MPI"], capture_output=True,
                                   timeout=60).returncode == 0
    except (subprocess.SubprocessError, OSError):
        return False
    return "Open MPI" in version and mpi4py_ok


needs_slurm = pytest.mark.skipif(not _slurm_up(), reason="no Slurm cluster up: bash .ci/local_slurm.sh start")
needs_openmpi = pytest.mark.skipif(not _openmpi_ready(), reason="needs Open MPI's mpirun and mpi4py")


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    """One data cache for every run here: the default corpus is tokenised once, by the first run."""
    return tmp_path_factory.mktemp("data_cache")


def _train_args(run_dir: Path, cache_dir: Path, iters: int = ITERS, save: bool = False) -> list:
    # Small batches and a short warm-up: 12 steps visibly lower the loss in seconds on two busy cores.
    # No TensorBoard, plot or final checkpoint, to keep it quick.
    return ["--train.iters", str(iters), "--train.run_dir", str(run_dir), "--data.cache_dir", str(cache_dir),
            "--train.micro_batch_size", "2", "--train.grad_accum", "1", "--logging.interval", "4",
            "--optimizer.warmup_iters", "2", "--logging.tensorboard", "false",
            "--logging.plot", "false", "--checkpoint.save", str(save).lower()]


def _assert_trained(log: str, run_dir: Path, launcher: str, iters: int = ITERS) -> None:
    for rank in range(2):
        assert f"rank {rank}/2 (launcher {launcher})" in log, log[-3000:]
    assert re.search(rf"step\s+{iters}/{iters} \| loss", log), log[-3000:]
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert records[-1]["step"] == iters
    assert records[-1]["loss"] < records[0]["loss"], records


def _assert_config_error(log: str, returncode: int) -> None:
    assert returncode != 0
    assert "config error: model.num_layers must be positive" in log, log[-3000:]
    # One sentence from our code, no stack frame of it (torchrun may still print its own ChildFailedError).
    assert not re.search(r'File ".*megatron_mtp/', log), log[-3000:]


BAD_CONFIG = ["--model.num_layers", "0"]


# ---------------------------------------------------------------------------------------------- Slurm

def _sbatch_cmd(script: str, tmp_path: Path, args: list, flags: list = ()) -> list:
    """``sbatch --wait`` of a launch script on one CPU node; the job's log is tmp_path/job.out and its name
    is unique, so a job left behind by a timed-out test can be cancelled by name."""
    return ["sbatch", "--wait", f"--job-name=mtp-test-{tmp_path.name}", f"--output={tmp_path / 'job.out'}",
            "--nodes=1", "--gpus-per-node=0", "--time=10", *flags, str(SCRIPTS / script), *args]


def _sbatch(script: str, tmp_path: Path, args: list, flags: list = (), env: dict = None) -> tuple:
    """Submit and wait; returns (sbatch's exit status, the job's log)."""
    try:
        proc = subprocess.run(_sbatch_cmd(script, tmp_path, args, flags), cwd=REPO, env=env or _env(),
                              capture_output=True, text=True, timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        subprocess.run(["scancel", f"--name=mtp-test-{tmp_path.name}"], env=_env())
        raise
    log = tmp_path / "job.out"
    return proc.returncode, (log.read_text() if log.exists() else "") + proc.stderr


@needs_slurm
def test_slurm_bad_config_fails(tmp_path, cache_dir):
    args = _train_args(tmp_path / "run", cache_dir) + BAD_CONFIG
    rc, log = _sbatch("pretrain.sbatch", tmp_path, args, env=_env(NPROC_PER_NODE="2"))
    _assert_config_error(log, rc)


@needs_slurm
def test_slurm_srun_direct_trains(tmp_path, cache_dir):
    # No torchrun: ranks, local ranks and the rendezvous come from Slurm's variables via our discovery.
    run_dir = tmp_path / "run"
    rc, log = _sbatch("pretrain_srun_direct.sbatch", tmp_path, _train_args(run_dir, cache_dir),
                      flags=["--ntasks-per-node=2"])
    assert rc == 0, log[-3000:]
    _assert_trained(log, run_dir, "slurm")


@needs_slurm
def test_slurm_torchrun_trains_through_preemption(tmp_path, cache_dir):
    """pretrain.sbatch trains on 2 workers; midway, USR1 to the batch shell (what --signal=B:USR1@120 sends
    before the time limit) -> the workers checkpoint and exit -> the job is requeued -> the second run
    resumes from that checkpoint and finishes, and ``sbatch --wait`` sees exit status 0.
    (One job for both the plain run and pre-emption: each Slurm run costs ~20 s of start-up on 2 cores.)"""
    run_dir, log = tmp_path / "run", tmp_path / "job.out"
    iters = 32  # enough steps after the signal at step 4 that training cannot finish before it lands
    cmd = _sbatch_cmd("pretrain.sbatch", tmp_path, _train_args(run_dir, cache_dir, iters=iters, save=True))
    proc = subprocess.Popen(cmd, cwd=REPO, env=_env(NPROC_PER_NODE="2"), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        job_id = proc.stdout.readline().split()[-1]  # "Submitted batch job N"
        deadline = time.monotonic() + TIMEOUT_S
        while not (log.exists() and re.search(r"step\s+4/", log.read_text())):  # training is under way
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text() if log.exists() else ""
            time.sleep(0.5)
        subprocess.run(["scancel", "--batch", "--signal=USR1", job_id], env=_env(), check=True)
        # A requeued job waits ~2 minutes (the credential lifetime) before it is eligible again; let it start
        # now, but not within the second of the requeue: slurmd refuses a job credential made in the same
        # second as the revocation of the old one ("Job credential revoked") and the job fails.
        while "JobState=PENDING" not in subprocess.run(["scontrol", "show", "job", job_id], env=_env(),
                                                       capture_output=True, text=True).stdout:
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.5)
        time.sleep(2)
        subprocess.run(["scontrol", "update", f"jobid={job_id}", "StartTime=now"], env=_env(), check=True)
        proc.wait(timeout=max(1, deadline - time.monotonic()))
    finally:
        if proc.poll() is None:
            subprocess.run(["scancel", job_id], env=_env())
            proc.kill()
    text = log.read_text()
    assert proc.returncode == 0, text[-3000:] + proc.stderr.read()
    assert "1 node(s) x 2 worker(s)" in text
    assert "USR1 received, forwarding to the training step and requeueing" in text
    stopped = re.search(r"stop signal received: saving a checkpoint at step (\d+)", text)
    assert stopped, text[-3000:]
    resumed = re.search(r"resumed from \S+ at step (\d+)", text)
    assert resumed and resumed.group(1) == stopped.group(1), text[-3000:]
    assert text.count("rank 0/2 (launcher torchrun)") == 2  # two runs of the same job
    _assert_trained(text, run_dir, "torchrun", iters=iters)


# ---------------------------------------------------------------------------------------------- mpirun

def _mpirun(tmp_path: Path, args: list) -> tuple:
    proc = subprocess.run(["bash", str(SCRIPTS / "pretrain_mpirun.sh"), *args], cwd=REPO,
                          env=_env(NP="2", OVERSUBSCRIBE="1"), capture_output=True, text=True, timeout=TIMEOUT_S)
    return proc.returncode, proc.stdout + proc.stderr


@needs_openmpi
def test_mpirun_trains(tmp_path, cache_dir):
    run_dir = tmp_path / "run"
    rc, log = _mpirun(tmp_path, _train_args(run_dir, cache_dir))
    assert rc == 0, log[-3000:]
    _assert_trained(log, run_dir, "openmpi")


@needs_openmpi
def test_mpirun_bad_config_fails(tmp_path, cache_dir):
    rc, log = _mpirun(tmp_path, _train_args(tmp_path / "run", cache_dir) + BAD_CONFIG)
    _assert_config_error(log, rc)


# ---------------------------------------------------------------------------------------------- torchrun

def test_torchrun_trains(tmp_path, cache_dir):
    run_dir = tmp_path / "run"
    proc = subprocess.run(["bash", str(SCRIPTS / "pretrain_torchrun.sh"), *_train_args(run_dir, cache_dir)],
                          cwd=REPO, env=_env(NPROC_PER_NODE="2"), capture_output=True, text=True,
                          timeout=TIMEOUT_S)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-3000:]
    _assert_trained(log, run_dir, "torchrun")
