"""Rank discovery and ``torch.distributed`` start-up for every launcher we support.

One process learns its place in the job from the environment its launcher left it, in this order:

1. **torchrun** (also ``torch.distributed.launch``, DeepSpeed's launcher, or hand-set variables):
   RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE, MASTER_ADDR, MASTER_PORT.
2. **OpenMPI** ``mpirun``: OMPI_COMM_WORLD_RANK / _SIZE / _LOCAL_RANK / _LOCAL_SIZE; rank 0 picks the
   rendezvous address and a free port and broadcasts them through mpi4py (MASTER_ADDR / MASTER_PORT
   override). It comes before Slurm because ``mpirun`` inside a Slurm job leaves the job's SLURM_*
   variables in every process, and those describe the enclosing job, not the MPI ranks.
3. **Slurm** ``srun`` (one task per GPU): SLURM_PROCID, SLURM_NTASKS, SLURM_LOCALID, tasks per node;
   the rendezvous host is the first node of the step's node list, the port MASTER_PORT or one derived
   from SLURM_JOB_ID. Only processes srun started count (SLURM_STEP_ID set): the batch shell also has
   SLURM_PROCID=0 and SLURM_NTASKS=N, and a tool run there is a single process, not rank 0 of N.
4. Otherwise a single process: rank 0 of 1.

A set of variables that cannot describe a real job raises :class:`LaunchError`, one sentence naming the
variable to fix, before any process blocks in a rendezvous that would never complete.
"""
from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
from dataclasses import dataclass
from datetime import timedelta
from typing import List, Mapping, Optional

from megatron_mtp.errors import LaunchError

# Slurm jobs without MASTER_PORT get a port from their job id, so every task of the job computes the
# same one without talking. The range sits below Linux's ephemeral ports (32768-60999), where the
# kernel hands out outgoing connections, and above the well-known ones.
SLURM_PORT_BASE = 10000
SLURM_PORT_SPAN = 20000


@dataclass
class LaunchEnv:
    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    master_addr: str
    master_port: int
    launcher: str  # "torchrun", "openmpi", "slurm", "single"; "external" if someone else initialised torch.distributed


# --------------------------------------------------------------------------------------------------
# Slurm host lists
# --------------------------------------------------------------------------------------------------

def _split_top_level(text: str) -> List[str]:
    """Split on commas that are not inside brackets: 'a[1,2],b' -> ['a[1,2]', 'b']."""
    parts, depth, start = [], 0, 0
    for i, ch in enumerate(text):
        if ch == "[":
            depth += 1
        elif ch == "]":
            depth -= 1
            if depth < 0:
                raise ValueError(f"unbalanced ']' in host list {text!r}")
        elif ch == "," and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    if depth != 0:
        raise ValueError(f"unbalanced '[' in host list {text!r}")
    parts.append(text[start:])
    return [p for p in parts if p]


def _expand_range(spec: str) -> List[str]:
    """'001-003,7' -> ['001', '002', '003', '7']; zero padding follows the lower bound's width."""
    out = []
    for item in spec.split(","):
        m = re.fullmatch(r"(\d+)(?:-(\d+))?", item.strip())
        if not m:
            raise ValueError(f"bad range {item!r} in host list")
        lo, hi = m.group(1), m.group(2) or m.group(1)
        if int(hi) < int(lo):
            raise ValueError(f"descending range {item!r} in host list")
        out.extend(str(n).zfill(len(lo)) for n in range(int(lo), int(hi) + 1))
    return out


def _expand_host(pattern: str) -> List[str]:
    """One host pattern, possibly with several bracket groups: 'r[1-2]n[1-2]' -> r1n1, r1n2, r2n1, r2n2."""
    m = re.search(r"\[([^\[\]]*)\]", pattern)
    if not m:
        if "[" in pattern or "]" in pattern:
            raise ValueError(f"unbalanced brackets in host {pattern!r}")
        return [pattern]
    head, tail = pattern[: m.start()], pattern[m.end():]
    return [head + n + rest for n in _expand_range(m.group(1)) for rest in _expand_host(tail)]


def expand_hostlist(hostlist: str) -> List[str]:
    """Expand a Slurm host list such as ``node[001-004,007],gpu12`` into host names, in order.

    Pure Python, so no Slurm client is needed on the compute node; raises ValueError on a form it does
    not understand (see :func:`slurm_hosts` for the ``scontrol`` fallback).
    """
    hosts = []
    for part in _split_top_level(hostlist.strip()):
        hosts.extend(_expand_host(part))
    return hosts


