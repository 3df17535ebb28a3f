"""The pass@k sandbox holds against hostile programs: each escape below is tried by a program and fails,
checked from the outside too (the secret never shows, the file never appears, no process of the program's
uid is left). Every test runs in each isolation mode this machine offers: ``namespaces`` (own uid plus
pid/mount/net/ipc namespaces) and ``uid`` (own uid only, e.g. a container without CAP_SYS_ADMIN).
Running programs as another user needs root: CI runs as root, elsewhere these tests skip."""
import os
import subprocess
import sys
import tempfile
import textwrap
import time

import pytest

from megatron_mtp.eval import sandbox
from megatron_mtp.eval.humaneval import build_program


@pytest.fixture(params=["namespaces", "uid"])
def mode(request, monkeypatch):
    if os.geteuid() != 0:
        pytest.skip("the sandbox runs programs as another user, which needs root (CI runs as root)")
    best = sandbox.isolation()
    assert best.mode != "none", f"running as root, yet no sandbox configuration works: {best.reason}"
    if request.param == "namespaces" and best.mode != "namespaces":
        pytest.skip("no pid/mount namespaces on this machine (unshare needs CAP_SYS_ADMIN)")
    monkeypatch.setattr(sandbox, "isolation", lambda: sandbox.Isolation(request.param, best.python))
    return request.param


def run(source: str, **kwargs) -> sandbox.ExecResult:
    kwargs.setdefault("timeout", 10.0)
    return sandbox.run_program(textwrap.dedent(source), **kwargs)


def uid_of(result) -> int:
    return int(result.stdout_tail.split("uid=")[1].split()[0])


PROBLEM = {"task_id": "toy/0", "prompt": "def add(a, b):\n", "entry_point": "add",
           "test": "def check(candidate):\n    assert candidate(2, 3) == 5\n    assert candidate(-1, 1) == 0\n"}


def test_marker_needed_for_a_pass(mode):
    programs = {
        "correct": "    return a + b\n",
        "wrong": "    return a - b\n",
        "os_exit": "    return a\nimport os\nos._exit(0)\n",
        "sys_exit": "    return a\nimport sys\nsys.exit(0)\n",
        "exit_builtin": "    return a\nexit()\n",
        "exit_in_check": "    import os\n    os._exit(0)\n",
        "guess_marker": "    return a\nprint('\\n' + 'a' * 32)\nimport os\nos._exit(0)\n",
    }
    results = dict(zip(programs, sandbox.run_programs([build_program(PROBLEM, c) for c in programs.values()],
                                                      timeout=10.0, workers=4)))
    assert results["correct"].passed, results["correct"]
    assert results["wrong"].status == "failed" and "AssertionError" in results["wrong"].stderr_tail
    for name in ("os_exit", "sys_exit", "exit_builtin", "exit_in_check", "guess_marker"):
        assert results[name].returncode == 0 and results[name].status == "failed", (name, results[name])


def test_cannot_read_files_outside_its_dir(mode, tmp_path):
    secret_dir = tempfile.mkdtemp()  # world-traversable, so only the file's own mode protects it
    try:
        os.chmod(secret_dir, 0o755)
        secret = os.path.join(secret_dir, "secret.txt")
        with open(secret, "w") as f:
            f.write("TOP-SECRET-" + os.urandom(8).hex())
        os.chmod(secret, 0o600)
        token = open(secret).read()
        result = run(f"""
            import os
            print("uid=%d" % os.getuid())
            for path in {[secret, "/etc/shadow", "/root/.bashrc", str(tmp_path)]!r}:
                try:
                    data = open(path).read() if not os.path.isdir(path) else os.listdir(path)
                except OSError as exc:
                    print(path, type(exc).__name__)
                else:
                    raise SystemExit("read %s: %r" % (path, data))
            """)
        assert result.passed, result
        assert token not in result.stdout_tail + result.stderr_tail
        assert "PermissionError" in result.stdout_tail or "FileNotFoundError" in result.stdout_tail
        assert uid_of(result) != 0
    finally:
        os.unlink(secret)
        os.rmdir(secret_dir)


