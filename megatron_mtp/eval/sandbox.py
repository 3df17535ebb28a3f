"""Running untrusted generated programs, isolated from the evaluator, its files, environment and processes.

A generated program is hostile. Each one runs in its own process tree, never in the evaluator
(docs/security.md says precisely what is and is not isolated):

    evaluator -> [unshare --pid --mount --net --ipc] -> launcher (root, python -I -S) -> program (uid N)

* **An unprivileged user of its own**: every program gets a fresh random uid/gid (named in no passwd or
  group entry, used by no process), no supplementary groups and ``no_new_privs`` (set-uid binaries grant
  nothing). It reads only world-readable files, writes only its own directory (mode 0700, its uid) and
  world-writable places, cannot signal or trace the evaluator or another program, and cannot read their
  ``/proc/<pid>/environ``. This needs the evaluator to run as root.
* **Namespaces where the kernel lets us** (probed once; ``isolation()`` says which mode is in use): its own
  pid namespace and /proc (it sees no other process; when the launcher, pid 1 there, ends, the kernel kills
  everything in it), size-capped private tmpfs mounts on /tmp (its directory lives there), /var/tmp,
  /dev/shm and /run/lock, so nothing it writes reaches the host's disks, an empty network namespace and
  its own IPC namespace. Without them (``uid`` mode, e.g. a container without CAP_SYS_ADMIN) its directory
  is on disk, and unless ``unshare -n`` works the network block is the runner's alone.
* **A fixed environment** with nothing from the evaluator's (PATH, HOME, TMPDIR, LANG), ``python -I``.
* **Limits**: RLIMIT_AS (memory), RLIMIT_CPU, RLIMIT_FSIZE, RLIMIT_NPROC (counted per uid, so exactly this
  program's processes and threads), RLIMIT_NOFILE, no core files, and a wall-clock timeout.
* **Nothing outlives it**: at the end the launcher's process group is killed (with a pid namespace that ends
  it), then every process of the uid by ``kill(-1, SIGKILL)`` sent as that uid (the kernel delivers it to
  all of them at once, so neither ``setsid`` nor a fork race escapes), until none is left; without
  namespaces, what it left at the top of world-writable directories and its SysV IPC objects are removed.
* **A pass needs a marker**: a fresh random nonce goes to the program over stdin, which is closed before
  the program runs; the runner prints it after the program ran to its end (for HumanEval: after
  ``check()`` returned). Exit status 0 alone (``sys.exit(0)`` or ``os._exit(0)`` before the tests) fails.
* **No network**: the empty network namespace where available, and always a runner that replaces the
  socket constructors with ones that refuse (a program can get past that one by itself, e.g. with ctypes
  or a subprocess).

Where the evaluator is not root, or no configuration passes the start-up probe, ``run_programs`` refuses
to run anything unless ``allow_unsandboxed=True``; then programs run as the evaluator's own user with only
the limits (no RLIMIT_NPROC: it would count the user's other processes), the fixed environment, their own
session and the network block.

Processes are started from the calling thread and polled (no helper threads), up to ``workers`` at once.
"""
from __future__ import annotations

import ctypes
import functools
import grp
import json
import os
import pwd
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass
from typing import Optional, Sequence

from megatron_mtp.errors import SandboxUnavailable

# Runs as the program's user: take the nonce from stdin and close it, refuse network sockets, run the
# program file, and only if it ran to its end print the nonce. The nonce lives only in _run's frame.
RUNNER = r"""
import os, sys
_null = os.open(os.devnull, os.O_RDONLY)
import socket as _socket_mod, _socket
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
def _run(path, null):
    marker = os.read(0, 64).strip()
    os.dup2(null, 0)
    os.close(null)
    sys.argv = [path]
    with open(path, encoding="utf-8") as f:
        code = compile(f.read(), path, "exec")
    exec(code, {"__name__": "__main__", "__file__": path, "__builtins__": __builtins__})
    try:
        sys.stdout.flush()
    except Exception:
        pass
    os.write(1, b"\n" + marker + b"\n")
_run(sys.argv[1], _null)
"""