def slurm_hosts(hostlist: str) -> List[str]:
    """Hosts of a Slurm node list: our expander first, ``scontrol show hostnames`` for anything exotic."""
    try:
        return expand_hostlist(hostlist)
    except ValueError:
        if shutil.which("scontrol") is None:
            raise
        out = subprocess.run(
            ["scontrol", "show", "hostnames", hostlist], capture_output=True, text=True, check=True
        )
        return out.stdout.split()


def expand_tasks_per_node(spec: str) -> List[int]:
    """Slurm's compressed per-node task counts: '2(x3),1' -> [2, 2, 2, 1]."""
    counts = []
    for item in spec.split(","):
        m = re.fullmatch(r"(\d+)(?:\(x(\d+)\))?", item.strip())
        if not m:
            raise ValueError(f"bad tasks-per-node entry {item!r}")
        counts.extend([int(m.group(1))] * int(m.group(2) or 1))
    return counts


# --------------------------------------------------------------------------------------------------
# Discovery
# --------------------------------------------------------------------------------------------------

def _int(environ: Mapping[str, str], name: str, default: Optional[int] = None) -> int:
    """An integer variable, or LaunchError naming it."""
    raw = environ.get(name)
    if raw is None or raw.strip() == "":
        if default is None:
            raise LaunchError(f"{name} is not set: the launcher must export it, or set it yourself.")
        return default
    try:
        return int(raw)
    except ValueError:
        raise LaunchError(f"{name}={raw!r} is not an integer: fix {name}.") from None


def _free_port() -> int:
    """A TCP port free right now (the kernel picks it); the rendezvous binds it moments later."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def _port(environ: Mapping[str, str], name: str = "MASTER_PORT") -> int:
    port = _int(environ, name)
    if not 0 < port < 65536:
        raise LaunchError(f"{name}={port} is not a TCP port (1-65535): fix {name}.")
    return port


def _check(env: LaunchEnv, names: tuple) -> LaunchEnv:
    """Reject sets of numbers no real job has; ``names`` are the variables behind each field."""
    rank_var, world_var, local_var, local_world_var = names
    if env.world_size < 1:
        raise LaunchError(f"{world_var}={env.world_size} must be at least 1: fix {world_var}.")
    if not 0 <= env.rank < env.world_size:
        raise LaunchError(
            f"{rank_var}={env.rank} is outside 0..{env.world_size - 1} for {world_var}={env.world_size}: "
            f"fix {rank_var} or {world_var}."
        )
    if env.local_world_size < 1 or env.local_world_size > env.world_size:
        raise LaunchError(
            f"{local_world_var}={env.local_world_size} must be between 1 and {world_var}={env.world_size}: "
            f"fix {local_world_var}."
        )
    if not 0 <= env.local_rank < env.local_world_size:
        raise LaunchError(
            f"{local_var}={env.local_rank} is outside 0..{env.local_world_size - 1} for "
            f"{local_world_var}={env.local_world_size}: fix {local_var} or {local_world_var}."
        )
    return env


def _from_torchrun(environ: Mapping[str, str]) -> LaunchEnv:
    world = _int(environ, "WORLD_SIZE")
    rank = _int(environ, "RANK")
    if world > 1 and not environ.get("MASTER_ADDR"):
        raise LaunchError("MASTER_ADDR is not set: torchrun sets it; when setting RANK by hand, set it too.")
    if world > 1 and not environ.get("MASTER_PORT"):
        raise LaunchError("MASTER_PORT is not set: torchrun sets it; when setting RANK by hand, set it too.")
    env = LaunchEnv(
        rank=rank,
        world_size=world,
        local_rank=_int(environ, "LOCAL_RANK", 0),
        # Older launchers (torch.distributed.launch, hand-written scripts) leave LOCAL_WORLD_SIZE out;
        # assume one node, which only matters for reporting.
        local_world_size=_int(environ, "LOCAL_WORLD_SIZE", world),
        master_addr=environ.get("MASTER_ADDR", "127.0.0.1"),
        master_port=_port(environ) if environ.get("MASTER_PORT") else _free_port(),
        launcher="torchrun",
    )
    return _check(env, ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE"))


def _mpi_rendezvous(rank: int) -> tuple:
    """Rank 0's host name and a free port on it, broadcast to every rank through mpi4py."""
    try:
        from mpi4py import MPI
    except Exception as exc:  # ImportError, or the wheel cannot find libmpi
        raise LaunchError(
            "OMPI_COMM_WORLD_RANK is set but mpi4py cannot be loaded "
            f"({exc.__class__.__name__}): install mpi4py and OpenMPI, or set MASTER_ADDR and MASTER_PORT."
        ) from None
    # The host name, not an address: peers resolve it through DNS to the routable interface, where
    # rank 0 resolving its own name may give a loopback alias (Debian's 127.0.1.1).
    payload = (socket.gethostname(), _free_port()) if rank == 0 else None
    return MPI.COMM_WORLD.bcast(payload, root=0)