def test_cannot_write_outside_its_dir(mode):
    target_dir = tempfile.mkdtemp()  # root's, world-traversable
    os.chmod(target_dir, 0o755)
    token = os.urandom(6).hex()
    in_tmp = os.path.join(sandbox._reachable_tmp(), f"mtp_sandbox_test_{token}")  # world-writable
    blocked = [os.path.join(target_dir, "x"), "/etc/mtp_sandbox_x", "/root/mtp_sandbox_x",
               os.path.join(os.path.dirname(os.path.abspath(__file__)), f"mtp_sandbox_{token}")]
    try:
        result = run(f"""
            import os
            with open("inside.txt", "w") as f:  # its own directory works
                f.write("ok")
            for path in {blocked!r}:
                try:
                    open(path, "w").write("escaped")
                except OSError as exc:
                    print(path, type(exc).__name__)
                else:
                    raise SystemExit("wrote " + path)
            open({in_tmp!r}, "w").write("left behind")  # allowed, but private or cleaned up
            """)
        assert result.passed, result
        for path in blocked + [in_tmp]:
            assert not os.path.exists(path), path
        assert os.listdir(target_dir) == []
    finally:
        for path in [in_tmp, *blocked]:
            if os.path.exists(path):
                os.unlink(path)
        os.rmdir(target_dir)


def test_leaves_nothing_behind(mode):
    # Files in world-writable directories and a SysV shared-memory segment: both outlive a plain process.
    token = os.urandom(6).hex()
    paths = [os.path.join(d, f"mtp_sandbox_left_{token}") for d in sandbox.WORLD_WRITABLE if os.path.isdir(d)]
    result = run(f"""
        import ctypes, os
        print("uid=%d" % os.getuid())
        for path in {paths!r}:
            open(path, "w").write("left behind")
        if {os.path.exists("/proc/sysvipc/shm")}:  # a kernel with SysV IPC
            shmid = ctypes.CDLL(None, use_errno=True).shmget(0, 4096, 0o1000 | 0o600)  # IPC_PRIVATE, IPC_CREAT
            assert shmid >= 0, os.strerror(ctypes.get_errno())
        """)
    assert result.passed, result
    uid = uid_of(result)
    assert [p for p in paths if os.path.exists(p)] == []
    if os.path.exists("/proc/sysvipc/shm"):
        with open("/proc/sysvipc/shm") as f:
            rows = [line.split() for line in f.read().splitlines()[1:]]
        assert [r for r in rows if str(uid) in (r[7], r[9])] == []  # uid, cuid columns


