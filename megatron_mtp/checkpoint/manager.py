"""Save and resume: a checkpoint directory per step, published only once every rank has written it.

What is saved comes from three components, each saving and loading its own state (torchtitan's
CheckpointManager shape): the **engine** (``training.engine.Engine``: its model and optimizer files via
``save_to`` / ``load_from``, or canonical weights and Adam moments from another layout via
``load_full_weights`` / ``load_full_optimizer_state``), the **data iterator** (``state_dict()``: the
consumed-sample count) and the **RNG** streams (``parallel.random.RNGStates``). The last two go into
each rank's ``rank_XXXXX.pt`` with the step and the rank's place in the layout. The directory layout,
``meta.json`` and checks are ``store.py``'s.

Crash safety: ranks write into ``step_XXXXXXXX.partial``, fsync every file, barrier; the ranks split the
SHA-256 of the files between them; rank 0 then writes meta.json (with the manifest), renames the directory
into place and finally replaces ``latest`` atomically. A crash at any moment leaves the previous checkpoint
and pointer intact; leftover ``.partial`` directories are ignored and cleaned up. Pruning
(``checkpoint.keep_last``) renames a directory away before deleting it and never touches the one ``latest``
names.

Resume: the run's own ``checkpoints/latest`` wins (a requeued job continues where it stopped); otherwise
``checkpoint.load`` (a run directory, a ``checkpoints`` directory or one ``step_*`` directory). Exact
resume needs the same layout (tp, pp, world size); ``checkpoint.finetune`` (and weights-only checkpoints
such as imports) load the weights alone, from any layout, and start at step 0 with a fresh optimizer.
Every file is verified (size, SHA-256) before anything loads, and nothing loaded can run code.
"""
from __future__ import annotations

import json
import os
import shutil
import sys
from typing import Optional

import torch.distributed as dist

from megatron_mtp.checkpoint.formats import open_checkpoint
# (names the tools and tests import from here are re-exported: the store's helpers, the atomic writers)
from megatron_mtp.checkpoint.store import (FORMAT_VERSION, META, POINTER, SHAPE_KEYS,  # noqa: F401
                                           SKIP_CHECKSUMS_ENV, UNIVERSAL_FORMAT, check_model_shape,
                                           checksums_skipped, complete_checkpoints, digests, engine_format,
                                           latest_checkpoint, load_file, manifest, read_meta, resolve_checkpoint,
                                           step_dir_name, unsafe_file_error, verify_checkpoint)
from megatron_mtp.errors import CheckpointError
from megatron_mtp.io_utils import (TMP_MARK, UnsafeFileError, atomic_torch_save, atomic_write_text,  # noqa: F401
                                   fsync_path, fsync_tree)
from megatron_mtp.parallel import state
from megatron_mtp.parallel.random import RNGStates

# Above this many ranks every rank fsyncing every file of the directory would hammer a parallel filesystem's
# metadata server; os.sync() flushes what this node wrote instead.
FSYNC_TREE_MAX_WORLD = 64


def _world() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _all_gather(obj) -> list:
    if not dist.is_initialized() or _world() == 1:
        return [obj]
    out = [None] * _world()
    dist.all_gather_object(out, obj)
    return out


def flush_to_disk(path: str) -> None:
    if _world() <= FSYNC_TREE_MAX_WORLD:
        fsync_tree(path)
    else:
        os.sync()


def _say(msg: str) -> None:
    print(msg, flush=True)


def _warn(msg: str) -> None:
    print(f"WARNING: {msg}", file=sys.stderr, flush=True)


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


