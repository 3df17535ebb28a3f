"""Save and resume: a checkpoint directory per step, published only once every rank has written it.

Layout under ``<run_dir>/checkpoints``::

    step_00000010/            one complete checkpoint
        meta.json             step, layout, config and a manifest of every file with its size (written
                              last, by rank 0, after all ranks finished)
        rank_00000.pt ...     per rank: RNG states (python, numpy, torch, CUDA, TP tracker), data position,
                              the rank's place in the layout and the partition marks of its parameters
        (engine files)        written by the engine's ``save_to(dir)``: model and optimizer shards
    latest                    text file naming the newest complete checkpoint (the commit point)

Crash safety: ranks write into ``step_XXXXXXXX.partial``, fsync every file, barrier; rank 0 then writes
meta.json (with the manifest), renames the directory into place and finally replaces ``latest``
atomically (write a temporary file, fsync, rename, fsync the directory). A crash at any moment leaves the
previous checkpoint and pointer intact; leftover ``.partial`` directories are ignored and cleaned up.
Pruning (``checkpoint.keep_last``) renames a directory away before deleting it and never touches the one
``latest`` names.

Resume: the run's own ``checkpoints/latest`` wins (a requeued job continues where it stopped); otherwise
``checkpoint.load`` (a run directory, a ``checkpoints`` directory or one ``step_*`` directory). Exact
resume needs the same layout (tp, pp, world size); ``checkpoint.finetune`` (and weights-only checkpoints
such as imports) load the weights alone, from any layout, and start at step 0 with a fresh optimizer.
"""
from __future__ import annotations

import json
import os
import random
import shutil
import sys
from typing import Optional

import numpy as np
import torch
import torch.distributed as dist

from megatron_mtp.parallel import state