def test_cannot_read_the_evaluators_environment(mode, tmp_path):
    # The evaluator is a child process whose environment (at exec, which is what /proc shows) holds a secret.
    token = "s3cr3t-" + os.urandom(8).hex()
    evaluator = f"""
import os, sys, textwrap
from megatron_mtp.eval import sandbox
sandbox.isolation = lambda: sandbox.Isolation({mode!r}, {sandbox.isolation().python!r})
program = textwrap.dedent('''
    import os
    found, readable = [], []
    for pid in {{os.getppid(), %d, *[int(p) for p in os.listdir("/proc") if p.isdigit()]}}:
        try:
            data = open("/proc/%%d/environ" %% pid, "rb").read()
        except OSError:
            continue
        readable.append(pid)
        if b"MTP_EVAL_SECRET" in data:
            found.append(pid)
    print("readable", readable, "found", found, "env", dict(os.environ))
    assert not found
    ''' % os.getpid())
result = sandbox.run_program(program, timeout=10)
print(result.status, result.stdout_tail, result.stderr_tail)
"""
    env = dict(os.environ, MTP_EVAL_SECRET=token)
    proc = subprocess.Popen([sys.executable, "-c", evaluator], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    # Can this test fail? As root the evaluator's environment is readable from outside the sandbox.
    deadline = time.monotonic() + 5
    seen = b""
    while token.encode() not in seen and time.monotonic() < deadline:
        try:
            seen = open(f"/proc/{proc.pid}/environ", "rb").read()
        except OSError:
            break
    out, _ = proc.communicate(timeout=60)
    assert token.encode() in seen, "the secret should be visible in the evaluator's /proc/<pid>/environ"
    assert out.startswith("passed"), out
    assert "found []" in out and token not in out and "MTP_EVAL_SECRET" not in out.split("env", 1)[1]


def test_cannot_kill_the_evaluator_or_its_launcher(mode):
    result = run(f"""
        import os, signal
        for pid in (os.getppid(), {os.getpid()}, 1):
            try:
                os.kill(pid, signal.SIGKILL)
            except (PermissionError, ProcessLookupError) as exc:
                print(pid, type(exc).__name__)
            else:
                if pid != 1:  # pid 1 of a pid namespace silently drops signals from inside
                    raise SystemExit("killed %d" % pid)
        print("still here")
        """)
    # The launcher reported the program's exit status and the marker came through: neither was killed.
    assert result.passed and "still here" in result.stdout_tail, result


def test_setsid_survivor_is_killed(mode):
    # Two programs leave a grandchild in its own session that writes a file after the end: one program runs
    # into the timeout, the other exits at once.
    timeout, late = 2.0, 3.0
    token = os.urandom(6).hex()
    late_files = {ends_by: os.path.join(sandbox._reachable_tmp(), f"mtp_sandbox_late_{ends_by}_{token}")
                  for ends_by in ("timeout", "exit")}
    programs = [textwrap.dedent(f"""
        import os, time
        print("uid=%d" % os.getuid(), flush=True)
        pid = os.fork()
        if pid == 0:
            os.setsid()
            if os.fork() == 0:  # reparented away from the program, in a session of its own
                time.sleep({late})
                for path in ({late_files[ends_by]!r}, "late.txt"):
                    try:
                        open(path, "w").write("survived")
                    except OSError:
                        pass
            os._exit(0)
        os.waitpid(pid, 0)
        while {ends_by == "timeout"}:
            time.sleep(0.05)
        """) for ends_by in late_files]
    started = time.monotonic()
    results = dict(zip(late_files, sandbox.run_programs(programs, timeout=timeout, workers=2)))
    assert results["timeout"].status == "timeout" and results["exit"].status == "passed", results
    uids = [uid_of(r) for r in results.values()]
    assert [sandbox._pids_of(uid) for uid in uids] == [[], []], "a process of the program's uid outlived it"
    time.sleep(max(0.0, started + late + 0.7 - time.monotonic()))
    for path in late_files.values():
        assert not os.path.exists(path), "a setsid survivor wrote its file after the end"
    assert [sandbox._pids_of(uid) for uid in uids] == [[], []]


def test_fork_bomb_is_bounded_by_nproc(mode):
    nproc = 8
    result = run("""
        import os, time
        print("uid=%d" % os.getuid(), flush=True)
        n = 0
        try:
            while n < 40:  # a cap so a broken limit cannot hurt the machine
                if os.fork() == 0:
                    time.sleep(30)
                    os._exit(0)
                n += 1
        except BlockingIOError:
            print("limited after", n, "forks")
        else:
            raise SystemExit("not limited")
        """, nproc=nproc)
    assert result.passed, result
    forks = int(result.stdout_tail.split("limited after")[1].split()[0])
    assert 0 < forks < nproc
    assert sandbox._pids_of(uid_of(result)) == []  # the sleeping children are gone too


def test_isolated_view_of_the_machine(mode):
    result = run("""
        import os
        pids = [p for p in os.listdir("/proc") if p.isdigit()]
        print("uid=%d" % os.getuid(), "groups", os.getgroups(), "pids", len(pids))
        print("nnp", [l for l in open("/proc/self/status") if l.startswith("NoNewPrivs")][0].split()[1])
        print("cwd_mode", oct(os.stat(".").st_mode & 0o777), "owner", os.stat(".").st_uid)
        print("interfaces", sorted(l.split(":")[0].strip() for l in open("/proc/net/dev").readlines()[2:]))
        """)
    assert result.passed, result
    out = result.stdout_tail
    uid = uid_of(result)
    assert sandbox._id_range()[0] <= uid < sandbox._id_range()[1] and "groups []" in out and "nnp 1" in out
    assert f"cwd_mode 0o700 owner {uid}" in out
    if mode == "namespaces":  # its own pid namespace (the launcher and itself), an empty network namespace
        assert int(out.split("pids")[1].split()[0]) <= 3
        assert "interfaces ['lo']" in out


def test_refuses_without_isolation(monkeypatch, capsys):
    monkeypatch.setattr(sandbox, "isolation", lambda: sandbox.Isolation("none", sys.executable, "not root"))
    with pytest.raises(sandbox.SandboxUnavailable, match="refusing to run untrusted generated code without a "
                                                         "sandbox: not root; run the evaluator as root"):
        sandbox.run_program("print(1)\n")
    with pytest.warns(UserWarning, match="WITHOUT a sandbox"):
        result = sandbox.run_program("print('hello')\n", allow_unsandboxed=True)
    assert result.passed and "hello" in result.stdout_tail
    # The tool refuses before it loads a model (this --load does not exist) and generates for hours.
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tools"))
    try:
        import eval_humaneval
    finally:
        sys.path.pop(0)
    assert eval_humaneval.main(["--load", "/nonexistent/run", "--n-samples", "1", "--greedy", "--k", "1"]) == 2
    assert "refusing to run untrusted generated code without a sandbox" in capsys.readouterr().err
    monkeypatch.undo()
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    sandbox.isolation.cache_clear()
    try:
        assert sandbox.isolation().mode == "none" and "not root" in sandbox.isolation().reason
    finally:
        sandbox.isolation.cache_clear()