class CheckpointManager:
    def __init__(self, cfg, engine, rank: int):
        self.cfg, self.engine, self.rank = cfg, engine, rank
        self.root = os.path.join(cfg.train.run_dir, "checkpoints")
        self.rng = RNGStates()
        self._last_saved: Optional[int] = None

    # ---- saving

    def due(self, step: int) -> bool:
        interval = self.cfg.checkpoint.interval
        return bool(self.cfg.checkpoint.save and interval and step % interval == 0)

    def saved_at(self, step: int) -> bool:
        return self._last_saved == step

    def _rank_payload(self, step: int, data_iter) -> dict:
        s = state.get_state()
        return {"step": step, "rng": self.rng.state_dict(), **data_iter.state_dict(),
                "coords": {"tp_rank": s.tp_rank, "pp_rank": s.pp_rank, "dp_rank": s.dp_rank},
                "params": self.engine.parameter_marks(), "optimizer_keys": self.engine.optimizer_keys()}

    def save(self, step: int, data_iter) -> str:
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
        atomic_torch_save(self._rank_payload(step, data_iter), os.path.join(partial, f"rank_{self.rank:05d}.pt"))
        flush_to_disk(partial)  # what this rank wrote (engine files included) is on disk before the barrier
        _barrier()
        files = manifest(partial)
        sums: Optional[dict] = None
        if checksums_skipped():
            if self.rank == 0:
                _warn(f"{SKIP_CHECKSUMS_ENV} is set: checkpoint {final} is saved WITHOUT SHA-256 checksums, so "
                      f"corruption of its files cannot be detected when it is loaded.")
        else:
            sums = {}
            for part in _all_gather(digests(partial, sorted(files)[self.rank::_world()])):
                sums.update(part)
        if self.rank == 0:
            self._publish(step, partial, final, files, sums)
        _barrier()
        self._last_saved = step
        return final

    def _publish(self, step: int, partial: str, final: str, files: dict, sums: Optional[dict]) -> None:
        s = state.get_state()
        meta = {"format": FORMAT_VERSION, "step": step, "tp": s.tp, "pp": s.pp, "dp": s.dp, "world_size": _world(),
                "engine": self.engine.checkpoint_format, "weights_only": False,
                "config": self.cfg.to_dict(), "files": files}
        if sums is not None:
            meta["sha256"] = dict(sorted(sums.items()))
        atomic_write_text(os.path.join(partial, META), json.dumps(meta, indent=1))
        fsync_path(partial)
        name = os.path.basename(final)
        old = None
        if os.path.isdir(final):  # the same step saved again: move the old copy aside until the pointer moves
            old = final + ".old"
            if os.path.isdir(old):
                shutil.rmtree(old)
            os.replace(final, old)
        os.replace(partial, final)
        fsync_path(self.root)
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
            if name.endswith((".partial", ".deleting", ".old")) or TMP_MARK in name:
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

    def _verify(self, ckpt_dir: str) -> dict:
        """Sizes on every rank; the SHA-256s split over the ranks, and every rank raises the same error."""
        meta = verify_checkpoint(ckpt_dir, checksums=False)
        try:
            verify_checkpoint(ckpt_dir, meta, share=(self.rank, _world()))
            problem = None
        except CheckpointError as exc:
            problem = str(exc)
        problems = [p for p in _all_gather(problem) if p]
        if problems:
            raise CheckpointError(problems[0])
        return meta

    def resume(self, data_iter) -> int:
        """Load the run's latest or the configured checkpoint (if any); return the step to continue from."""
        ckpt_dir, own = self._source()
        if ckpt_dir is None:
            return 0
        meta = self._verify(ckpt_dir)
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
        saved_format = engine_format(meta)
        if saved_format == UNIVERSAL_FORMAT:
            self._load_universal(ckpt_dir, meta)
        else:
            if not same_layout:
                raise CheckpointError(
                    f"checkpoint {ckpt_dir} was saved at tp={meta['tp']} pp={meta['pp']} world size "
                    f"{meta['world_size']} but this run is tp={s.tp} pp={s.pp} world size {world}; convert it with "
                    f"tools/reshard_checkpoint.py, or pass --checkpoint.finetune true to load only its weights.")
            if saved_format != self.engine.checkpoint_format:
                raise CheckpointError(
                    f"checkpoint {ckpt_dir} holds {saved_format} engine files but this run's engine writes "
                    f"{self.engine.checkpoint_format}; keep the parallel settings it was saved with or convert it "
                    f"with tools/reshard_checkpoint.py.")
            has_optimizer = bool(meta.get("has_optimizer", True))
            self._engine_load(ckpt_dir, load_optimizer=has_optimizer)
            if not has_optimizer and self.rank == 0:
                _warn(f"checkpoint {ckpt_dir} holds no optimizer state: training continues at its step with "
                      f"freshly initialised Adam moments.")
        if payload is None:  # a converted checkpoint: step and data position are the same on every rank
            payload = load_file(os.path.join(ckpt_dir, "rank_00000.pt"), ckpt_dir)
        if payload.get("rng") is not None and same_layout:
            self.rng.load_state_dict(payload["rng"])
        data_iter.load_state_dict({"consumed_samples": int(payload["consumed_samples"])})
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
        except UnsafeFileError as exc:
            raise unsafe_file_error(ckpt_dir, exc) from None
        except FileNotFoundError as exc:
            missing = os.path.relpath(exc.filename, ckpt_dir) if getattr(exc, "filename", None) else str(exc)
            raise CheckpointError(f"checkpoint {ckpt_dir} is missing {missing}; it is incomplete, so resume from an "
                                  f"earlier step_* directory.") from None
        except (RuntimeError, KeyError, ValueError, EOFError) as exc:
            raise CheckpointError(f"checkpoint {ckpt_dir} does not fit this model or cannot be read "
                                  f"({_first_line(exc)}); use the config it was saved with (see its meta.json)."
                                  ) from None

    def _copy_weights(self, ckpt_dir: str, reader) -> None:
        """Every rank takes its shard of the reader's full tensors (any source layout)."""
        try:
            self.engine.load_full_weights(reader.weight)
        except (RuntimeError, KeyError) as exc:
            raise CheckpointError(f"checkpoint {ckpt_dir} does not fit this model ({_first_line(exc)}); use the "
                                  f"config it was saved with (see its meta.json).") from None

    def _load_universal(self, ckpt_dir: str, meta: dict) -> None:
        """A layout-independent checkpoint (tools/reshard_checkpoint.py): weights and Adam moments cut for this
        rank; step and data position from the payload; RNG only where the layout is the one it names."""
        reader = open_checkpoint(ckpt_dir, meta, hash_files=False)  # resume verified every file already
        self._copy_weights(ckpt_dir, reader)
        optim = reader.optimizer_state()
        ok = self.engine.load_full_optimizer_state(optim)
        if not ok and self.rank == 0:
            why = "it holds none" if optim is None else "this engine's optimizer is sharded by ZeRO"
            _warn(f"optimizer state of {ckpt_dir} was NOT restored ({why}): training continues at its step with "
                  f"freshly initialised Adam moments, so the next steps differ from an uninterrupted run.")

    def _load_weights_only(self, ckpt_dir: str, meta: dict) -> None:
        """Weights only, from any layout: the engine's own loader when the layout matches, else through the
        layout-independent reader (every rank takes its shard of the full tensors)."""
        s = state.get_state()
        same = (meta["tp"], meta["pp"], meta["world_size"], engine_format(meta)) == (
            s.tp, s.pp, _world(), self.engine.checkpoint_format)
        if same and not meta.get("weights_only"):
            try:
                self.engine.load_from(ckpt_dir, load_optimizer=False)
            except UnsafeFileError as exc:
                raise unsafe_file_error(ckpt_dir, exc) from None
            except (RuntimeError, KeyError, ValueError, EOFError, FileNotFoundError) as exc:
                raise CheckpointError(f"checkpoint {ckpt_dir} does not fit this model ({_first_line(exc)}); use "
                                      f"the config it was saved with (see its meta.json).") from None
        else:
            self._copy_weights(ckpt_dir, open_checkpoint(ckpt_dir, meta, hash_files=False))
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
