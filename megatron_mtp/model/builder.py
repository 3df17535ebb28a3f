"""The one model builder: an ``MTPModel`` from a config, for training, DeepSpeed, merging, inference,
export and the benchmarks. (The pipeline engine builds its stages from the same layers through
``training/pipeline_module.py``.)"""
from __future__ import annotations

import contextlib
from typing import Optional, Union

import torch

from megatron_mtp.model.compile import apply_compile
from megatron_mtp.model.mtp_model import MTPModel
from megatron_mtp.ops.fp8 import apply_fp8, check_fp8_device
from megatron_mtp.parallel import state
from megatron_mtp.parallel.layers import initialize_parameters


def param_dtype(dtype: torch.dtype) -> torch.dtype:
    """Parameters are fp32 (bf16 runs use autocast or master weights on top), fp64 for exactness tests."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def build_model(cfg, device: Union[str, torch.device] = "cpu", dtype: torch.dtype = torch.float32, *,
                seed: Optional[int] = None, single_process: bool = False, compile: Optional[bool] = None,
                fp8: Optional[bool] = None) -> MTPModel:
    """``MTPModel`` for this rank's TP shard (or, with ``single_process``, the whole TP=1 model whatever the
    process groups are), parameters in ``param_dtype(dtype)`` on ``device`` (``"meta"``: shapes only, no
    memory). ``seed`` initialises it layout-independently (``initialize_parameters``); without it the
    values are left to the caller (a checkpoint is copied in). ``compile`` (default ``train.compile``)
    torch.compiles each transformer layer in place; ``fp8`` (default ``train.fp8``) routes the trunk's and heads'
    linears through FP8 GEMMs first (``ops/fp8.py``; an error on a device without FP8 tensor cores)."""
    layout = state.single_process_layout() if single_process else contextlib.nullcontext()
    device = torch.device(device)
    with layout:
        if device.type == "meta":
            with torch.device("meta"):
                return MTPModel(cfg.model, cfg.mtp)
        model = MTPModel(cfg.model, cfg.mtp, sequence_parallel=cfg.parallel.sequence_parallel and not single_process,
                         activation_checkpointing="none" if single_process else cfg.train.activation_checkpointing,
                         dtype=param_dtype(dtype))
        if seed is not None:
            initialize_parameters(model, seed)
    model = model.to(device)
    if cfg.train.fp8 if fp8 is None else fp8:
        check_fp8_device(device)
        apply_fp8(model)  # before compile: the casts and scales are traced into the compiled layers
    if cfg.train.compile if compile is None else compile:
        apply_compile(model)
    return model
