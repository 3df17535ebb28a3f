"""Rank discovery from torchrun, OpenMPI and Slurm variables; host lists; launch errors."""
import multiprocessing as mp
import os
import socket

import pytest

from megatron_mtp.parallel import distributed as D
from megatron_mtp.parallel.distributed import (
    LaunchError,
    discover_launch_env,
    expand_hostlist,
    expand_tasks_per_node,
)

# What each launcher really exports (trimmed to what discovery reads, plus some noise it must ignore).
TORCHRUN = {
    "RANK": "5", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "4",
    "MASTER_ADDR": "node001", "MASTER_PORT": "29500", "GROUP_RANK": "1",
}
SLURM_STEP = {  # rank 5 of `srun --ntasks-per-node=4` on 2 nodes (second node)
    "SLURM_JOB_ID": "123456", "SLURM_STEP_ID": "0", "SLURM_PROCID": "5", "SLURM_NTASKS": "8",
    "SLURM_LOCALID": "1", "SLURM_NODEID": "1", "SLURM_TASKS_PER_NODE": "4(x2)",
    "SLURM_STEP_TASKS_PER_NODE": "4(x2)", "SLURM_JOB_NODELIST": "gpu[007-008]",
    "SLURM_STEP_NODELIST": "gpu[007-008]", "SLURM_NODELIST": "gpu[007-008]",
}
OPENMPI = {
    "OMPI_COMM_WORLD_RANK": "3", "OMPI_COMM_WORLD_SIZE": "4", "OMPI_COMM_WORLD_LOCAL_RANK": "1",
    "OMPI_COMM_WORLD_LOCAL_SIZE": "2",
}


def fields(env):
    return (env.rank, env.world_size, env.local_rank, env.local_world_size, env.master_addr, env.master_port,
            env.launcher)


# ---------------------------------------------------------------------------------------------- hostlists

@pytest.mark.parametrize("hostlist, hosts", [
    ("localhost", ["localhost"]),
    ("node[001-004,007],gpu12", ["node001", "node002", "node003", "node004", "node007", "gpu12"]),
    ("gpu[8-10]", ["gpu8", "gpu9", "gpu10"]),
    ("a[09-11]", ["a09", "a10", "a11"]),
    ("rack[1-2]-n[1,3]", ["rack1-n1", "rack1-n3", "rack2-n1", "rack2-n3"]),
    ("x1,x2,y[3]", ["x1", "x2", "y3"]),
    ("node-a.cluster.org,node[1-2].ib", ["node-a.cluster.org", "node1.ib", "node2.ib"]),
])
def test_expand_hostlist(hostlist, hosts):
    assert expand_hostlist(hostlist) == hosts


@pytest.mark.parametrize("bad", ["node[1-2", "node1-2]", "node[a-b]", "node[5-3]", "n[1-2]]"])
def test_expand_hostlist_rejects(bad):
    with pytest.raises(ValueError):
        expand_hostlist(bad)


def test_expand_tasks_per_node():
    assert expand_tasks_per_node("2(x3),1") == [2, 2, 2, 1]
    assert expand_tasks_per_node("8") == [8]
    with pytest.raises(ValueError):
        expand_tasks_per_node("2(3)")


# ---------------------------------------------------------------------------------------------- launchers

def test_single_process():
    env = discover_launch_env({})
    assert (env.rank, env.world_size, env.local_rank, env.local_world_size, env.launcher) == (0, 1, 0, 1, "single")
    assert env.master_addr == "127.0.0.1" and 0 < env.master_port < 65536


def test_torchrun():
    assert fields(discover_launch_env(TORCHRUN)) == (5, 8, 1, 4, "node001", 29500, "torchrun")


def test_torchrun_wins_over_slurm_and_openmpi():
    # torchrun under srun, or under mpirun: the worker's own variables are torchrun's.
    env = discover_launch_env({**SLURM_STEP, **OPENMPI, **TORCHRUN})
    assert env.launcher == "torchrun" and env.rank == 5


def test_slurm():
    assert fields(discover_launch_env(SLURM_STEP)) == (5, 8, 1, 4, "gpu007", 10000 + 123456 % 20000, "slurm")


