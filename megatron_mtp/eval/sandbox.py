"""Running untrusted generated programs: a separate process each, never the evaluating one.

Every program runs in its own ``python -I`` subprocess (isolated mode: no user site, no PYTHON*
variables), in a fresh temporary working directory, in its own session (so a timeout kills its whole
process group), with:

* a wall-clock **timeout** (the process group is SIGKILLed) and an RLIMIT_CPU backstop;
* a **memory limit**: ``resource.setrlimit(RLIMIT_AS)`` in ``preexec_fn`` (allocation beyond it raises
  MemoryError in the child or kills it), plus RLIMIT_FSIZE against runaway files and no core dumps;
* **no network**: ``unshare -n`` (an empty network namespace) when the machine allows it; in any case
  the runner replaces ``socket.socket`` with a class that refuses to open sockets before the program
  starts, and the environment is minimal with proxies off.

Processes are started from the calling thread and polled (no helper threads), up to ``workers`` at once.
A program that loops forever or allocates without bound is killed and reported, and the evaluator goes
on.
"""
from __future__ import annotations

import functools
import os
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from typing import Optional, Sequence

# Runs inside the child before the program: refuse network sockets, then execute the program file.
RUNNER = r"""
import socket as _socket_mod, _socket, sys
class _NoSocket(_socket_mod.socket):
    def __init__(self, *args, **kwargs):
        raise OSError("network access is disabled in the sandbox")
class _NoRawSocket(_socket.socket):
    def __init__(self, *args, **kwargs):
        raise OSError("network access is disabled in the sandbox")
def _refuse(*args, **kwargs):
    raise OSError("network access is disabled in the sandbox")
_socket_mod.socket = _NoSocket
_socket.socket = _NoRawSocket
_socket_mod.create_connection = _socket_mod.socketpair = _socket_mod.fromfd = _refuse
_socket_mod.getaddrinfo = _socket.getaddrinfo = _refuse
del _socket_mod, _socket
_path = sys.argv[1]
sys.argv = [_path]
with open(_path, encoding="utf-8") as _f:
    _code = compile(_f.read(), _path, "exec")
exec(_code, {"__name__": "__main__", "__file__": _path, "__builtins__": __builtins__})
"""

STATUSES = ("passed", "failed", "timeout", "memory")


@dataclass
class ExecResult:
    status: str  # passed | failed | timeout | memory
    returncode: Optional[int]
    seconds: float
    stderr_tail: str = ""

    @property
    def passed(self) -> bool:
        return self.status == "passed"


@functools.lru_cache(maxsize=1)
def network_isolation_prefix() -> tuple:
    """``("unshare", "-n")`` (or the user-namespace variant) where that works here, else ``()``."""
    unshare = shutil.which("unshare")
    if unshare is None:
        return ()
    for flags in (("-n",), ("-rn",)):
        try:
            ok = subprocess.run([unshare, *flags, "true"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                timeout=10).returncode == 0
        except (OSError, subprocess.TimeoutExpired):
            ok = False
        if ok:
            return (unshare, *flags)
    return ()


def _limits(memory_bytes: int, cpu_seconds: int, file_bytes: int):
    def apply() -> None:  # runs in the child between fork and exec: keep it to system calls
        os.setsid()
        resource.setrlimit(resource.RLIMIT_AS, (memory_bytes, memory_bytes))
        resource.setrlimit(resource.RLIMIT_CPU, (cpu_seconds, cpu_seconds + 1))
        resource.setrlimit(resource.RLIMIT_FSIZE, (file_bytes, file_bytes))
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))

    return apply


def _child_env(home: str) -> dict:
    return {"PATH": os.defpath, "HOME": home, "TMPDIR": home, "LANG": "C.UTF-8", "PYTHONHASHSEED": "0",
            "PYTHONDONTWRITEBYTECODE": "1", "OMP_NUM_THREADS": "1", "NO_PROXY": "*", "no_proxy": "*"}


class _Running:
    def __init__(self, index: int, program: str, timeout: float, memory_mb: int, isolate_network: bool):
        self.index = index
        self.dir = tempfile.mkdtemp(prefix="mtp_sandbox_")
        path = os.path.join(self.dir, "program.py")
        with open(path, "w", encoding="utf-8") as f:
            f.write(program)
        self.stderr_path = os.path.join(self.dir, "stderr.txt")
        prefix = list(network_isolation_prefix()) if isolate_network else []
        cmd = prefix + [sys.executable, "-I", "-B", "-c", RUNNER, path]
        self.start = time.monotonic()
        self.deadline = self.start + timeout
        with open(self.stderr_path, "wb") as err:
            self.proc = subprocess.Popen(
                cmd, cwd=self.dir, env=_child_env(self.dir), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                stderr=err, close_fds=True,
                preexec_fn=_limits(memory_mb << 20, int(timeout) + 2, 64 << 20),
            )
        self.timed_out = False

    def kill_group(self) -> None:
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass

    def finish(self) -> ExecResult:
        self.kill_group()  # anything the program left running in its session
        seconds = time.monotonic() - self.start
        try:
            with open(self.stderr_path, "rb") as f:
                f.seek(0, os.SEEK_END)
                f.seek(max(0, f.tell() - 2000))
                tail = f.read().decode("utf-8", errors="replace")
        except OSError:
            tail = ""
        shutil.rmtree(self.dir, ignore_errors=True)
        rc = self.proc.returncode
        if self.timed_out or rc == -signal.SIGXCPU:
            status = "timeout"
        elif rc == 0:
            status = "passed"
        elif "MemoryError" in tail or rc in (-signal.SIGKILL, -signal.SIGSEGV):
            status = "memory"  # RLIMIT_AS: MemoryError, or killed mid-allocation
        else:
            status = "failed"
        return ExecResult(status, rc, seconds, tail[-500:])


def run_programs(programs: Sequence[str], timeout: float = 10.0, memory_mb: int = 1024, workers: int = 4,
                 isolate_network: bool = True, poll_interval: float = 0.005) -> list:
    """Run each program (Python source) in the sandbox; return an ``ExecResult`` per program, in order."""
    results: list = [None] * len(programs)
    pending = list(enumerate(programs))[::-1]
    running: list = []
    try:
        while pending or running:
            while pending and len(running) < max(1, workers):
                index, program = pending.pop()
                running.append(_Running(index, program, timeout, memory_mb, isolate_network))
            time.sleep(poll_interval)
            still = []
            for job in running:
                if job.proc.poll() is None:
                    if time.monotonic() < job.deadline:
                        still.append(job)
                        continue
                    job.timed_out = True
                    job.kill_group()
                    job.proc.wait()
                results[job.index] = job.finish()
            running = still
    finally:
        for job in running:  # interrupted: leave nothing behind
            job.kill_group()
            job.proc.wait()
            shutil.rmtree(job.dir, ignore_errors=True)
    return results


def run_program(program: str, timeout: float = 10.0, memory_mb: int = 1024, isolate_network: bool = True) -> ExecResult:
    return run_programs([program], timeout, memory_mb, workers=1, isolate_network=isolate_network)[0]
