"""One tensor in any tensor-parallel layout <-> its canonical (full, TP=1, unpadded) form.

Every parameter carries marks (``init_key``, ``partition_dim``, ``partition_chunks``, ``logical_size``;
see ``layers.py``). They are all a reader needs to turn the shards of any layout back into full tensors
(``canonical``), and all a writer needs to cut full tensors for another layout (``shard_for``).
Vocabulary-sized tensors (embedding, unembedding) are kept with their ``logical_size`` real rows only:
their padding depends on tp and is zero by construction. Engines use ``copy_into_model`` /
``inject_optimizer_state`` to take canonical weights and Adam moments from any checkpoint layout.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from types import SimpleNamespace
from typing import Optional

import torch

from megatron_mtp.parallel import state
from megatron_mtp.parallel.layers import shard_of, unshard


@dataclass
class ParamInfo:
    init_key: str  # stable, layout-independent name, e.g. "trunk.3.qkv"
    name: str  # the parameter's name in the single-process MTPModel (state_dict key)
    partition_dim: int = -1  # dim split across TP; -1 = replicated
    chunks: int = 1  # blocks of the split dim that are split separately ([gate; up])
    logical_size: Optional[int] = None  # real rows of a padded vocabulary dim
    shape: tuple = ()  # canonical (full, unpadded) shape

    def marks(self) -> SimpleNamespace:
        """An object with the parameter's partition marks, for ``shard_of`` / ``unshard``."""
        return SimpleNamespace(partition_dim=self.partition_dim, partition_chunks=self.chunks)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["shape"] = list(self.shape)
        return d


def marks_of(param) -> dict:
    """The partition marks of a live parameter (saved per rank so readers need no model)."""
    return {
        "init_key": getattr(param, "init_key", None),
        "partition_dim": int(getattr(param, "partition_dim", -1)),
        "chunks": int(getattr(param, "partition_chunks", 1)),
        "logical_size": getattr(param, "logical_size", None),
        "shape": list(param.shape),
    }


def canonical(shards: list, info: ParamInfo) -> torch.Tensor:
    """Full tensor from every TP rank's shard (TP-rank order), with vocabulary padding removed."""
    full = unshard(list(shards), info.marks())
    if info.logical_size is not None and info.partition_dim >= 0:
        full = full.narrow(info.partition_dim, 0, info.logical_size)
    return full.contiguous()


def shard_for(full: torch.Tensor, info: ParamInfo, tp: int, rank: int, rows: Optional[int] = None) -> torch.Tensor:
    """TP rank ``rank``'s shard of a canonical tensor; ``rows`` pads a vocabulary dim (with zeros) first."""
    if rows is not None and info.partition_dim >= 0 and full.size(info.partition_dim) != rows:
        shape = list(full.shape)
        shape[info.partition_dim] = rows
        padded = full.new_zeros(shape)
        padded.narrow(info.partition_dim, 0, full.size(info.partition_dim)).copy_(full)
        full = padded
    return shard_of(full, info.marks(), tp, rank).clone()


def info_from_marks(marks: dict, name: str = "") -> ParamInfo:
    shape = list(marks["shape"])
    return ParamInfo(marks["init_key"], name, marks["partition_dim"], marks["chunks"], marks.get("logical_size"),
                     tuple(shape))


@torch.no_grad()
def copy_into_model(model: torch.nn.Module, weights, tp: Optional[int] = None, tp_rank: Optional[int] = None,
                    strict: bool = True) -> list:
    """Copy canonical ``weights`` (init_key -> tensor, or a callable key -> tensor) into a live (possibly
    TP-sharded, possibly pipeline-stage) model: each parameter gets its shard. Returns the keys copied."""
    return copy_into_params(model.named_parameters(), weights, tp, tp_rank, strict)


@torch.no_grad()
def copy_into_params(named_params, weights, tp: Optional[int] = None, tp_rank: Optional[int] = None,
                     strict: bool = True) -> list:
    """``copy_into_model`` over (name, parameter) pairs carrying partition marks."""
    tp = state.tp_size() if tp is None else tp
    tp_rank = state.tp_rank() if tp_rank is None else tp_rank
    get = weights if callable(weights) else weights.__getitem__
    done = []
    for name, p in named_params:
        key = getattr(p, "init_key", None)
        if key is None:
            continue
        m = marks_of(p)
        info = info_from_marks(m, name)
        try:
            full = get(key)
        except KeyError:
            if strict:
                raise KeyError(f"the checkpoint has no tensor for parameter {key!r} ({name})") from None
            continue
        rows = p.shape[info.partition_dim] * tp if info.logical_size is not None and info.partition_dim >= 0 else None
        shard = shard_for(full.to(torch.float32), info, tp, tp_rank, rows)
        if tuple(shard.shape) != tuple(p.shape):
            raise RuntimeError(f"size mismatch for {key} ({name}): the checkpoint gives {tuple(shard.shape)} on "
                               f"this rank, the model has {tuple(p.shape)}")
        p.copy_(shard.to(p.dtype))
        done.append(key)
    return done


def inject_optimizer_state(optimizer, model: torch.nn.Module, optim: dict, tp: Optional[int] = None,
                           tp_rank: Optional[int] = None) -> bool:
    """Give a live torch optimizer (AdamW over the model's parameters or their marked fp32 masters) this rank's
    shards of canonical Adam moments. Returns False, touching nothing, when its groups hold unmarked tensors
    (ZeRO's flat partitions) or the state lacks one of them."""
    tp = state.tp_size() if tp is None else tp
    tp_rank = state.tp_rank() if tp_rank is None else tp_rank
    if optimizer is None or not hasattr(optimizer, "param_groups") or not optim or not optim.get("state"):
        return False
    # The model's parameters, or fp32 masters carrying their marks; never ZeRO's unmarked flat partitions.
    params = [p for g in optimizer.param_groups for p in g["params"]]
    if any(getattr(p, "init_key", None) is None for p in params):
        return False
    if any(p.init_key not in optim["state"] for p in params):
        return False
    step = optim.get("step")
    step = float(step.item() if torch.is_tensor(step) else (step or 0))
    on_device = {id(p): bool(g.get("fused") or g.get("capturable")) for g in optimizer.param_groups
                 for p in g["params"]}
    for p in params:
        m = marks_of(p)
        info = info_from_marks(m)
        rows = p.shape[info.partition_dim] * tp if info.logical_size is not None and info.partition_dim >= 0 else None
        st = optim["state"][p.init_key]
        optimizer.state[p] = {
            # torch keeps Adam's step on the CPU, except for fused / capturable AdamW
            "step": torch.tensor(step, dtype=torch.float32, device=p.device if on_device[id(p)] else "cpu"),
            **{name: shard_for(st[name].float(), info, tp, tp_rank, rows).to(device=p.device, dtype=p.dtype)
               for name in ("exp_avg", "exp_avg_sq")},
        }
    return True