META = "meta.json"
POINTER = "latest"
FORMAT_VERSION = 2
# Model-shape keys a checkpoint must agree on with the config that loads it.
SHAPE_KEYS = (("vocab_size", "vocab_size"), ("hidden_size", "hidden_size"), ("num_layers", "num_layers"),
              ("num_attention_heads", "num_attention_heads"), ("num_kv_heads", "kv_heads"),
              ("ffn_hidden_size", "ffn_size"), ("tie_embeddings", "tie_embeddings"))


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be loaded; the message names it and the fix."""


# ---------------------------------------------------------------------------------------------------------
# Durable file writes


def _fsync_path(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:  # another rank renamed its temporary file away meanwhile
        return
    try:
        os.fsync(fd)
    except OSError:  # some filesystems refuse fsync on directories; the data files are what matter
        pass
    finally:
        os.close(fd)


_fsync_file = _fsync_path


def fsync_tree(path: str) -> None:
    """fsync every file and directory under ``path`` (what this node wrote reaches the disk)."""
    for root, dirs, files in os.walk(path):
        for name in files:
            _fsync_path(os.path.join(root, name))
        _fsync_path(root)


# Above this many ranks every rank fsyncing every file of the directory would hammer a parallel filesystem's
# metadata server; os.sync() flushes what this node wrote instead.
FSYNC_TREE_MAX_WORLD = 64


def flush_to_disk(path: str) -> None:
    if _world() <= FSYNC_TREE_MAX_WORLD:
        fsync_tree(path)
    else:
        os.sync()


def atomic_write_text(path: str, text: str) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_path(os.path.dirname(path) or ".")


def atomic_torch_save(obj, path: str) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


# ---------------------------------------------------------------------------------------------------------
# RNG


def rng_state() -> dict:
    from megatron_mtp.parallel.random import get_rng_tracker

    out = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
           "tracker": get_rng_tracker().get_states()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        out["cuda"] = torch.cuda.get_rng_state_all()
    return out


def set_rng_state(saved: dict) -> None:
    from megatron_mtp.parallel.random import get_rng_tracker

    random.setstate(saved["python"])
    np.random.set_state(saved["numpy"])
    torch.set_rng_state(saved["torch"])
    if saved.get("tracker") is not None:
        get_rng_tracker().set_states(saved["tracker"])
    if "cuda" in saved and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(saved["cuda"])


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


# ---------------------------------------------------------------------------------------------------------
# Finding and checking checkpoints


def step_dir_name(step: int) -> str:
    return f"step_{step:08d}"


def _step_of(name: str) -> Optional[int]:
    if not name.startswith("step_"):
        return None
    digits = name[5:]
    return int(digits) if digits.isdigit() else None


def complete_checkpoints(root: str) -> list:
    """(step, path) of every published-looking ``step_*`` directory under ``root``, by step."""
    out = []
    if not os.path.isdir(root):
        return out
    for name in os.listdir(root):
        step = _step_of(name)
        if step is not None and os.path.isfile(os.path.join(root, name, META)):
            out.append((step, os.path.join(root, name)))
    return sorted(out)


def _recover_replaced(root: str, name: str) -> None:
    """A crash while re-saving the step ``latest`` names can leave it moved aside as ``<name>.old``:
    put it back (the new copy never got published)."""
    path, old = os.path.join(root, name), os.path.join(root, name + ".old")
    if not os.path.exists(path) and os.path.isfile(os.path.join(old, META)):
        os.replace(old, path)


def latest_checkpoint(root: str) -> Optional[str]:
    """The newest complete checkpoint under ``root`` (a run's ``checkpoints/``), or None if it holds none.

    ``latest`` is authoritative. Without it, the newest complete ``step_*`` directory is used (a crash
    between publishing a directory and writing the first pointer, or a pointer deleted by hand)."""
    pointer = os.path.join(root, POINTER)
    if not os.path.isfile(pointer):
        found = complete_checkpoints(root)
        return found[-1][1] if found else None
    with open(pointer) as f:
        name = f.read().strip()
    try:
        _recover_replaced(root, name)
    except OSError:
        pass
    path = os.path.join(root, name)
    if not name or not os.path.isfile(os.path.join(path, META)):
        raise CheckpointError(
            f"{pointer} names {name or '(nothing)'!r}, which is missing or incomplete; restore that directory, "
            f"or delete the pointer to resume from the newest complete step_* directory.")
    return path


def resolve_checkpoint(path: str) -> str:
    """A run directory, a ``checkpoints`` directory or one checkpoint -> that checkpoint's directory."""
    if not os.path.exists(path):
        raise CheckpointError(f"checkpoint path {path!r} does not exist; pass a run directory, its checkpoints/ "
                              f"directory or a step_* directory.")
    if os.path.isfile(os.path.join(path, META)):
        return path
    if os.path.basename(os.path.normpath(path)).endswith(".partial"):
        raise CheckpointError(f"{path} is an unfinished save (a .partial directory); resume from a complete "
                              f"step_* directory instead.")
    if _step_of(os.path.basename(os.path.normpath(path))) is not None:
        raise CheckpointError(f"checkpoint {path} has no {META}, so it was never completed; resume from another "
                              f"step_* directory or the run directory.")
    for root in (os.path.join(path, "checkpoints"), path):
        if os.path.isdir(root):
            found = latest_checkpoint(root)
            if found:
                return found
    raise CheckpointError(f"no complete checkpoint found at {path!r}; pass a run directory or a step_* directory "
                          f"that contains {META}.")


def read_meta(ckpt_dir: str) -> dict:
    path = os.path.join(ckpt_dir, META)
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint {ckpt_dir} has no {META}, so it was never completed; use another "
                              f"step_* directory.") from None
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise CheckpointError(f"checkpoint {ckpt_dir} has a corrupt {META}; use another step_* directory.") from None


def manifest(ckpt_dir: str) -> dict:
    """relative path -> size in bytes of every file under a checkpoint directory (meta.json excluded)."""
    files = {}
    for root, _, names in os.walk(ckpt_dir):
        for name in names:
            full = os.path.join(root, name)
            rel = os.path.relpath(full, ckpt_dir)
            if rel == META or ".tmp" in name:
                continue
            files[rel] = os.path.getsize(full)
    return dict(sorted(files.items()))


