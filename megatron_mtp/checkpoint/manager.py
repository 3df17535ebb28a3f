"""Save and resume: a checkpoint directory per step, published only once every rank has written it.

Layout under ``<run_dir>/checkpoints``::

    step_00000010/            one complete checkpoint
        meta.json             step, layout, config (written last by rank 0)
        rank_00000.pt ...     per-rank RNG states and data position
        (engine files)        written by the engine's ``save_to(dir)``: model/optimizer shards
    latest                    text file naming the newest complete checkpoint

Crash safety: ranks write into ``step_XXXXXXXX.partial``, fsync, barrier; rank 0 then writes meta.json,
renames the directory into place and finally replaces ``latest`` atomically. A crash at any moment leaves
the previous checkpoint and pointer intact; leftover ``.partial`` directories are ignored and cleaned up.
"""
from __future__ import annotations

import json
import os
import random
import shutil
from typing import Optional

import numpy as np
import torch
import torch.distributed as dist

from megatron_mtp.parallel import state


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be loaded; the message names it and the fix."""


def _fsync_file(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_text(path: str, text: str) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_file(os.path.dirname(path) or ".")


def atomic_torch_save(obj, path: str) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def rng_state() -> dict:
    out = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        out["cuda"] = torch.cuda.get_rng_state_all()
    return out


def set_rng_state(saved: dict) -> None:
    random.setstate(saved["python"])
    np.random.set_state(saved["numpy"])
    torch.set_rng_state(saved["torch"])
    if "cuda" in saved and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(saved["cuda"])


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def step_dir_name(step: int) -> str:
    return f"step_{step:08d}"


def latest_checkpoint(root: str) -> Optional[str]:
    """The newest complete checkpoint directory under ``root`` (a run's ``checkpoints/``), or None."""
    pointer = os.path.join(root, "latest")
    if not os.path.isfile(pointer):
        return None
    with open(pointer) as f:
        name = f.read().strip()
    path = os.path.join(root, name)
    if not os.path.isfile(os.path.join(path, "meta.json")):
        raise CheckpointError(f"{pointer} names {name}, which is missing or incomplete; delete the pointer to "
                              f"start over or restore the checkpoint directory.")
    return path


def resolve_checkpoint(path: str) -> str:
    """A run directory, a ``checkpoints`` directory or one checkpoint -> that checkpoint's directory."""
    if os.path.isfile(os.path.join(path, "meta.json")):
        return path
    for root in (os.path.join(path, "checkpoints"), path):
        if os.path.isdir(root):
            found = latest_checkpoint(root)
            if found:
                return found
    raise CheckpointError(f"no complete checkpoint found at {path!r}; pass a run directory or a step_* directory "
                          f"that contains meta.json.")


def read_meta(ckpt_dir: str) -> dict:
    with open(os.path.join(ckpt_dir, "meta.json")) as f:
        return json.load(f)


class CheckpointManager:
    def __init__(self, cfg, engine, rank: int):
        self.cfg, self.engine, self.rank = cfg, engine, rank
        self.root = os.path.join(cfg.train.run_dir, "checkpoints")
        self._last_saved: Optional[int] = None

    def due(self, step: int) -> bool:
        interval = self.cfg.checkpoint.interval
        return bool(self.cfg.checkpoint.save and interval and step % interval == 0)

    def saved_at(self, step: int) -> bool:
        return self._last_saved == step

    def save(self, step: int, train_iter) -> str:
        final = os.path.join(self.root, step_dir_name(step))
        partial = final + ".partial"
        if self.rank == 0:
            os.makedirs(self.root, exist_ok=True)
            if os.path.isdir(partial):
                shutil.rmtree(partial)
            os.makedirs(partial)
        _barrier()
        self.engine.save_to(partial)
        payload = {"step": step, "rng": rng_state(), "consumed_samples": train_iter.consumed_samples}
        atomic_torch_save(payload, os.path.join(partial, f"rank_{self.rank:05d}.pt"))
        _barrier()
        if self.rank == 0:
            s = state.get_state()
            meta = {"step": step, "tp": s.tp, "pp": s.pp, "dp": s.dp,
                    "world_size": dist.get_world_size() if dist.is_initialized() else 1,
                    "engine": type(self.engine).__name__, "config": self.cfg.to_dict()}
            atomic_write_text(os.path.join(partial, "meta.json"), json.dumps(meta, indent=1))
            if os.path.isdir(final):
                shutil.rmtree(final)
            os.replace(partial, final)
            _fsync_file(self.root)
            atomic_write_text(os.path.join(self.root, "latest"), step_dir_name(step))
            self._prune()
        _barrier()
        self._last_saved = step
        return final

    def _prune(self) -> None:
        complete = sorted(d for d in os.listdir(self.root) if d.startswith("step_") and not d.endswith(".partial"))
        for name in complete[: -self.cfg.checkpoint.keep_last]:
            shutil.rmtree(os.path.join(self.root, name), ignore_errors=True)
        for name in os.listdir(self.root):
            if name.endswith(".partial"):
                shutil.rmtree(os.path.join(self.root, name), ignore_errors=True)

    def resume(self, train_iter) -> int:
        """Load the configured or latest checkpoint (if any); return the step to continue from."""
        source = self.cfg.checkpoint.load
        ckpt_dir = resolve_checkpoint(source) if source else latest_checkpoint(self.root) if os.path.isdir(self.root) else None
        if ckpt_dir is None:
            return 0
        meta = read_meta(ckpt_dir)
        s = state.get_state()
        world = dist.get_world_size() if dist.is_initialized() else 1
        if (meta["tp"], meta["pp"], meta["world_size"]) != (s.tp, s.pp, world):
            raise CheckpointError(
                f"checkpoint {ckpt_dir} was saved at tp={meta['tp']} pp={meta['pp']} world={meta['world_size']} "
                f"but this run is tp={s.tp} pp={s.pp} world={world}; convert it with tools/reshard_checkpoint.py.")
        path = os.path.join(ckpt_dir, f"rank_{self.rank:05d}.pt")
        if not os.path.isfile(path):
            raise CheckpointError(f"checkpoint {ckpt_dir} has no file for rank {self.rank} ({os.path.basename(path)}); "
                                  f"it is incomplete: resume from an earlier step_* directory.")
        payload = torch.load(path, map_location="cpu", weights_only=False)
        finetune = self.cfg.checkpoint.finetune
        try:
            self.engine.load_from(ckpt_dir, load_optimizer=not finetune)
        except (RuntimeError, KeyError) as exc:
            first = str(exc).strip().splitlines()[0]
            raise CheckpointError(f"checkpoint {ckpt_dir} does not fit this model config ({first}); "
                                  f"use the config it was saved with (see its meta.json).") from None
        if finetune:
            return 0
        set_rng_state(payload["rng"])
        train_iter.consumed_samples = payload["consumed_samples"]
        if self.rank == 0:
            print(f"resumed from {ckpt_dir} at step {payload['step']}", flush=True)
        return int(payload["step"])