# Runs as root (or as the evaluator's user when unsandboxed), as pid 1 of the new pid namespace where
# there is one: set up the private mounts, fork the program as its own user, report its pid and wait status
# on the status fd (a file in the evaluator's private directory). Its environment is empty.
LAUNCHER = r"""
import ctypes, json, os, resource, sys
cfg = json.loads(sys.argv[1])
status_fd = cfg["status_fd"]
def fail(message):
    os.write(2, ("sandbox: " + message + "\n").encode())
    os._exit(125)
libc = ctypes.CDLL(None, use_errno=True)
def mount(source, target, fstype, flags, data):
    if libc.mount(source, target, fstype, ctypes.c_ulong(flags), data) != 0:
        fail("cannot mount " + target.decode() + ": " + os.strerror(ctypes.get_errno()))
workdir = cfg["workdir"]
if workdir is None:  # its directory lives in the private /tmp: nothing it writes reaches the host's disks
    with open(cfg["program"], "rb") as f:
        source = f.read()
    MS_NOSUID, MS_NODEV = 2, 4
    for d in cfg["private_dirs"]:
        if os.path.isdir(d) and not os.path.islink(d):
            mount(b"tmpfs", d.encode(), b"tmpfs", MS_NOSUID | MS_NODEV, b"size=64m,nr_inodes=4096,mode=1777")
    workdir = "/tmp/sandbox"
    os.mkdir(workdir, 0o700)
    with open(workdir + "/program.py", "wb") as f:
        f.write(source)
    for path in (workdir, workdir + "/program.py"):
        os.chown(path, cfg["uid"], cfg["uid"])
pid = os.fork()
if pid == 0:
    try:
        os.setsid()
        os.close(status_fd)
        if cfg["uid"] is not None:
            os.setgroups([])
            os.setgid(cfg["uid"])  # as root these set the real, effective and saved ids
            os.setuid(cfg["uid"])
        if libc.prctl(38, 1, 0, 0, 0) != 0:  # PR_SET_NO_NEW_PRIVS
            raise OSError(ctypes.get_errno(), "prctl(PR_SET_NO_NEW_PRIVS) failed")
        for name, soft, hard in cfg["limits"]:
            resource.setrlimit(getattr(resource, name), (soft, hard))
        os.chdir(workdir)
        env = dict(cfg["env"], HOME=workdir, TMPDIR=workdir)
        os.execve(cfg["python"], [cfg["python"], "-I", "-B", "-c", cfg["runner"], "program.py"], env)
    except BaseException as exc:
        fail("cannot start the program: %s" % (exc,))
os.write(status_fd, b"pid %d\n" % pid)
_, status = os.waitpid(pid, 0)
os.write(status_fd, b"status %d\n" % status)
os._exit(0)
"""

STATUSES = ("passed", "failed", "timeout", "memory")

# Environment of every program: constants only, nothing of the evaluator's. HOME and TMPDIR are set to the
# program's own directory by the launcher.
PROGRAM_ENV = {"PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8", "OMP_NUM_THREADS": "1"}

# Fresh ids come from a range that systemd's uid allocation table leaves unassigned (between the container
# range and the foreign range), so they belong to no user or container on a normal host. Inside a user
# namespace that maps fewer ids (a remapped container), the upper half of the mapped ids is used instead.
ID_RANGE = (0x70000000, 0x7FFD0000)
# World-writable directories of a Debian-like system: private tmpfs mounts with namespaces, cleaned after
# each program without.
WORLD_WRITABLE = ("/tmp", "/var/tmp", "/dev/shm", "/run/lock")


@dataclass
class ExecResult:
    status: str  # passed | failed | timeout | memory
    returncode: Optional[int]
    seconds: float
    stderr_tail: str = ""
    stdout_tail: str = ""

    @property
    def passed(self) -> bool:
        return self.status == "passed"


