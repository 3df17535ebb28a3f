"""Files on disk: the one atomic writer, fsync helpers, SHA-256 digests and the safe tensor loader.

Atomic writes (``atomic_write`` and its text / JSON / bytes / torch / safetensors forms): the content goes
to a temporary file next to the target, which is flushed and fsynced, renamed over the target
(``os.replace`` is atomic on POSIX), and then the directory is fsynced so the rename itself survives a power
cut. A reader sees either the old file or the new one, never a half-written one; a crash leaves at most a
``<name>.tmp<pid>`` file, which is removed when the write fails in-process.

Loading (``load_torch``): ``torch.load(weights_only=True)``. Pickle can run any code while it loads; the
weights-only unpickler builds only tensors, containers, numbers and strings plus a short allow-list
(numpy's RNG state arrays, and the plain data holders DeepSpeed puts in its optimizer files, registered by
``training/ds_compat.py`` through ``allow_globals``), so a hostile checkpoint cannot execute anything.

This module sits at the bottom of the package: it imports nothing from megatron_mtp. torch and safetensors
are imported by the three functions that need them, not at module level: the data layer writes through this
module too, and its preprocessing workers (spawned, one per core) start in a fraction of a second without torch.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import pickle
import re
from typing import Callable

import numpy as np

TMP_MARK = ".tmp"  # temporary files are named <target>.tmp<pid>; checkpoint manifests skip them


def fsync_path(path: str) -> None:
    """fsync a file or directory by path; quietly skips what vanished or cannot be fsynced (some
    filesystems refuse directories: the data files are what matter)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:  # another rank renamed its temporary file away meanwhile
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def fsync_tree(path: str) -> None:
    """fsync every file and directory under ``path`` (what this node wrote reaches the disk)."""
    for root, _, files in os.walk(path):
        for name in files:
            fsync_path(os.path.join(root, name))
        fsync_path(root)


def _replace_atomically(tmp: str, path: str, produce: Callable[[str], None]) -> None:
    """``produce(tmp)`` writes and fsyncs the temporary file; it then replaces ``path`` and the directory
    entry is fsynced. A failure removes the temporary file and re-raises."""
    try:
        produce(tmp)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise
    fsync_path(os.path.dirname(os.path.abspath(path)))


def atomic_write(path: str, write: Callable, mode: str = "wb") -> None:
    """Write ``path`` atomically: ``write(f)`` fills a temporary file opened with ``mode``."""

    def produce(tmp: str) -> None:
        with open(tmp, mode) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())

    _replace_atomically(f"{path}{TMP_MARK}{os.getpid()}", path, produce)


def atomic_write_text(path: str, text: str) -> None:
    atomic_write(path, lambda f: f.write(text), mode="w")


def atomic_write_bytes(path: str, data: bytes) -> None:
    atomic_write(path, lambda f: f.write(data))


def atomic_write_json(path: str, obj, indent=1) -> None:
    atomic_write_text(path, json.dumps(obj, indent=indent) + "\n")


def atomic_torch_save(obj, path: str) -> None:
    import torch

    atomic_write(path, lambda f: torch.save(obj, f))


def atomic_save_safetensors(tensors: dict, path: str, metadata=None) -> None:
    from safetensors.torch import save as safetensors_bytes

    atomic_write_bytes(path, safetensors_bytes(tensors, metadata=metadata))


def atomic_save_path(path: str, save: Callable[[str], None]) -> None:
    """For writers that only take a path (matplotlib's savefig, tokenizer libraries): ``save(tmp)``
    writes a temporary path, which is then fsynced and renamed over ``path``. The temporary name keeps
    ``path``'s extension, since such writers often pick the format from it."""
    root, ext = os.path.splitext(path)

    def produce(tmp: str) -> None:
        save(tmp)
        fsync_path(tmp)

    _replace_atomically(f"{root}{TMP_MARK}{os.getpid()}{ext}", path, produce)


def sha256_file(path: str, chunk: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            digest.update(block)
    return digest.hexdigest()


# ---------------------------------------------------------------------------------------------------------
# Weights-only loading


def _safe_globals() -> list:
    """Classes the weights-only unpickler may build besides tensors and plain containers: numpy's RNG state
    (``np.random.get_state()`` in every rank file), an ndarray of uint32 and its dtype. None of them runs
    code on construction beyond setting attributes."""
    out = [np.ndarray, np.dtype, type(np.dtype(np.uint32)), type(np.dtype(np.float32)), type(np.dtype(np.int64))]
    try:
        reconstruct = np._core.multiarray._reconstruct  # numpy >= 2
    except AttributeError:
        reconstruct = np.core.multiarray._reconstruct
    # numpy 1.x pickles name it numpy.core.multiarray._reconstruct: allow it under both names.
    return out + [reconstruct, (reconstruct, "numpy.core.multiarray._reconstruct")]


# Extra classes for files of a library that pickles its own plain data holders: global-name prefix ->
# a function returning the classes (called only when a file names one, so the library is imported only
# then). DeepSpeed's are registered by training/ds_compat.py.
_EXTRA_SAFE_GLOBALS: dict = {}


def allow_globals(prefix: str, classes: Callable[[], list]) -> None:
    """Let files naming globals under ``prefix`` (e.g. ``"deepspeed."``) load with ``classes()`` allowed."""
    _EXTRA_SAFE_GLOBALS[prefix] = classes


class UnsafeFileError(pickle.UnpicklingError):
    """A ``.pt`` file that holds Python objects other than tensors and plain data: loading it could run
    code, so it is refused. ``path`` names the file, ``global_name`` the first forbidden object."""

    def __init__(self, path: str, global_name: str):
        super().__init__(f"{path} holds {global_name or 'a Python object'}, which weights-only loading refuses")
        self.path, self.global_name = path, global_name


_GLOBAL = re.compile(r"GLOBAL ([\w.]+)")


def load_torch(path: str, mmap: bool = False, map_location="cpu"):
    """``torch.load`` that cannot run code (weights only, with the classes above). Raises
    ``UnsafeFileError`` for a file holding anything else."""
    import torch

    allowed, added = _safe_globals(), set()
    while True:
        try:
            with torch.serialization.safe_globals(allowed):
                return torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
        except pickle.UnpicklingError as exc:
            found = _GLOBAL.search(str(exc))
            name = found.group(1) if found else ""
            if not name:  # not a forbidden object: a truncated or damaged file
                raise
            prefix = next((p for p in _EXTRA_SAFE_GLOBALS if name.startswith(p) and p not in added), None)
            if prefix is None:
                raise UnsafeFileError(path, name) from None
            added.add(prefix)
            allowed = allowed + list(_EXTRA_SAFE_GLOBALS[prefix]())
