"""Any checkpoint (any TP/PP/DP layout, either engine) or exported HF directory -> one single-process model.

    cfg, model, tokenizer = load_merged_model("runs/tiny")            # run dir: its latest checkpoint
    cfg, model, tokenizer = load_merged_model("runs/x/checkpoints/step_00000100")
    cfg, model, tokenizer = load_merged_model("exports/tiny-hf")      # HF export (extra heads included)

The model is an ``MTPModel`` built for one process (tp=1, pp=1), in eval mode, float32 on ``device``;
``cfg.parallel`` is reset to tp=pp=1. The tokenizer comes from ``build_tokenizer(cfg.data.tokenizer_type,
cfg.data.tokenizer_model)``. A plain HF Llama (no ``mtp_config.json``) loads as a 1-head model whose last
layer is head 1. Checkpoint files are verified (size, SHA-256) and loaded weights-only.
"""
from __future__ import annotations

import os
from typing import Optional, Union

import torch

from megatron_mtp.checkpoint.export import read_meta_export
from megatron_mtp.checkpoint.formats import open_checkpoint
from megatron_mtp.checkpoint.import_hf import hf_to_canonical
from megatron_mtp.checkpoint.store import locate_run_tokenizer, resolve_checkpoint, verify_checkpoint
from megatron_mtp.data.tokenizers import build_tokenizer
from megatron_mtp.errors import CheckpointError
from megatron_mtp.model.builder import build_model
from megatron_mtp.parallel.canonical import copy_into_model


def _load_canonical(path: str) -> tuple:
    if os.path.isfile(os.path.join(path, "config.json")):
        cfg, weights = hf_to_canonical(path)
        return cfg, weights.__getitem__
    if os.path.isfile(os.path.join(path, "params.json")) and os.path.isfile(os.path.join(path, "consolidated.pth")):
        _, cfg, weights = read_meta_export(path)
        return cfg, weights.__getitem__
    ckpt = resolve_checkpoint(path)
    meta = verify_checkpoint(ckpt, defer_hashing=True)  # the reader hashes the files it loads
    reader = open_checkpoint(ckpt, meta)
    locate_run_tokenizer(reader.cfg, ckpt)
    return reader.cfg, reader.weight


def build_single_process_model(cfg, weights, device: Union[str, torch.device] = "cpu",
                               dtype: torch.dtype = torch.float32):
    """An MTPModel for one process holding the canonical ``weights`` (dict or callable)."""
    model = build_model(cfg, "cpu", torch.float32, single_process=True, compile=False, fp8=False)
    copy_into_model(model, weights, tp=1, tp_rank=0)
    return model.to(device=device, dtype=dtype).eval()


def load_merged_model(path: str, device: Union[str, torch.device] = "cpu", dtype: torch.dtype = torch.float32,
                      with_tokenizer: bool = True) -> tuple:
    """(cfg, MTPModel, tokenizer) from ``path``; see the module doc. Raises CheckpointError for bad paths."""
    if not os.path.exists(path):
        raise CheckpointError(f"checkpoint path {path!r} does not exist; pass a run directory, a step_* directory "
                              f"or an exported HF directory.")
    cfg, weights = _load_canonical(path)
    cfg.parallel.tp = cfg.parallel.pp = 1
    cfg.parallel.sequence_parallel = False
    cfg.train.activation_checkpointing = "none"
    model = build_single_process_model(cfg, weights, device, dtype)
    tokenizer: Optional[object] = None
    if with_tokenizer:
        tokenizer = build_tokenizer(cfg.data.tokenizer_type, cfg.data.tokenizer_model)
    return cfg, model, tokenizer
