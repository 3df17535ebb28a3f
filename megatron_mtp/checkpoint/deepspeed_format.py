"""Reading DeepSpeedEngine checkpoints (DeepSpeed's own files) into the layout-independent form.

What DeepSpeed writes into a step directory (tag = the directory the CheckpointManager made):

* PP = 1: ``mp_rank_{m:02d}_model_states.pt`` per model-parallel rank m (= tp_rank here): ``module`` is
  the MTPModel state_dict; ``optimizer`` the torch AdamW state_dict under ZeRO 0.
* PP > 1: ``layer_{i:02d}-model_{t:02d}-model_states.pt`` per pipeline layer i and TP rank t (the layer
  module's state_dict), and ``mp_rank_{m:02d}_model_states.pt`` per stage and TP rank, m = pp_rank * tp +
  tp_rank (``module`` None, ``optimizer`` as above).
* ZeRO 1/2: ``*zero_pp_rank_{d}_mp_rank_{m:02d}_optim_states.pt`` per data-parallel rank d: flat fp32
  partitions of each parameter group and of Adam's moments, with ``param_slice_mappings`` saying where each
  parameter's fragment lies; ``param_shapes`` (in the model-states file) gives the group order.

Which file holds which parameter comes from the CheckpointManager's per-rank payload: the names of the
engine module's parameters with their init keys and partition marks. Pipeline names are ``<layer>.<key in
the layer file>``; tied modules (``tied_modules.<key>.<name>``) live in the file of the first layer that
uses them.
"""
from __future__ import annotations

import glob
import os
from typing import Optional

import torch

from megatron_mtp.checkpoint.reader import ADAM_STATES, Reader
from megatron_mtp.checkpoint.universal import canonical
from megatron_mtp.errors import CheckpointError
from megatron_mtp.training.ds_compat import allow_deepspeed_files
from megatron_mtp.parallel.state import rank_of


