"""Loading a trained model for inference: ``load_model(path) -> (cfg, MTPModel, tokenizer)``.

``path`` may be a training run directory, its ``checkpoints/`` directory, one ``step_*`` checkpoint (any
TP/PP/DP layout, either engine) or an exported HuggingFace / Meta directory; the checkpoint package's
``load_merged_model`` turns any of them into one single-process model, loading nothing that can run code.
"""
from __future__ import annotations

import os
from typing import Optional

import torch

from megatron_mtp.checkpoint.merge import load_merged_model
from megatron_mtp.errors import CheckpointError, ModelLoadError  # noqa: F401  (ModelLoadError: for the tools)


def load_model(path: str, device="cpu", dtype: Optional[torch.dtype] = None):
    """(cfg, model in eval mode on ``device`` [cast to ``dtype``], tokenizer) from a run, checkpoint or export."""
    if not os.path.exists(path):
        raise ModelLoadError(f"{path!r} does not exist; pass a training run directory or a checkpoint directory.")
    try:
        cfg, model, tokenizer = load_merged_model(path, device=device)
    except CheckpointError as exc:
        raise ModelLoadError(str(exc)) from None
    if dtype is not None:
        model = model.to(dtype)
    return cfg, model.eval(), tokenizer


def default_dtype(device: str) -> torch.dtype:
    """bf16 weights on the GPU (decoding is memory-bound), fp32 on the CPU."""
    return torch.bfloat16 if str(device).startswith("cuda") else torch.float32