@dataclass(frozen=True)
class Isolation:
    """How programs run on this machine: ``namespaces`` (own uid + pid/mount/net/ipc namespaces), ``uid``
    (own uid only) or ``none``; ``python`` is the interpreter the programs run under."""
    mode: str
    python: str
    reason: str = ""

    def describe(self) -> str:
        return {"namespaces": "own uid, pid/mount/network/ipc namespaces", "uid": "own uid (no namespaces)",
                "none": "none (" + self.reason + ")"}[self.mode] + f"; python {self.python}"


@functools.lru_cache(maxsize=2)
def network_isolation_prefix(user_namespace: bool = True) -> tuple:
    """``("unshare", "-n")`` (or, if ``user_namespace``, the user-namespace variant ``-rn``, which maps only
    the caller's own uid and so rules out switching to another) where that works here, else ``()``."""
    unshare = shutil.which("unshare")
    if unshare is None:
        return ()
    for flags in (("-n",), ("-rn",))[:2 if user_namespace else 1]:
        try:
            ok = subprocess.run([unshare, *flags, "true"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                timeout=10).returncode == 0
        except (OSError, subprocess.TimeoutExpired):
            ok = False
        if ok:
            return (unshare, *flags)
    return ()


def _pids_of(uid: int) -> list:
    """Live (not zombie) processes whose real or saved uid is ``uid``: what ``kill(-1)`` as ``uid`` reaches."""
    pids = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/status") as f:
                fields = dict(line.split(":", 1) for line in f if ":" in line)
        except OSError:
            continue  # exited meanwhile
        uids = fields.get("Uid", "").split()
        if uids and uid in (int(uids[0]), int(uids[2])) and not fields.get("State", "").strip().startswith(("Z", "X")):
            pids.append(int(name))
    return pids


@functools.lru_cache(maxsize=1)
def _id_range() -> tuple:
    """Where fresh uids/gids come from: ``ID_RANGE``, or the upper half of the ids our user namespace maps."""
    spans = []
    for kind in ("uid_map", "gid_map"):
        try:
            with open(f"/proc/self/{kind}") as f:
                rows = [tuple(map(int, line.split())) for line in f if line.strip()]
        except OSError:
            return ID_RANGE
        spans.append(max(((inside, inside + count) for inside, _, count in rows), key=lambda r: r[1] - r[0]))
    lo, hi = max(s[0] for s in spans), min(s[1] for s in spans)
    if lo <= ID_RANGE[0] and ID_RANGE[1] <= hi:
        return ID_RANGE
    return ((lo + hi) // 2, hi - 2)  # hi - 1 is often "nobody" (65534 of 65536)


def _fresh_id() -> int:
    while True:
        uid = secrets.SystemRandom().randrange(*_id_range())
        try:
            pwd.getpwuid(uid)
            continue
        except KeyError:
            pass
        try:
            grp.getgrgid(uid)
            continue
        except KeyError:
            pass
        if not _pids_of(uid):
            return uid


def _kill_uid(uid: int, python: str) -> None:
    """SIGKILL every process of ``uid``: a helper running as ``uid`` calls ``kill(-1, SIGKILL)``, which the
    kernel delivers to all of that user's processes under one lock (a process that is forking dies with its
    child). Repeated until none is left, so none is still dying when this returns (a pid namespace is torn
    down asynchronously); one stuck in the kernel keeps its pending SIGKILL and never runs code again."""
    helper = [python, "-I", "-S", "-c", "import os\ntry:\n    os.kill(-1, 9)\nexcept ProcessLookupError:\n    pass\n"]
    for _ in range(200):
        if not _pids_of(uid):
            return
        subprocess.run(helper, user=uid, group=uid, extra_groups=[], env={}, stdin=subprocess.DEVNULL,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=30)
        time.sleep(0.01)
    warnings.warn(f"sandbox processes {_pids_of(uid)} of uid {uid} got SIGKILL but have not exited yet")


def _remove_leftovers(uid: int) -> None:
    """Entries that the program's uid left at the top of the world-writable directories (only reachable
    without the private tmpfs mounts). Links are removed, never followed."""
    for top in {*WORLD_WRITABLE, tempfile.gettempdir(), _reachable_tmp()}:
        try:
            entries = list(os.scandir(top))
        except OSError:
            continue
        for entry in entries:
            try:
                if entry.stat(follow_symlinks=False).st_uid != uid:
                    continue
                if entry.is_dir(follow_symlinks=False):
                    shutil.rmtree(entry.path, ignore_errors=True)
                else:
                    os.unlink(entry.path)
            except OSError:
                pass


def _remove_ipc(uid: int) -> None:
    """SysV shared memory, semaphores and message queues outlive their creator; without an IPC namespace of
    its own (which the kernel empties when it ends), remove those the program's uid created or owns."""
    libc = ctypes.CDLL(None, use_errno=True)
    ipc_rmid = 0
    removers = {"shm": lambda i: libc.shmctl(i, ipc_rmid, None), "sem": lambda i: libc.semctl(i, 0, ipc_rmid),
                "msg": lambda i: libc.msgctl(i, ipc_rmid, None)}
    for kind, remove in removers.items():
        try:
            with open(f"/proc/sysvipc/{kind}") as f:
                lines = f.read().splitlines()
        except OSError:
            continue
        if not lines:
            continue
        header = lines[0].split()
        columns = [header.index("uid"), header.index("cuid")]
        for line in lines[1:]:
            row = line.split()
            if uid in (int(row[c]) for c in columns):
                remove(int(row[1]))


def _reachable_tmp() -> str:
    """A temporary directory that another uid can reach (TMPDIR may sit under a private home)."""
    for top in (tempfile.gettempdir(), *WORLD_WRITABLE):
        path, ok = os.path.realpath(top), True
        while ok and path != "/":
            ok = os.path.isdir(path) and bool(os.stat(path).st_mode & 0o001)
            path = os.path.dirname(path)
        if ok:
            return top
    raise SandboxUnavailable("no temporary directory that an unprivileged user can reach (tried TMPDIR, "
                             f"{', '.join(WORLD_WRITABLE)}); set TMPDIR to one.")


def _tail(path: str, limit: int = 4000) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - limit))
            return f.read().decode("utf-8", errors="replace")
    except OSError:
        return ""