class DeepSpeedReader(Reader):
    def __init__(self, ckpt_dir: str, meta: Optional[dict] = None, hash_files: bool = True):
        allow_deepspeed_files()  # DeepSpeed's optimizer files pickle a few plain data classes
        super().__init__(ckpt_dir, meta, hash_files)
        self.zero_stage = int(self.cfg.parallel.zero_stage)
        self._files: dict = {}
        self._index: Optional[dict] = None  # init_key -> [(tp_rank, pp_rank, file, key)] first stage holding it
        self._opt: Optional[dict] = None

    # ---- files

    def _file(self, path: str):
        if path not in self._files:
            self._files[path] = self.load(path, mmap=True)
        return self._files[path]

    def _payload(self, tp_rank: int, pp_rank: int) -> dict:
        r = rank_of(tp_rank, 0, pp_rank, self.tp, self.dp)
        p = self.payloads.get(r)
        if p is None:
            raise CheckpointError(f"checkpoint {self.dir} is missing rank_{r:05d}.pt; it is incomplete, so use an "
                                  f"earlier step_* directory.")
        if not p.get("params"):
            raise CheckpointError(f"checkpoint {self.dir} was written before per-rank parameter maps existed; "
                                  f"resume it at its own layout instead of converting it.")
        return p

    def _mp_file(self, tp_rank: int, pp_rank: int) -> str:
        return os.path.join(self.dir, f"mp_rank_{pp_rank * self.tp + tp_rank:02d}_model_states.pt")

    def _layer_path(self, layer: int, tp_rank: int) -> str:
        return os.path.join(self.dir, f"layer_{layer:02d}-model_{tp_rank:02d}-model_states.pt")

    def _tied_location(self, tp_rank: int, key: str) -> tuple:
        for path in sorted(glob.glob(os.path.join(self.dir, f"layer_*-model_{tp_rank:02d}-model_states.pt"))):
            if key in self._file(path):
                return path, key
        raise CheckpointError(f"checkpoint {self.dir} has no layer file holding the tied weight {key}; it is "
                              f"incomplete.")

    def _build_index(self) -> dict:
        index: dict = {}
        for pp_rank in range(self.pp):
            for tp_rank in range(self.tp):
                for entry in self._payload(tp_rank, pp_rank)["params"]:
                    name, key = entry["name"], entry["init_key"]
                    if self.pp > 1:
                        head, _, rest = name.partition(".")
                        if head == "tied_modules":
                            path, tkey = self._tied_location(tp_rank, rest.partition(".")[2])
                        else:
                            path, tkey = self._layer_path(int(head), tp_rank), rest
                    else:
                        path, tkey = self._mp_file(tp_rank, pp_rank), name
                    slots = index.setdefault(key, {})
                    if tp_rank not in slots:  # the first stage holding it (tied copies are equal)
                        slots[tp_rank] = (pp_rank, path, tkey)
        return index

    @property
    def index(self) -> dict:
        if self._index is None:
            self._index = self._build_index()
        return self._index

    # ---- weights

    def weight(self, key: str) -> torch.Tensor:
        info = self.infos.get(key)
        slots = self.index.get(key)
        if info is None or slots is None:
            raise KeyError(key)
        shards = []
        for tp_rank in range(self.tp):
            if tp_rank not in slots:
                raise CheckpointError(f"checkpoint {self.dir} has no TP rank {tp_rank} shard of {key}; it is "
                                      f"incomplete.")
            _, path, tkey = slots[tp_rank]
            sd = self._file(path)
            if self.pp == 1:
                sd = sd["module"]
            if tkey not in sd:
                raise CheckpointError(f"checkpoint {self.dir} lacks {tkey} in {os.path.basename(path)}; it is "
                                      f"damaged or from another version.")
            shards.append(sd[tkey])
        if any(t.dtype != torch.float32 for t in shards) and self.zero_stage > 0:
            master = self._fp32_masters().get(key)  # bf16 module copies: prefer ZeRO's fp32 masters
            if master is not None:
                return master
        return canonical([t.float() for t in shards], info)

    def _fp32_masters(self) -> dict:
        if not hasattr(self, "_masters"):
            self._masters = self._zero_partitions(("fp32",)) or {}
            self._masters = {k: v["fp32"] for k, v in (self._masters.get("state") or {}).items()}
        return self._masters

    # ---- optimizer

    def optimizer_state(self) -> Optional[dict]:
        if self._opt is None:
            try:
                self._opt = self._zero0() if self.zero_stage == 0 else self._zero_partitions()
            except (KeyError, IndexError, TypeError, ValueError, RuntimeError) as exc:
                print(f"WARNING: could not read the optimizer state of {self.dir} ({exc}); it is dropped.",
                      flush=True)
                self._opt = {}
        return self._opt or None

    def _zero0(self) -> Optional[dict]:
        """ZeRO 0: each stage and TP rank's torch AdamW state_dict, numbered as the payload's optimizer_keys."""
        per_key: dict = {}  # init_key -> {tp_rank: state}
        step, groups = None, None
        for pp_rank in range(self.pp):
            for tp_rank in range(self.tp):
                order = self._payload(tp_rank, pp_rank).get("optimizer_keys")
                if not order:
                    return None
                osd = self._file(self._mp_file(tp_rank, pp_rank)).get("optimizer")
                if not osd or not osd.get("state"):
                    return None
                flat = [k for g in order for k in g]
                for idx, key in enumerate(flat):
                    st = osd["state"].get(idx)
                    if st is None:
                        continue
                    per_key.setdefault(key, {}).setdefault(tp_rank, st)
                    step = st.get("step", step)
                if groups is None:
                    groups = [{k: v for k, v in g.items() if k != "params"} for g in osd["param_groups"]]
        out = {}
        for key, by_rank in per_key.items():
            if len(by_rank) != self.tp or key not in self.infos:
                continue
            out[key] = {n: canonical([by_rank[t][n].float() for t in range(self.tp)], self.infos[key])
                        for n in ADAM_STATES}
        return {"state": out, "step": step, "param_groups": groups} if out else None

    def _zero_partitions(self, names: tuple = ADAM_STATES) -> Optional[dict]:
        """ZeRO 1/2: join every DP rank's flat fp32 partitions of exp_avg / exp_avg_sq, then cut them into
        parameters with ``param_slice_mappings`` (names of the engine module, mapped to init keys)."""
        per_key: dict = {}
        step = None
        for pp_rank in range(self.pp):
            for tp_rank in range(self.tp):
                m = pp_rank * self.tp + tp_rank
                by_name = {e["name"]: e["init_key"] for e in self._payload(tp_rank, pp_rank)["params"]}
                for d in range(self.dp):
                    found = glob.glob(os.path.join(self.dir, f"*zero_pp_rank_{d}_mp_rank_{m:02d}_optim_states.pt"))
                    if not found:
                        return None
                    osd = self._file(found[0])["optimizer_state_dict"]
                    base = osd["base_optimizer_state"]
                    states = base["state"] if isinstance(base, dict) else dict(enumerate(base))
                    for g, mapping in enumerate(osd["param_slice_mappings"]):
                        st = states[g]
                        step = st.get("step", step)
                        for pname, frag in mapping.items():
                            key = by_name.get(pname)
                            if key is None:
                                continue
                            parts = per_key.setdefault(key, {}).setdefault(tp_rank, {n: [] for n in names})
                            for n in names:
                                flat = (osd["single_partition_of_fp32_groups"][g] if n == "fp32" else st[n]).float()
                                parts[n].append((frag.start, flat.narrow(0, frag.start, frag.numel).clone(), d))
        # fragments of one parameter across DP ranks, in DP order, concatenated
        out = {}
        for key, by_rank in per_key.items():
            info = self.infos.get(key)
            if info is None or len(by_rank) != self.tp:
                continue
            shards = {n: [] for n in names}
            for t in range(self.tp):
                for n in names:
                    pieces = [p for _, p, _ in sorted(by_rank[t][n], key=lambda x: x[2])]
                    shards[n].append(torch.cat(pieces))
            try:
                full = {}
                for n in names:
                    local_shape = self._local_shape(key)
                    full[n] = canonical([s.view(local_shape) for s in shards[n]], info)
            except RuntimeError:
                continue
            out[key] = full
        return {"state": out, "step": step, "param_groups": None} if out else None

    def _local_shape(self, key: str) -> tuple:
        for pp_rank in range(self.pp):
            for entry in self._payload(0, pp_rank)["params"]:
                if entry["init_key"] == key:
                    return tuple(entry["shape"])
        raise KeyError(key)
