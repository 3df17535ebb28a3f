"""Reading and writing engine checkpoint files in the layout-independent form (see ``universal.py``).

A *reader* opens one checkpoint directory of any layout and engine and hands out canonical tensors:

* ``reader.weight(init_key)``       the full parameter (TP shards joined, vocabulary padding dropped);
* ``reader.optimizer_state()``      per init_key the full Adam moments (``exp_avg``, ``exp_avg_sq``) and
                                    the step count, plus the optimizer's hyper-parameters; None when the
                                    checkpoint holds no (usable) optimizer state;
* ``reader.payloads``               the per-rank RNG / data-position files, by global rank.

A *writer* produces the files an engine's ``load_from`` reads, for any layout (``write_checkpoint``).

Format ids (``store.py``): ``local-v1`` (LocalEngine, one process or one TP group: ``model_tpXX.pt`` = model
+ AdamW state), ``deepspeed-v1`` (DeepSpeed's own files, read by ``deepspeed_format.py``) and
``universal-v1`` (the layout-independent ``weights.pt`` + ``optimizer.pt`` that resharding writes for
DeepSpeed layouts). Format-2 checkpoints named them LocalEngine, DeepSpeedEngine and Universal.
"""
from __future__ import annotations

import copy
import json
import os
import shutil
from typing import Optional

import torch

from megatron_mtp.checkpoint.deepspeed_format import DeepSpeedReader
from megatron_mtp.checkpoint.reader import ADAM_STATES, Reader
from megatron_mtp.checkpoint.store import (DEEPSPEED_FORMAT, FORMAT_VERSION, LOCAL_FORMAT, META, POINTER,
                                           UNIVERSAL_FORMAT, digests, engine_format, manifest, read_meta,
                                           step_dir_name)
from megatron_mtp.checkpoint.universal import (build_meta_model, canonical, optimizer_order, padded_rows, param_infos,
                                               shard_for)
from megatron_mtp.errors import CheckpointError
from megatron_mtp.io_utils import atomic_torch_save, atomic_write_text, fsync_path, fsync_tree
from megatron_mtp.parallel.state import layout_coordinates
from megatron_mtp.training.engine import uses_deepspeed
from megatron_mtp.training.optimizer import build_optimizer


class LocalReader(Reader):
    """``model_tpXX.pt`` per TP rank: {"model": MTPModel state_dict, "optimizer": AdamW state_dict}."""

    def __init__(self, ckpt_dir: str, meta: Optional[dict] = None, hash_files: bool = True):
        super().__init__(ckpt_dir, meta, hash_files)
        self._files = None

    def _shards(self) -> list:
        if self._files is None:
            self._files = [self.load(os.path.join(self.dir, f"model_tp{r:02d}.pt"), mmap=True)
                           for r in range(self.tp)]
        return self._files

    def weight(self, key: str) -> torch.Tensor:
        info = self.infos.get(key)
        if info is None:
            raise KeyError(key)
        try:
            shards = [f["model"][info.name] for f in self._shards()]
        except KeyError:
            raise CheckpointError(f"checkpoint {self.dir} has no tensor {info.name} for its own config; it is "
                                  f"damaged or was written by another version.") from None
        if any(s.dtype != torch.float32 for s in shards):  # bf16 model: the fp32 masters are the weights
            masters = self._masters(key)
            if masters is not None:
                shards = masters
        return canonical([s.float() for s in shards], info)

    def _masters(self, key: str) -> Optional[list]:
        """TP shards of ``key``'s fp32 master weight (LocalEngine's bf16 regime keeps them in the optimizer
        state, ``master_weights``, in optimizer order), or None."""
        order = [k for group in optimizer_order(self.cfg) for k in group]
        if key not in order:
            return None
        idx = order.index(key)
        out = []
        for f in self._shards():
            masters = (f.get("optimizer") or {}).get("master_weights")
            if not masters or len(masters) != len(order):
                return None
            out.append(masters[idx])
        return out

    def optimizer_state(self) -> Optional[dict]:
        files = self._shards()
        if any("optimizer" not in f or not f["optimizer"].get("state") for f in files):
            return None
        order = [k for group in optimizer_order(self.cfg) for k in group]
        out, step = {}, None
        for idx, key in enumerate(order):
            info = self.infos[key]
            per_rank = [f["optimizer"]["state"].get(idx) for f in files]
            if any(s is None for s in per_rank):
                continue
            out[key] = {name: canonical([s[name].float() for s in per_rank], info) for name in ADAM_STATES}
            step = per_rank[0].get("step", step)
        groups = [{k: v for k, v in g.items() if k != "params"} for g in files[0]["optimizer"]["param_groups"]]
        return {"state": out, "step": step, "param_groups": groups}