class _Job:
    """One program: its private directory (owned by its uid), the evaluator's control directory (root, 0700:
    stdout, stderr and the launcher's status), the launcher process, and the nonce."""

    def __init__(self, index: int, program: str, timeout: float, memory_mb: int, nproc: int,
                 isolate_network: bool, iso: Isolation):
        self.index, self.iso = index, iso
        self.uid = None if iso.mode == "none" else _fresh_id()
        self.control = tempfile.mkdtemp(prefix="mtp_sandbox_ctl_")
        # With namespaces the launcher copies the program into the private /tmp; else it gets a directory here.
        self.workdir = None if iso.mode == "namespaces" else tempfile.mkdtemp(
            prefix="mtp_sandbox_", dir=_reachable_tmp() if self.uid is not None else None)
        path = os.path.join(self.workdir or self.control, "program.py")
        with open(path, "w", encoding="utf-8") as f:
            f.write(program)
        if self.uid is not None and self.workdir is not None:
            os.chown(path, self.uid, self.uid)
            os.chown(self.workdir, self.uid, self.uid)
        self.nonce = secrets.token_hex(16)
        limits = [("RLIMIT_AS", memory_mb << 20, memory_mb << 20),
                  ("RLIMIT_CPU", int(timeout) + 2, int(timeout) + 3),
                  ("RLIMIT_FSIZE", 64 << 20, 64 << 20), ("RLIMIT_CORE", 0, 0), ("RLIMIT_NOFILE", 64, 64)]
        if self.uid is not None:  # per uid: with a shared uid it would count the evaluator's processes too
            limits.append(("RLIMIT_NPROC", nproc, nproc))
        self.paths = {name: os.path.join(self.control, name) for name in ("stdout", "stderr", "status")}
        files = {name: open(p, "wb") for name, p in self.paths.items()}
        cfg = {"status_fd": files["status"].fileno(), "workdir": self.workdir, "program": path, "uid": self.uid,
               "limits": limits, "env": PROGRAM_ENV, "private_dirs": WORLD_WRITABLE,
               "python": iso.python, "runner": RUNNER}
        launcher = [sys.executable, "-I", "-S", "-c", LAUNCHER, json.dumps(cfg)]
        if iso.mode == "namespaces":
            cmd = [shutil.which("unshare"), "--pid", "--fork", "--kill-child", "--mount", "--mount-proc", "--ipc",
                   *(["--net"] if isolate_network else []), *launcher]
        else:
            prefix = network_isolation_prefix(user_namespace=self.uid is None) if isolate_network else ()
            cmd = [*prefix, *launcher]
        self.start = time.monotonic()
        self.deadline = self.start + timeout
        self.timed_out = False
        try:
            self.proc = subprocess.Popen(cmd, cwd="/", env={}, stdin=subprocess.PIPE, stdout=files["stdout"],
                                         stderr=files["stderr"], pass_fds=(files["status"].fileno(),),
                                         close_fds=True, start_new_session=True)
        finally:
            for f in files.values():
                f.close()
        try:
            self.proc.stdin.write(self.nonce.encode() + b"\n")
            self.proc.stdin.close()
        except BrokenPipeError:
            pass

    def _launcher_report(self) -> dict:
        report = {}
        try:
            with open(self.paths["status"]) as f:
                for line in f:
                    key, _, value = line.partition(" ")
                    report[key] = int(value)
        except (OSError, ValueError):
            pass
        return report

    def kill(self) -> None:
        """Kill everything the program started: the launcher's group (in a pid namespace that ends the
        namespace) and every process of its uid; unsandboxed, the program's own process group."""
        groups = [self.proc.pid]
        if self.uid is None:  # unsandboxed: its session is all we can find (a pid namespace's ids mean nothing here)
            groups.append(self._launcher_report().get("pid"))
        for pgid in groups:
            if pgid:
                try:
                    os.killpg(pgid, signal.SIGKILL)
                except (ProcessLookupError, PermissionError):
                    pass
        if self.uid is not None:
            _kill_uid(self.uid, self.iso.python)

    def finish(self) -> ExecResult:
        self.kill()
        self.proc.wait()
        seconds = time.monotonic() - self.start
        if self.uid is not None and self.iso.mode != "namespaces":
            _remove_leftovers(self.uid)
            _remove_ipc(self.uid)
        stdout, stderr = _tail(self.paths["stdout"]), _tail(self.paths["stderr"])
        report = self._launcher_report()
        if self.workdir is not None:
            shutil.rmtree(self.workdir, ignore_errors=True)
        shutil.rmtree(self.control, ignore_errors=True)
        rc = os.waitstatus_to_exitcode(report["status"]) if "status" in report else self.proc.returncode
        marked = f"\n{self.nonce}\n" in stdout
        if self.timed_out or rc == -signal.SIGXCPU:
            status = "timeout"
        elif rc == 0 and marked:
            status = "passed"
        elif "MemoryError" in stderr or rc in (-signal.SIGKILL, -signal.SIGSEGV):
            status = "memory"  # RLIMIT_AS: MemoryError, or killed mid-allocation
        else:
            status = "failed"  # includes exit 0 without the marker: it stopped before its end
        return ExecResult(status, rc, seconds, stderr[-500:], stdout.replace(self.nonce, "<marker>")[-500:])