def test_slurm_uneven_nodes_and_overrides():
    environ = {**SLURM_STEP, "SLURM_NTASKS": "7", "SLURM_PROCID": "6", "SLURM_LOCALID": "2", "SLURM_NODEID": "2",
               "SLURM_STEP_TASKS_PER_NODE": "2(x2),3", "SLURM_STEP_NODELIST": "n[1-3]",
               "MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "23456"}
    assert fields(discover_launch_env(environ)) == (6, 7, 2, 3, "10.0.0.1", 23456, "slurm")


def test_slurm_batch_shell_is_single_process():
    # The batch script itself has SLURM_PROCID=0 and SLURM_NTASKS=N but no step: not rank 0 of N.
    environ = {k: v for k, v in SLURM_STEP.items() if not k.startswith("SLURM_STEP")}
    assert discover_launch_env(environ).launcher == "single"


def test_slurm_port_is_shared_and_in_range():
    ports = {discover_launch_env({**SLURM_STEP, "SLURM_PROCID": str(r)}).master_port for r in range(8)}
    assert len(ports) == 1 and D.SLURM_PORT_BASE <= ports.pop() < D.SLURM_PORT_BASE + D.SLURM_PORT_SPAN


def test_openmpi_broadcast(monkeypatch):
    calls = []
    monkeypatch.setattr(D, "_mpi_rendezvous", lambda rank: calls.append(rank) or ("host0", 41000))
    assert fields(discover_launch_env(OPENMPI)) == (3, 4, 1, 2, "host0", 41000, "openmpi")
    assert calls == [3]


def test_openmpi_env_override_skips_mpi(monkeypatch):
    monkeypatch.setattr(D, "_mpi_rendezvous", lambda rank: pytest.fail("mpi4py must not be used"))
    environ = {**OPENMPI, "MASTER_ADDR": "head", "MASTER_PORT": "31000"}
    assert fields(discover_launch_env(environ)) == (3, 4, 1, 2, "head", 31000, "openmpi")


def test_openmpi_wins_over_enclosing_slurm_job(monkeypatch):
    # mpirun inside sbatch: every rank inherits the job's SLURM_* (PROCID=0); the OMPI ranks are right.
    monkeypatch.setattr(D, "_mpi_rendezvous", lambda rank: ("host0", 41000))
    assert discover_launch_env({**SLURM_STEP, **OPENMPI}).rank == 3


# ---------------------------------------------------------------------------------------------- errors

@pytest.mark.parametrize("environ, variable", [
    ({**TORCHRUN, "RANK": "8"}, "RANK"),
    ({**TORCHRUN, "RANK": "-1"}, "RANK"),
    ({**TORCHRUN, "RANK": "one"}, "RANK"),
    ({**TORCHRUN, "WORLD_SIZE": "0"}, "WORLD_SIZE"),
    ({k: v for k, v in TORCHRUN.items() if k != "WORLD_SIZE"}, "WORLD_SIZE"),
    ({**TORCHRUN, "LOCAL_RANK": "4"}, "LOCAL_RANK"),
    ({**TORCHRUN, "LOCAL_WORLD_SIZE": "9"}, "LOCAL_WORLD_SIZE"),
    ({k: v for k, v in TORCHRUN.items() if k != "MASTER_ADDR"}, "MASTER_ADDR"),
    ({**TORCHRUN, "MASTER_PORT": "70000"}, "MASTER_PORT"),
    ({**SLURM_STEP, "SLURM_PROCID": "8"}, "SLURM_PROCID"),
    ({**SLURM_STEP, "SLURM_NTASKS": "x"}, "SLURM_NTASKS"),
    ({**SLURM_STEP, "SLURM_LOCALID": "4"}, "SLURM_LOCALID"),
    ({k: v for k, v in SLURM_STEP.items() if "NODELIST" not in k}, "SLURM_JOB_NODELIST"),
    ({**SLURM_STEP, "SLURM_STEP_NODELIST": "gpu[1-"}, "SLURM_STEP_NODELIST"),
    ({**SLURM_STEP, "SLURM_NODEID": "2"}, "SLURM_NODEID"),
    ({**OPENMPI, "OMPI_COMM_WORLD_RANK": "4"}, "OMPI_COMM_WORLD_RANK"),
    ({**OPENMPI, "OMPI_COMM_WORLD_LOCAL_RANK": "2"}, "OMPI_COMM_WORLD_LOCAL_RANK"),
])
def test_inconsistent_sets_name_the_variable(environ, variable, monkeypatch):
    monkeypatch.setattr(D, "_mpi_rendezvous", lambda rank: pytest.fail("must fail before any rendezvous"))
    monkeypatch.setattr(D.shutil, "which", lambda name: None)  # no scontrol fallback in this test
    with pytest.raises(LaunchError) as info:
        discover_launch_env(environ)
    message = str(info.value)
    assert isinstance(info.value, RuntimeError)
    assert variable in message and message.count(".") >= 1 and "\n" not in message


# ---------------------------------------------------------------------------------------------- init

def test_init_distributed_single_process(monkeypatch):
    for name in list(os.environ):
        if name.startswith(("SLURM_", "OMPI_")) or name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT"):
            monkeypatch.delenv(name)
    D.destroy_distributed()  # in-process training tests earlier in the session may have cached their launch
    env = D.init_distributed()
    try:
        import torch.distributed as dist
        assert env.world_size == 1 and not dist.is_initialized()
        assert os.environ["RANK"] == "0" and os.environ["WORLD_SIZE"] == "1"
        assert D.init_distributed() is env  # idempotent
    finally:
        D.destroy_distributed()
        for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
            monkeypatch.delenv(name, raising=False)


def _worker(rank, port, queue):
    os.environ.update(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE="2",
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    import torch
    import torch.distributed as dist
    env = D.init_distributed(timeout_s=60)
    assert D.init_distributed() is env
    t = torch.tensor([float(rank + 1)])
    dist.all_reduce(t)
    queue.put((env.rank, dist.get_backend(), t.item()))
    D.destroy_distributed()


def test_init_distributed_two_processes_gloo():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_worker, args=(r, port, queue)) for r in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
    assert [p.exitcode for p in procs] == [0, 0]
    assert sorted(queue.get(timeout=5) for _ in procs) == [(0, "gloo", 3.0), (1, "gloo", 3.0)]