class UniversalReader(Reader):
    """The layout-independent format tools/reshard_checkpoint.py writes for DeepSpeed layouts:
    ``weights.pt`` {init_key: canonical tensor} and ``optimizer.pt`` {"state": {init_key: {exp_avg,
    exp_avg_sq}}, "step", "param_groups"}; any engine at any layout loads it (CheckpointManager)."""

    def __init__(self, ckpt_dir: str, meta: Optional[dict] = None, hash_files: bool = True):
        super().__init__(ckpt_dir, meta, hash_files)
        self._weights = None

    def weight(self, key: str) -> torch.Tensor:
        if self._weights is None:
            self._weights = self.load(os.path.join(self.dir, "weights.pt"), mmap=True)
        if key not in self._weights:
            raise KeyError(key)
        return self._weights[key]

    def optimizer_state(self) -> Optional[dict]:
        path = os.path.join(self.dir, "optimizer.pt")
        if not os.path.isfile(path):
            return None
        return self.load(path, mmap=True)


def open_checkpoint(ckpt_dir: str, meta: Optional[dict] = None, hash_files: bool = True) -> Reader:
    """The reader for this checkpoint's format. ``hash_files``: check each file's SHA-256 as it is loaded
    (pass False when ``verify_checkpoint`` already hashed them all)."""
    meta = meta if meta is not None else read_meta(ckpt_dir)
    readers = {LOCAL_FORMAT: LocalReader, UNIVERSAL_FORMAT: UniversalReader, DEEPSPEED_FORMAT: DeepSpeedReader}
    fmt = engine_format(meta)
    if fmt not in readers:
        raise CheckpointError(f"checkpoint {ckpt_dir} holds engine files of an unknown format {fmt!r}; it cannot "
                              f"be read by this version of megatron_mtp.")
    return readers[fmt](ckpt_dir, meta, hash_files)


# ---------------------------------------------------------------------------------------------------------
# Writing


def _adamw_state_dict(cfg, tp: int, rank: int, infos: dict, optim: Optional[dict]) -> dict:
    """A torch AdamW state_dict for LocalEngine at TP rank ``rank`` from canonical optimizer state."""
    order = optimizer_order(cfg)
    if optim is not None and optim.get("param_groups") and len(optim["param_groups"]) == len(order):
        hyper = optim["param_groups"]
    else:
        # Default hyper-parameters of the optimizer LocalEngine builds (lr is set every step anyway).
        opt = build_optimizer(build_meta_model(cfg), cfg.optimizer, torch.device("cpu"))
        hyper = [{k: v for k, v in g.items() if k != "params"} for g in opt.state_dict()["param_groups"]]
    groups, state, idx = [], {}, 0
    for group_keys, h in zip(order, hyper):
        ids = []
        for key in group_keys:
            ids.append(idx)
            st = (optim or {}).get("state", {}).get(key)
            if st is not None:
                info = infos[key]
                rows = padded_rows(cfg, info, tp)
                step = optim.get("step")
                state[idx] = {"step": step.clone() if torch.is_tensor(step) else torch.tensor(float(step or 0)),
                              **{name: shard_for(st[name], info, tp, rank, rows) for name in ADAM_STATES}}
            idx += 1
        groups.append({**h, "params": ids})
    return {"state": state, "param_groups": groups}