def _interpreters() -> list:
    """Interpreters the program's user may be able to run: the evaluator's own first (it may live under a
    private home, e.g. pyenv under /root), then python3 on the default PATH."""
    found = [sys.executable, shutil.which("python3", path=PROGRAM_ENV["PATH"])]
    unique = []
    for p in found:
        if p and os.path.realpath(p) not in {os.path.realpath(q) for q in unique}:
            unique.append(p)
    return unique


@functools.lru_cache(maxsize=1)
def isolation() -> Isolation:
    """The strongest configuration that runs a probe program correctly here (probed once per process)."""
    if os.geteuid() != 0:
        return Isolation("none", sys.executable, "the evaluator is not root, so it cannot run programs as "
                                                 "another user")
    probe = "import os\nassert os.getuid() != 0 and os.getgroups() in ([], [os.getgid()])\n"
    modes = (["namespaces"] if shutil.which("unshare") else []) + ["uid"]
    errors = []
    for mode in modes:
        for python in _interpreters():
            iso = Isolation(mode, python)
            job = _Job(0, probe, 30.0, 512, 16, True, iso)
            while job.proc.poll() is None and time.monotonic() < job.deadline:
                time.sleep(0.005)
            job.timed_out = job.proc.poll() is None
            result = job.finish()
            if result.passed:
                return iso
            errors.append(f"{mode} with {python}: {(result.stderr_tail.strip().splitlines() or [result.status])[-1]}")
    return Isolation("none", sys.executable, "no sandbox configuration works here (" + "; ".join(errors) + ")")