def _from_openmpi(environ: Mapping[str, str]) -> LaunchEnv:
    world = _int(environ, "OMPI_COMM_WORLD_SIZE")
    rank = _int(environ, "OMPI_COMM_WORLD_RANK")
    local_world = _int(environ, "OMPI_COMM_WORLD_LOCAL_SIZE", 1)
    local_rank = _int(environ, "OMPI_COMM_WORLD_LOCAL_RANK", 0)
    names = ("OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_LOCAL_RANK",
             "OMPI_COMM_WORLD_LOCAL_SIZE")
    # Validate before the broadcast: a wrong set would otherwise hang in MPI instead of failing here.
    _check(LaunchEnv(rank, world, local_rank, local_world, "-", 0, "openmpi"), names)
    addr = environ.get("MASTER_ADDR")
    port = _port(environ) if environ.get("MASTER_PORT") else None
    if world == 1:
        addr, port = addr or "127.0.0.1", port or _free_port()
    elif not (addr and port):
        # Collective: every rank gets here, since mpirun -x gives all ranks the same variables.
        mpi_addr, mpi_port = _mpi_rendezvous(rank)
        addr, port = addr or mpi_addr, port or mpi_port
    return LaunchEnv(rank, world, local_rank, local_world, addr, port, "openmpi")


def _from_slurm(environ: Mapping[str, str]) -> LaunchEnv:
    world = _int(environ, "SLURM_NTASKS")
    rank = _int(environ, "SLURM_PROCID")
    local_rank = _int(environ, "SLURM_LOCALID", 0)

    # Tasks on this node: the step's layout is exact (uneven nodes too); --ntasks-per-node is the
    # user's request and may be inherited from the batch job, so it comes last.
    local_world, local_world_var = None, "SLURM_NTASKS_PER_NODE"
    for name in ("SLURM_STEP_TASKS_PER_NODE", "SLURM_TASKS_PER_NODE"):
        if environ.get(name):
            try:
                counts = expand_tasks_per_node(environ[name])
            except ValueError:
                raise LaunchError(f"{name}={environ[name]!r} is not a Slurm task layout: fix {name}.") from None
            node = _int(environ, "SLURM_NODEID", 0)
            if not 0 <= node < len(counts):
                raise LaunchError(
                    f"SLURM_NODEID={node} is outside the {len(counts)} nodes of {name}: fix SLURM_NODEID."
                )
            local_world, local_world_var = counts[node], name
            break
    if local_world is None:
        local_world = _int(environ, "SLURM_NTASKS_PER_NODE", world)

    addr = environ.get("MASTER_ADDR")
    if not addr:
        nodelist_var = next(
            (v for v in ("SLURM_STEP_NODELIST", "SLURM_JOB_NODELIST", "SLURM_NODELIST") if environ.get(v)),
            None,
        )
        if nodelist_var is None:
            if world > 1:
                raise LaunchError(
                    "SLURM_JOB_NODELIST is not set: launch with srun inside a job, or set MASTER_ADDR."
                )
            addr = "127.0.0.1"
        else:
            try:
                addr = slurm_hosts(environ[nodelist_var])[0]
            except (ValueError, IndexError, subprocess.CalledProcessError):
                raise LaunchError(
                    f"{nodelist_var}={environ[nodelist_var]!r} is not a Slurm host list: fix it or set MASTER_ADDR."
                ) from None

    if environ.get("MASTER_PORT"):
        port = _port(environ)
    elif environ.get("SLURM_JOB_ID"):
        port = SLURM_PORT_BASE + _int(environ, "SLURM_JOB_ID") % SLURM_PORT_SPAN
    elif world > 1:
        raise LaunchError("SLURM_JOB_ID is not set: set MASTER_PORT to a free port on the first node.")
    else:
        port = _free_port()

    env = LaunchEnv(rank, world, local_rank, local_world, addr, port, "slurm")
    return _check(env, ("SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID", local_world_var))


def discover_launch_env(environ: Mapping[str, str] = os.environ) -> LaunchEnv:
    """Where this process sits in the job, from its launcher's variables (see the module docstring)."""
    if "RANK" in environ or "WORLD_SIZE" in environ:
        return _from_torchrun(environ)
    if "OMPI_COMM_WORLD_RANK" in environ or "OMPI_COMM_WORLD_SIZE" in environ:
        return _from_openmpi(environ)
    if "SLURM_PROCID" in environ and ("SLURM_STEP_ID" in environ or "SLURM_STEPID" in environ):
        return _from_slurm(environ)
    port = _port(environ) if environ.get("MASTER_PORT") else _free_port()
    return LaunchEnv(0, 1, 0, 1, environ.get("MASTER_ADDR") or "127.0.0.1", port, "single")


