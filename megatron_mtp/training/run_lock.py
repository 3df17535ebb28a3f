"""One run directory, one trainer: global rank 0 holds an exclusive lock on ``<run_dir>/trainer.lock``.

``fcntl.flock`` on an open file: the kernel drops the lock when its holder exits however it exits (SIGKILL,
a node reboot on NFS once the server's lease lapses), so a lock left behind by a dead trainer is simply taken
over; the file only keeps the holder's pid, host and start time for the refusal message. On a filesystem
without ``flock`` (Lustre mounted ``noflock``) the file's record alone decides: a live pid on this host, or any
record from another host, refuses, with the path to delete once that trainer is gone.

A second trainer is refused on every rank before it writes anything (rank 0 tries the lock, and the answer is
reduced over the world, so all ranks stop together and the job exits instead of hanging).
"""
from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import time
from typing import Optional

from megatron_mtp.errors import RunLockError

LOCK_NAME = "trainer.lock"
_NO_FLOCK = (errno.ENOLCK, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL)

# realpath of a lock file -> the descriptor holding it. A process that already holds a run directory's lock
# (an in-process train() that raised before releasing it) takes it again rather than refusing itself: flock
# locks belong to open files, so a second open in the same process would conflict with the first.
_HELD: dict = {}


def _describe(record: dict) -> str:
    when = record.get("started")
    since = f", started {time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime(when))}" if when else ""
    return f"pid {record.get('pid', '?')} on host {record.get('host', '?')}{since}"


def _read_record(fd: int) -> dict:
    try:
        os.lseek(fd, 0, os.SEEK_SET)
        raw = os.read(fd, 4096)
        record = json.loads(raw.decode("utf-8")) if raw.strip() else {}
        return record if isinstance(record, dict) else {}
    except (OSError, ValueError):  # a torn or foreign file: no details to give
        return {}


def _write_record(fd: int) -> None:
    os.lseek(fd, 0, os.SEEK_SET)
    os.ftruncate(fd, 0)
    os.write(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "started": time.time()}).encode())
    os.fsync(fd)


def _alive_here(record: dict) -> bool:
    """Without flock: does the record name a live process (this host) or one we cannot check (another host)?"""
    if not record:
        return False
    if record.get("host") != socket.gethostname():
        return True
    pid = record.get("pid")
    if not isinstance(pid, int) or pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, under another user
        return True
    return True


def acquire(run_dir: str) -> Optional[str]:
    """Take the run directory's lock for this process or raise RunLockError (one sentence). Returns a note
    when the lock was taken over from a trainer that is gone, else None."""
    os.makedirs(run_dir, exist_ok=True)
    path = os.path.join(run_dir, LOCK_NAME)
    key = os.path.realpath(path)
    if key in _HELD:
        return None
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        record = _read_record(fd)
        if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            os.close(fd)
            raise RunLockError(f"run directory {run_dir} is in use by another trainer ({_describe(record)}); stop "
                               f"that trainer or choose another train.run_dir.") from None
        if exc.errno not in _NO_FLOCK:
            os.close(fd)
            raise RunLockError(f"cannot lock run directory {run_dir} ({exc.strerror}); check that {path} is "
                               f"writable.") from None
        if _alive_here(record):
            os.close(fd)
            raise RunLockError(f"run directory {run_dir} is in use by another trainer ({_describe(record)}) as far "
                               f"as {path} says (this filesystem has no flock); stop that trainer, or delete "
                               f"{path} if it is gone.") from None
    previous = _read_record(fd)
    _write_record(fd)
    _HELD[key] = fd
    if previous and previous.get("pid") != os.getpid():
        return f"took over the lock of {run_dir} from a trainer that is gone ({_describe(previous)})"
    return None


def release(run_dir: str) -> None:
    """Give the lock up. The file stays, emptied: a record left in it means its trainer died holding it."""
    key = os.path.realpath(os.path.join(run_dir, LOCK_NAME))
    fd = _HELD.pop(key, None)
    if fd is not None:
        try:
            os.ftruncate(fd, 0)
            fcntl.flock(fd, fcntl.LOCK_UN)
        except OSError:
            pass
        os.close(fd)


def lock_run_dir(run_dir: str, rank: int, device) -> None:
    """Global rank 0 takes the lock; every rank raises RunLockError if it could not (collective)."""
    import torch  # here, not at the top: the lock itself is plain POSIX and usable without torch
    import torch.distributed as dist

    error: Optional[RunLockError] = None
    if rank == 0:
        try:
            note = acquire(run_dir)
            if note:
                print(note, flush=True)
        except RunLockError as exc:
            error = exc
    refused = error is not None
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        flag = torch.tensor([1.0 if refused else 0.0], device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        refused = bool(flag.item())
    if error is not None:
        raise error
    if refused:
        raise RunLockError(f"run directory {run_dir} is in use by another trainer (global rank 0 says which).")