def require_isolation(allow_unsandboxed: bool = False) -> Isolation:
    """The isolation programs will get; raises ``SandboxUnavailable`` where there is none and the caller did
    not allow running them unsandboxed (call it before spending time on generation)."""
    iso = isolation()
    if iso.mode == "none":
        if not allow_unsandboxed:
            raise SandboxUnavailable(
                f"refusing to run untrusted generated code without a sandbox: {iso.reason}; run the evaluator "
                "as root, or pass --allow-unsandboxed (allow_unsandboxed=True) to run it as your own user, "
                "with access to everything you can read and write.")
        warnings.warn("running untrusted generated code WITHOUT a sandbox (allow_unsandboxed): only the "
                      "limits, the environment and the network block apply.", stacklevel=3)
    return iso


def run_programs(programs: Sequence[str], timeout: float = 10.0, memory_mb: int = 1024, workers: int = 4,
                 isolate_network: bool = True, allow_unsandboxed: bool = False, nproc: int = 16,
                 poll_interval: float = 0.005) -> list:
    """Run each program (Python source) in the sandbox; return an ``ExecResult`` per program, in order.

    ``nproc`` caps the processes and threads of one program (RLIMIT_NPROC on its own uid)."""
    iso = require_isolation(allow_unsandboxed)
    results: list = [None] * len(programs)
    pending = list(enumerate(programs))[::-1]
    running: list = []
    try:
        while pending or running:
            while pending and len(running) < max(1, workers):
                index, program = pending.pop()
                running.append(_Job(index, program, timeout, memory_mb, nproc, isolate_network, iso))
            time.sleep(poll_interval)
            still = []
            for job in running:
                if job.proc.poll() is None:
                    if time.monotonic() < job.deadline:
                        still.append(job)
                        continue
                    job.timed_out = True
                results[job.index] = job.finish()
            running = still
    finally:
        for job in running:  # interrupted: leave nothing behind
            job.finish()
    return results


def run_program(program: str, timeout: float = 10.0, memory_mb: int = 1024, isolate_network: bool = True,
                allow_unsandboxed: bool = False, nproc: int = 16) -> ExecResult:
    return run_programs([program], timeout, memory_mb, workers=1, isolate_network=isolate_network,
                        allow_unsandboxed=allow_unsandboxed, nproc=nproc)[0]