# --------------------------------------------------------------------------------------------------
# torch.distributed
# --------------------------------------------------------------------------------------------------

_LAUNCH_ENV: Optional[LaunchEnv] = None
_WATCHDOG = None  # parallel.watchdog.Watchdog of this process, while the process group it watches is up
_TIMEOUT: Optional[timedelta] = None  # the collective timeout init_distributed gave the default group

# How long a collective may wait before the job ends (``parallel.timeout_minutes``): minutes, not torch's ten, so a
# wedged job gives its allocation back soon; long enough for a first-time data-index build on rank 0.
DEFAULT_TIMEOUT_S = 300.0


def init_distributed(backend: Optional[str] = None, timeout_s: float = DEFAULT_TIMEOUT_S,
                     heartbeat_timeout_s: float = 0.0) -> LaunchEnv:
    """Discover the launch, export it, pick the device and start the default process group.

    Exports RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE, MASTER_ADDR and MASTER_PORT so DeepSpeed and
    anything else reading torchrun's variables agrees with us whichever launcher started the process.
    The backend is NCCL when CUDA is available, gloo otherwise (``backend`` overrides). The process group
    is created only for more than one process, with ``timeout_s`` as its collective timeout; with
    ``heartbeat_timeout_s`` > 0 a heartbeat watchdog (``parallel/watchdog.py``) ends the job when a rank stops
    answering for that long. Calling it again returns the first answer.
    """
    global _LAUNCH_ENV, _WATCHDOG, _TIMEOUT
    import torch
    import torch.distributed as dist

    if _LAUNCH_ENV is not None and (_LAUNCH_ENV.world_size == 1 or dist.is_initialized()):
        return _LAUNCH_ENV
    if dist.is_available() and dist.is_initialized():
        # Someone else (a test harness, DeepSpeed) started the group: report it, do not restart it.
        _LAUNCH_ENV = LaunchEnv(
            dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0)),
            int(os.environ.get("LOCAL_WORLD_SIZE", 1)), os.environ.get("MASTER_ADDR", ""),
            int(os.environ.get("MASTER_PORT", 0)), "external",
        )
        return _LAUNCH_ENV

    env = discover_launch_env()
    os.environ.update(
        RANK=str(env.rank), WORLD_SIZE=str(env.world_size), LOCAL_RANK=str(env.local_rank),
        LOCAL_WORLD_SIZE=str(env.local_world_size), MASTER_ADDR=env.master_addr,
        MASTER_PORT=str(env.master_port),
    )

    if torch.cuda.is_available():
        count = torch.cuda.device_count()
        # One visible GPU per process (srun --gpus-per-task, CUDA_VISIBLE_DEVICES per rank) means
        # device 0 whatever the local rank; otherwise local rank i drives GPU i.
        if count > 1 and env.local_rank >= count:
            raise LaunchError(
                f"LOCAL_RANK={env.local_rank} but only {count} GPUs are visible on this node: launch at most "
                f"{count} processes per node (NPROC_PER_NODE / --ntasks-per-node)."
            )
        torch.cuda.set_device(env.local_rank if count > 1 else 0)

    if env.world_size > 1:
        backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
        dist.init_process_group(
            backend=backend, init_method="env://", rank=env.rank, world_size=env.world_size,
            timeout=timedelta(seconds=timeout_s),
        )
        _TIMEOUT = timedelta(seconds=timeout_s)
        if heartbeat_timeout_s > 0:
            from megatron_mtp.parallel.watchdog import Watchdog

            # Under torchrun the agent hosts the store (TORCHELASTIC_USE_AGENT_STORE); otherwise rank 0 does.
            on_rank0 = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True"
            _WATCHDOG = Watchdog(env.rank, env.world_size, env.master_addr, env.master_port, heartbeat_timeout_s,
                                 store_on_rank0=on_rank0).start()
    _LAUNCH_ENV = env
    return env


def collective_timeout() -> Optional[timedelta]:
    """The default group's collective timeout, for every group created after it: ``dist.new_group`` does not
    inherit it (a new group gets torch's backend default, 30 minutes for gloo, 10 for NCCL). None when the
    group was started by someone else (then torch's default applies, as for them)."""
    return _TIMEOUT


def destroy_distributed() -> None:
    """Tear down the default process group (if any) so a later init_distributed starts afresh."""
    global _LAUNCH_ENV, _WATCHDOG, _TIMEOUT
    import torch.distributed as dist

    _TIMEOUT = None
    if _WATCHDOG is not None:  # first: a rank leaving normally is not a rank that stopped answering
        _WATCHDOG.stop()
        _WATCHDOG = None
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
    _LAUNCH_ENV = None
