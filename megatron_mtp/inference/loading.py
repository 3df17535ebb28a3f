"""Loading a trained model for inference: ``load_model(path) -> (cfg, MTPModel, tokenizer)``.

``path`` may be a training run directory, its ``checkpoints/`` directory, one ``step_*`` checkpoint or an
exported HuggingFace directory. The checkpoint package's ``load_merged_model`` (which merges any TP/PP
layout into one process) is used when it exists; otherwise a minimal loader reads single-process
(TP=1, PP=1, LocalEngine) checkpoints: ``step_*/model_tp00.pt`` holding ``{"model": state_dict}`` and
``meta.json`` holding the config.
"""
from __future__ import annotations

import os
from typing import Optional

import torch


class ModelLoadError(RuntimeError):
    """A path that does not hold a loadable model; the message names it and the fix."""


def load_local_checkpoint(path: str, device="cpu"):
    """The minimal loader: a TP=1, PP=1 LocalEngine checkpoint -> (cfg, model, tokenizer)."""
    from megatron_mtp.checkpoint.manager import CheckpointError, read_meta, resolve_checkpoint
    from megatron_mtp.config import config_from_dict
    from megatron_mtp.data.tokenizers import build_tokenizer
    from megatron_mtp.model.mtp_model import MTPModel

    try:
        ckpt = resolve_checkpoint(path)
    except CheckpointError as exc:
        raise ModelLoadError(str(exc)) from None
    meta = read_meta(ckpt)
    if meta.get("tp", 1) != 1 or meta.get("pp", 1) != 1:
        raise ModelLoadError(f"checkpoint {ckpt} was saved with tp={meta.get('tp')} pp={meta.get('pp')}; this "
                             f"loader reads tp=1 pp=1 only: merge it with megatron_mtp.checkpoint.merge first.")
    shard = os.path.join(ckpt, "model_tp00.pt")
    if not os.path.isfile(shard):
        raise ModelLoadError(f"checkpoint {ckpt} has no model_tp00.pt (engine {meta.get('engine')}); load it with "
                             f"megatron_mtp.checkpoint.merge.load_merged_model.")
    cfg = config_from_dict(meta["config"])
    model = MTPModel(cfg.model, cfg.mtp, dtype=torch.float32)
    state = torch.load(shard, map_location="cpu", weights_only=False)
    state = state.get("model", state)
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()[0]
        raise ModelLoadError(f"checkpoint {ckpt} does not match its own config ({first}).") from None
    from megatron_mtp.checkpoint.merge import locate_run_tokenizer

    locate_run_tokenizer(cfg, ckpt)
    tokenizer = build_tokenizer(cfg.data.tokenizer_type, cfg.data.tokenizer_model)
    return cfg, model.to(device).eval(), tokenizer


def load_model(path: str, device="cpu", dtype: Optional[torch.dtype] = None):
    """(cfg, model in eval mode on ``device`` [cast to ``dtype``], tokenizer) from a run, checkpoint or export."""
    if not os.path.exists(path):
        raise ModelLoadError(f"{path!r} does not exist; pass a training run directory or a checkpoint directory.")
    try:
        from megatron_mtp.checkpoint.merge import load_merged_model
    except ImportError:
        load_merged_model = None
    if load_merged_model is not None:
        from megatron_mtp.checkpoint.manager import CheckpointError

        try:
            cfg, model, tokenizer = load_merged_model(path, device=device)
        except CheckpointError as exc:
            raise ModelLoadError(str(exc)) from None
    else:
        cfg, model, tokenizer = load_local_checkpoint(path, device=device)
    if dtype is not None:
        model = model.to(dtype)
    return cfg, model.eval(), tokenizer


def default_dtype(device: str) -> torch.dtype:
    """bf16 weights on the GPU (decoding is memory-bound), fp32 on the CPU."""
    return torch.bfloat16 if str(device).startswith("cuda") else torch.float32