def write_local(out_dir: str, cfg, tp: int, weights, optim: Optional[dict]) -> None:
    """LocalEngine files (``model_tpXX.pt``) for ``tp`` ranks from canonical weights (and optimizer state)."""
    infos = param_infos(cfg)
    get = weights if callable(weights) else weights.__getitem__
    for rank in range(tp):
        model = {}
        for key, info in infos.items():
            model[info.name] = shard_for(get(key).float(), info, tp, rank, padded_rows(cfg, info, tp))
        sd = {"model": model}
        if optim is not None:
            sd["optimizer"] = _adamw_state_dict(cfg, tp, rank, infos, optim)
            # fp32 masters for LocalEngine's bf16 regime (a plain AdamW ignores the key)
            order = [k for group in optimizer_order(cfg) for k in group]
            sd["optimizer"]["master_weights"] = [model[infos[k].name].float() for k in order]
        atomic_torch_save(sd, os.path.join(out_dir, f"model_tp{rank:02d}.pt"))


def write_universal(out_dir: str, cfg, weights, optim: Optional[dict]) -> None:
    infos = param_infos(cfg)
    get = weights if callable(weights) else weights.__getitem__
    atomic_torch_save({key: get(key).float().contiguous() for key in infos}, os.path.join(out_dir, "weights.pt"))
    if optim is not None:
        atomic_torch_save(optim, os.path.join(out_dir, "optimizer.pt"))


def write_checkpoint(out_dir: str, cfg, *, tp: int, pp: int, dp: int, weights, optim: Optional[dict], step: int,
                     consumed_samples: int, rng_by_rank: Optional[dict] = None, weights_only: bool = False,
                     engine: Optional[str] = None) -> str:
    """A complete checkpoint directory (engine files, rank payloads, meta.json with manifest) that
    ``CheckpointManager.resume`` loads at layout tp x pp x dp. ``weights`` maps init_key -> canonical tensor
    (or is a callable). ``engine`` (a format id) defaults to LocalEngine's files where the training loop
    runs LocalEngine at that layout, else the universal format."""
    cfg = copy.deepcopy(cfg)
    world = tp * pp * dp
    cfg.parallel.tp, cfg.parallel.pp = tp, pp
    if engine is None:
        engine = UNIVERSAL_FORMAT if uses_deepspeed(cfg, dp) else LOCAL_FORMAT
    os.makedirs(out_dir, exist_ok=True)
    if engine == LOCAL_FORMAT:
        if pp != 1 or dp != 1:
            raise CheckpointError(f"LocalEngine checkpoints hold one TP group only (pp=1, dp=1), not pp={pp} dp={dp}.")
        write_local(out_dir, cfg, tp, weights, optim)
    else:
        write_universal(out_dir, cfg, weights, optim)
    for rank in range(world):
        tp_rank, dp_rank, pp_rank = layout_coordinates(rank, tp, dp)
        payload = {"step": step, "consumed_samples": int(consumed_samples),
                   "rng": (rng_by_rank or {}).get(rank),
                   "coords": {"tp_rank": tp_rank, "pp_rank": pp_rank, "dp_rank": dp_rank}, "params": []}
        atomic_torch_save(payload, os.path.join(out_dir, f"rank_{rank:05d}.pt"))
    files = manifest(out_dir)
    meta = {"format": FORMAT_VERSION, "step": step, "tp": tp, "pp": pp, "dp": dp, "world_size": world,
            "engine": engine, "weights_only": weights_only, "has_optimizer": optim is not None,
            "config": cfg.to_dict(), "files": files, "sha256": digests(out_dir, files)}
    atomic_write_text(os.path.join(out_dir, META), json.dumps(meta, indent=1))
    return out_dir


def publish_as_run(run_dir: str, cfg, **kwargs) -> str:
    """Write a checkpoint as ``run_dir/checkpoints/step_XXXXXXXX`` with its ``latest`` pointer and the run's
    ``config.yaml`` (what tools/import_checkpoint.py and tools/reshard_checkpoint.py produce)."""
    root = os.path.join(run_dir, "checkpoints")
    os.makedirs(root, exist_ok=True)
    name = step_dir_name(kwargs["step"])
    final = os.path.join(root, name)
    partial = final + ".partial"
    if os.path.exists(final):
        raise CheckpointError(f"{final} already exists; choose an empty --output directory.")
    if os.path.isdir(partial):
        shutil.rmtree(partial)
    write_checkpoint(partial, cfg, **kwargs)
    fsync_tree(partial)
    os.replace(partial, final)
    fsync_path(root)
    atomic_write_text(os.path.join(root, POINTER), name)
    cfg.save(os.path.join(run_dir, "config.yaml"))
    return final
