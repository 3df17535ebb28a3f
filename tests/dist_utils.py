"""Run a function on N local processes joined in a gloo process group (CPU distributed tests).

    from dist_utils import run_distributed

    def _worker(rank, world_size, n):       # module level: spawned children import it by name
        ...                                  # torch.distributed is initialised (gloo), default group = all ranks
        return something_picklable           # optional

    results = run_distributed(_worker, 2, 7)   # -> [rank 0's return value, rank 1's, ...]

Robustness: a free loopback port per attempt (retried if another process grabs it first), a process-group and
an overall timeout (``timeout=`` or MTP_DIST_TEST_TIMEOUT seconds, default 300) after which every child is
killed, and a child's exception re-raised in the parent with the child's traceback (the other children are
terminated at once instead of hanging in a collective).
"""
from __future__ import annotations

import os
import socket
import sys
import time
import traceback
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

__all__ = ["run_distributed", "free_port", "DistributedTestError"]

_DEFAULT_TIMEOUT_S = float(os.environ.get("MTP_DIST_TEST_TIMEOUT", "300"))
_PORT_ERRORS = ("EADDRINUSE", "Address already in use", "address already in use")


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _child(rank, fn, world_size, port, backend, timeout_s, results, args):
    # 2 shared cores: one intra-op thread per rank unless the worker asks for more.
    torch.set_num_threads(1)
    if sys.platform.startswith("linux"):
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")  # hostnames may not resolve in sandboxes
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size,
                            timeout=timedelta(seconds=timeout_s))
    try:
        out = fn(rank, world_size, *args)
        results.put(("ok", rank, out))
    except BaseException:
        # Timestamped, so that the parent can report the first failure (the cause) rather than a peer's
        # "connection closed" that followed it.
        results.put(("error", rank, (time.time(), traceback.format_exc())))
        raise
    finally:
        dist.destroy_process_group()


def _drain(queue, results: dict, errors: dict) -> None:
    while not queue.empty():
        kind, rank, value = queue.get()
        (results if kind == "ok" else errors)[rank] = value


class DistributedTestError(RuntimeError):
    """A spawned rank raised; the message holds the first failing rank's traceback."""


def run_distributed(fn, world_size: int, *args, timeout: float | None = None, backend: str = "gloo",
                    attempts: int = 3) -> list:
    """Run ``fn(rank, world_size, *args)`` on ``world_size`` spawned processes; return their results by rank.

    Raises ``DistributedTestError`` carrying the traceback of the first rank that failed (chained to
    ``torch.multiprocessing.ProcessRaisedException``), or ``TimeoutError`` naming the ranks still running.
    """
    timeout_s = _DEFAULT_TIMEOUT_S if timeout is None else float(timeout)
    for attempt in range(attempts):
        results: dict = {}
        errors: dict = {}
        queue = mp.get_context("spawn").SimpleQueue()
        context = mp.spawn(_child, args=(fn, world_size, free_port(), backend, timeout_s, queue, args),
                           nprocs=world_size, join=False)
        deadline = time.monotonic() + timeout_s
        try:
            while not context.join(timeout=0.2):
                _drain(queue, results, errors)  # children block on a full pipe if results are large
                if time.monotonic() > deadline:
                    alive = [rank for rank, p in enumerate(context.processes) if p.is_alive()]
                    raise TimeoutError(f"run_distributed({getattr(fn, '__name__', fn)}, {world_size}): ranks "
                                       f"{alive} still running after {timeout_s:.0f} s; killed")
        except mp.ProcessRaisedException as exc:
            if attempt + 1 < attempts and any(marker in str(exc) for marker in _PORT_ERRORS):
                continue  # the port was taken between free_port() and the store's bind: try another
            time.sleep(0.5)  # let the failing ranks finish reporting
            _drain(queue, results, errors)
            if not errors:
                raise
            first = min(errors, key=lambda rank: errors[rank][0])
            others = sorted(set(errors) - {first})
            raise DistributedTestError(
                f"rank {first} of {world_size} failed first" + (f" (then ranks {others})" if others else "")
                + f":\n{errors[first][1]}") from exc
        finally:
            for process in context.processes:
                if process.is_alive():
                    process.kill()
                process.join(timeout=5)
        _drain(queue, results, errors)
        return [results.get(rank) for rank in range(world_size)]
    raise RuntimeError("run_distributed: no free port found")  # pragma: no cover - loop always returns or raises