def verify_checkpoint(ckpt_dir: str, meta: Optional[dict] = None) -> dict:
    """Check every file the manifest lists is there with its size; return the meta."""
    meta = meta if meta is not None else read_meta(ckpt_dir)
    for rel, size in (meta.get("files") or {}).items():
        path = os.path.join(ckpt_dir, rel)
        if not os.path.isfile(path):
            raise CheckpointError(f"checkpoint {ckpt_dir} is missing {rel}; it is incomplete, so resume from an "
                                  f"earlier step_* directory (or restore the file).")
        actual = os.path.getsize(path)
        if actual != size:
            raise CheckpointError(f"checkpoint {ckpt_dir} has a torn file {rel} ({actual} bytes, {size} expected); "
                                  f"resume from an earlier step_* directory (or restore the file).")
    return meta


def load_file(path: str, ckpt_dir: str, mmap: bool = False):
    """torch.load with a one-sentence error for missing or damaged files."""
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint {ckpt_dir} is missing {os.path.relpath(path, ckpt_dir)}; it is "
                              f"incomplete, so use an earlier step_* directory (or restore the file).")
    try:
        return torch.load(path, map_location="cpu", weights_only=False, mmap=mmap)
    except Exception as exc:  # zip/pickle errors of a truncated or corrupt file
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise CheckpointError(f"checkpoint {ckpt_dir} has a damaged file {os.path.relpath(path, ckpt_dir)} "
                              f"({first}); use an earlier step_* directory.") from None


def check_model_shape(ckpt_dir: str, meta: dict, cfg) -> None:
    """The saved model shape must be the configured one; name the first key that differs."""
    import dataclasses

    from megatron_mtp.config import ModelConfig

    saved = (meta.get("config") or {}).get("model") or {}
    known = {f.name for f in dataclasses.fields(ModelConfig)}
    try:
        theirs = ModelConfig(**{k: v for k, v in saved.items() if k in known})
    except TypeError:
        return
    ours = cfg.model
    for key, attr in SHAPE_KEYS:
        a, b = getattr(theirs, attr), getattr(ours, attr)
        if a != b:
            raise CheckpointError(
                f"checkpoint {ckpt_dir} holds a model with model.{key}={a} but the config has {b}; use the config "
                f"the checkpoint was saved with (its meta.json or config.yaml).")
    saved_mtp = (meta.get("config") or {}).get("mtp") or {}
    for key in ("n_heads", "head_type"):
        if key in saved_mtp and saved_mtp[key] != getattr(cfg.mtp, key):
            raise CheckpointError(
                f"checkpoint {ckpt_dir} holds a model with mtp.{key}={saved_mtp[key]} but the config has "
                f"{getattr(cfg.mtp, key)}; use the config the checkpoint was saved with (its meta.json).")


def _world() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def _say(msg: str) -> None:
    print(msg, flush=True)


def _warn(msg: str) -> None:
    print(f"WARNING: {msg}", file=sys.stderr, flush=True)


def optimizer_keys(engine) -> Optional[list]:
    """init_keys of the engine's torch optimizer's parameters, group by group (the numbering of its
    state_dict), or None when its groups hold something else (ZeRO's flat partitions)."""
    opt, model = getattr(engine, "optimizer", None), getattr(engine, "model", None)
    if opt is None or model is None or not hasattr(opt, "param_groups"):
        return None
    keys = {id(p): getattr(p, "init_key", None) for p in model.parameters()}
    out = []
    for group in opt.param_groups:
        names = [keys.get(id(p)) for p in group["params"]]
        if any(k is None for k in names):
            return None
        out.append(names)
    return out


# ---------------------------------------------------------------------------------------------------------


