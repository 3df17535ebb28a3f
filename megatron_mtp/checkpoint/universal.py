"""The layout-independent form of a checkpoint: full (TP=1, unpadded) tensors keyed by ``init_key``.

Turning shards into canonical tensors and back is ``parallel/canonical.py``'s (re-exported here); this
module knows the model a config describes: ``param_infos(cfg)`` lists a ``ParamInfo`` for every parameter
of the single-process model (built on the meta device, so a 13B config costs no memory).
"""
from __future__ import annotations

from typing import Optional

from megatron_mtp.model.builder import build_model
from megatron_mtp.parallel.canonical import (ParamInfo, canonical, copy_into_model, copy_into_params,  # noqa: F401
                                             info_from_marks, inject_optimizer_state, marks_of, shard_for)
from megatron_mtp.training.optimizer import param_groups


def build_meta_model(cfg):
    """The single-process MTPModel on the meta device (no memory), for names, marks and shapes."""
    return build_model(cfg, "meta", single_process=True)


def param_infos(cfg) -> dict:
    """init_key -> ParamInfo for every parameter of the model ``cfg`` describes, in model order."""
    model = build_meta_model(cfg)
    infos = {}
    for name, p in model.named_parameters():
        m = marks_of(p)
        shape = list(p.shape)
        if m["logical_size"] is not None and m["partition_dim"] >= 0:
            shape[m["partition_dim"]] = m["logical_size"]
        infos[m["init_key"]] = ParamInfo(m["init_key"], name, m["partition_dim"], m["chunks"], m["logical_size"],
                                         tuple(shape))
    return infos


def optimizer_order(cfg) -> list:
    """init_keys in the order LocalEngine's AdamW numbers its parameters (decay group, then no-decay)."""
    model = build_meta_model(cfg)
    groups = param_groups(model, cfg.optimizer.weight_decay)
    return [[p.init_key for p in g["params"]] for g in groups]


def padded_rows(cfg, info: ParamInfo, tp: int) -> Optional[int]:
    """Rows of the split dim at ``tp`` for a padded-vocabulary tensor (None for the others)."""
    if info.logical_size is None or info.partition_dim < 0:
        return None
    return cfg.model.padded_vocab_size(tp)