class CheckpointManager:
    def __init__(self, cfg, engine, rank: int):
        self.cfg, self.engine, self.rank = cfg, engine, rank
        self.root = os.path.join(cfg.train.run_dir, "checkpoints")
        self._last_saved: Optional[int] = None

    # ---- saving

    def due(self, step: int) -> bool:
        interval = self.cfg.checkpoint.interval
        return bool(self.cfg.checkpoint.save and interval and step % interval == 0)

    def saved_at(self, step: int) -> bool:
        return self._last_saved == step

    def _rank_payload(self, step: int, train_iter) -> dict:
        s = state.get_state()
        model = getattr(self.engine, "model", None)
        params = []
        if model is not None:
            from megatron_mtp.checkpoint.universal import marks_of

            params = [dict(name=name, **marks_of(p)) for name, p in model.named_parameters()
                      if getattr(p, "init_key", None) is not None]
        return {"step": step, "rng": rng_state(), "consumed_samples": int(train_iter.consumed_samples),
                "coords": {"tp_rank": s.tp_rank, "pp_rank": s.pp_rank, "dp_rank": s.dp_rank},
                "params": params, "optimizer_keys": optimizer_keys(self.engine)}

    def save(self, step: int, train_iter) -> str:
        name = step_dir_name(step)
        final = os.path.join(self.root, name)
        partial = final + ".partial"
        if self.rank == 0:
            os.makedirs(self.root, exist_ok=True)
            if os.path.isdir(partial):
                shutil.rmtree(partial)
            os.makedirs(partial)
        _barrier()
        self.engine.save_to(partial)
        atomic_torch_save(self._rank_payload(step, train_iter), os.path.join(partial, f"rank_{self.rank:05d}.pt"))
        flush_to_disk(partial)  # what this rank wrote (engine files included) is on disk before the barrier
        _barrier()
        if self.rank == 0:
            self._publish(step, partial, final)
        _barrier()
        self._last_saved = step
        return final

    def _publish(self, step: int, partial: str, final: str) -> None:
        s = state.get_state()
        meta = {"format": FORMAT_VERSION, "step": step, "tp": s.tp, "pp": s.pp, "dp": s.dp, "world_size": _world(),
                "engine": type(self.engine).__name__, "weights_only": False,
                "config": self.cfg.to_dict(), "files": manifest(partial)}
        atomic_write_text(os.path.join(partial, META), json.dumps(meta, indent=1))
        _fsync_path(partial)
        name = os.path.basename(final)
        old = None
        if os.path.isdir(final):  # the same step saved again: move the old copy aside until the pointer moves
            old = final + ".old"
            if os.path.isdir(old):
                shutil.rmtree(old)
            os.replace(final, old)
        os.replace(partial, final)
        _fsync_path(self.root)
        atomic_write_text(os.path.join(self.root, POINTER), name)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        self._prune(step)

    def _prune(self, published: int) -> None:
        """Keep the newest ``keep_last`` checkpoints up to the one just published; drop leftovers."""
        keep = self.cfg.checkpoint.keep_last
        older = [(s, p) for s, p in complete_checkpoints(self.root) if s <= published]
        for _, path in older[:-keep] if keep else []:
            doomed = path + ".deleting"
            try:
                os.replace(path, doomed)  # vanishes atomically from readers' view, then is deleted
            except OSError:
                continue
            shutil.rmtree(doomed, ignore_errors=True)
        for name in os.listdir(self.root):
            # (a ".old" copy is stale once a pointer names an existing directory, as it does after publishing)
            if name.endswith((".partial", ".deleting", ".old")) or ".tmp" in name:
                path = os.path.join(self.root, name)
                if os.path.isdir(path):
                    shutil.rmtree(path, ignore_errors=True)
                else:
                    try:
                        os.remove(path)
                    except OSError:
                        pass

    # ---- resuming

    def _source(self) -> tuple:
        """(checkpoint dir or None, whether it is the run's own). The run's own latest checkpoint wins, so a
        requeued job continues; ``checkpoint.load`` starts a fresh run, or rolls back when it names one of
        the run's own checkpoints."""
        own = latest_checkpoint(self.root) if os.path.isdir(self.root) else None
        load = self.cfg.checkpoint.load
        if not load:
            return own, own is not None
        root = os.path.realpath(self.root) + os.sep
        if own is not None and not os.path.realpath(load).startswith(root):
            if self.rank == 0:
                _say(f"{self.root} already holds checkpoints: continuing this run from {own} "
                     f"(checkpoint.load {load} is only where a fresh run starts)")
            return own, True
        wanted = resolve_checkpoint(load)
        return wanted, os.path.realpath(wanted).startswith(root)

    def resume(self, train_iter) -> int:
        """Load the run's latest or the configured checkpoint (if any); return the step to continue from."""
        ckpt_dir, own = self._source()
        if ckpt_dir is None:
            return 0
        meta = verify_checkpoint(ckpt_dir)
        check_model_shape(ckpt_dir, meta, self.cfg)
        weights_only = bool(meta.get("weights_only")) or (self.cfg.checkpoint.finetune and not own)
        if weights_only:
            self._load_weights_only(ckpt_dir, meta)
            self._last_saved = None
            return 0
        s = state.get_state()
        world = _world()
        same_layout = (meta["tp"], meta["pp"], meta["world_size"]) == (s.tp, s.pp, world)
        payload = load_file(os.path.join(ckpt_dir, f"rank_{self.rank:05d}.pt"), ckpt_dir) if same_layout else None
        if meta.get("engine") == "Universal":
            self._load_universal(ckpt_dir, meta)
        else:
            if not same_layout:
                raise CheckpointError(
                    f"checkpoint {ckpt_dir} was saved at tp={meta['tp']} pp={meta['pp']} world size "
                    f"{meta['world_size']} but this run is tp={s.tp} pp={s.pp} world size {world}; convert it with "
                    f"tools/reshard_checkpoint.py, or pass --checkpoint.finetune true to load only its weights.")
            saved_engine = meta.get("engine")
            if saved_engine and saved_engine != type(self.engine).__name__:
                raise CheckpointError(
                    f"checkpoint {ckpt_dir} was written by {saved_engine} but this run uses "
                    f"{type(self.engine).__name__}; keep the parallel settings it was saved with or convert it "
                    f"with tools/reshard_checkpoint.py.")
            has_optimizer = bool(meta.get("has_optimizer", True))
            self._engine_load(ckpt_dir, load_optimizer=has_optimizer)
            if not has_optimizer and self.rank == 0:
                _warn(f"checkpoint {ckpt_dir} holds no optimizer state: training continues at its step with "
                      f"freshly initialised Adam moments.")
        if payload is None:  # a converted checkpoint: step and data position are the same on every rank
            payload = load_file(os.path.join(ckpt_dir, "rank_00000.pt"), ckpt_dir)
        if payload.get("rng") is not None and same_layout:
            set_rng_state(payload["rng"])
        train_iter.consumed_samples = int(payload["consumed_samples"])
        step = int(payload["step"])
        saved_iters = ((meta.get("config") or {}).get("train") or {}).get("iters")
        if self.rank == 0:
            _say(f"resumed from {ckpt_dir} at step {step}")
            if saved_iters is not None and saved_iters != self.cfg.train.iters:
                _warn(f"train.iters changed from {saved_iters} to {self.cfg.train.iters}: the data order (and the "
                      f"LR schedule unless optimizer.decay_iters is set) differ from the saved run's, so this "
                      f"is not an exact continuation.")
            if own:
                self._trim_metrics(step)
        _barrier()
        self._last_saved = step if own else None
        return step

    def _engine_load(self, ckpt_dir: str, load_optimizer: bool) -> None:
        try:
            self.engine.load_from(ckpt_dir, load_optimizer=load_optimizer)
        except CheckpointError:
            raise
        except FileNotFoundError as exc:
            missing = os.path.relpath(exc.filename, ckpt_dir) if getattr(exc, "filename", None) else str(exc)
            raise CheckpointError(f"checkpoint {ckpt_dir} is missing {missing}; it is incomplete, so resume from an "
                                  f"earlier step_* directory.") from None
        except (RuntimeError, KeyError, ValueError, EOFError) as exc:
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise CheckpointError(f"checkpoint {ckpt_dir} does not fit this model or cannot be read ({first}); "
                                  f"use the config it was saved with (see its meta.json).") from None

    def _copy_weights(self, ckpt_dir: str, reader) -> None:
        """Every rank takes its shard of the reader's full tensors (any source layout)."""
        from megatron_mtp.checkpoint.universal import copy_into_model, copy_into_params

        loader = getattr(self.engine, "load_full_weights", None)
        try:
            if loader is not None:
                loader(reader.weight)
            else:
                copy_into_model(self.engine.model, reader.weight)
                masters = getattr(getattr(self.engine, "optimizer", None), "masters", None)
                if masters:  # LocalEngine's bf16 regime: its fp32 masters take the fp32 values
                    copy_into_params(((str(i), m) for i, m in enumerate(masters)), reader.weight)
                # DeepSpeed's mixed-precision optimizers keep fp32 master copies: refresh them from the module.
                ds_opt = getattr(getattr(self.engine, "engine", None), "optimizer", None)
                if ds_opt is not None and hasattr(ds_opt, "refresh_fp32_params"):
                    ds_opt.refresh_fp32_params()
        except (RuntimeError, KeyError) as exc:
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise CheckpointError(f"checkpoint {ckpt_dir} does not fit this model ({first}); use the config "
                                  f"it was saved with (see its meta.json).") from None

    def _load_universal(self, ckpt_dir: str, meta: dict) -> None:
        """A layout-independent checkpoint (tools/reshard_checkpoint.py): weights and Adam moments cut for this
        rank; step and data position from the payload; RNG only where the layout is the one it names."""
        from megatron_mtp.checkpoint.formats import open_checkpoint
        from megatron_mtp.checkpoint.universal import inject_optimizer_state

        reader = open_checkpoint(ckpt_dir, meta)
        self._copy_weights(ckpt_dir, reader)
        optim = reader.optimizer_state()
        ok = inject_optimizer_state(getattr(self.engine, "optimizer", None), self.engine.model, optim)
        if not ok and self.rank == 0:
            why = "it holds none" if optim is None else "this engine's optimizer is sharded by ZeRO"
            _warn(f"optimizer state of {ckpt_dir} was NOT restored ({why}): training continues at its step with "
                  f"freshly initialised Adam moments, so the next steps differ from an uninterrupted run.")

    def _load_weights_only(self, ckpt_dir: str, meta: dict) -> None:
        """Weights only, from any layout: the engine's own loader when the layout matches, else through the
        layout-independent reader (every rank takes its shard of the full tensors)."""
        s = state.get_state()
        same = (meta["tp"], meta["pp"], meta["world_size"], meta.get("engine")) == (
            s.tp, s.pp, _world(), type(self.engine).__name__)
        if same and not meta.get("weights_only"):
            try:
                self.engine.load_from(ckpt_dir, load_optimizer=False)
            except (RuntimeError, KeyError, ValueError, EOFError, FileNotFoundError) as exc:
                first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
                raise CheckpointError(f"checkpoint {ckpt_dir} does not fit this model ({first}); use the config "
                                      f"it was saved with (see its meta.json).") from None
        else:
            from megatron_mtp.checkpoint.formats import open_checkpoint

            self._copy_weights(ckpt_dir, open_checkpoint(ckpt_dir, meta))
        if self.rank == 0:
            _say(f"loaded weights from {ckpt_dir} (step {meta.get('step', 0)}); starting at step 0 with a fresh "
                 f"optimizer")
        _barrier()

    def _trim_metrics(self, step: int) -> None:
        """Records logged after the checkpoint (by the run that crashed) are dropped: the resumed run logs
        those steps again, so metrics.jsonl keeps one record per step."""
        path = os.path.join(self.cfg.train.run_dir, "metrics.jsonl")
        if not os.path.isfile(path):
            return
        kept, dropped = [], 0
        with open(path) as f:
            for line in f:
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:  # a line torn by the crash
                    dropped += 1
                    continue
                if int(record.get("step", 0)) <= step:
                    kept.append(line if line.endswith("\n") else line + "\n")
                else:
                    dropped += 1
        if dropped:
            atomic_write_text(path, "".join(kept))
