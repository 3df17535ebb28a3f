"""Tensor-, pipeline- and data-parallel process groups, in Megatron's rank order.

Global rank = pp_rank * (dp * tp) + dp_rank * tp + tp_rank: tensor parallelism is innermost (the TP
group is a block of consecutive ranks, i.e. GPUs of one node), then data parallelism, then pipeline
stages. Without ``torch.distributed`` initialised every getter answers as for a single process, so the
same model code runs unchanged on a laptop.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Optional

import torch.distributed as dist

from megatron_mtp.errors import LayoutError
from megatron_mtp.parallel.distributed import collective_timeout
from megatron_mtp.validation import check_tp_divides


@dataclass
class ParallelState:
    tp: int = 1
    pp: int = 1
    dp: int = 1
    tp_rank: int = 0
    pp_rank: int = 0
    dp_rank: int = 0
    tp_group: Optional[object] = None
    pp_group: Optional[object] = None
    dp_group: Optional[object] = None
    model_parallel_group: Optional[object] = None  # TP x PP: everything holding one model replica
    embedding_group: Optional[object] = None  # first and last pipeline stage (tied embeddings)
    pp_ranks: tuple = (0,)  # global ranks of this rank's pipeline


_STATE = ParallelState()


def rank_of(tp_rank: int, dp_rank: int, pp_rank: int, tp: int, dp: int) -> int:
    return pp_rank * (dp * tp) + dp_rank * tp + tp_rank


def layout_coordinates(rank: int, tp: int, dp: int) -> tuple:
    """(tp_rank, dp_rank, pp_rank) of a global rank."""
    return rank % tp, (rank // tp) % dp, rank // (tp * dp)


def initialize_model_parallel(tp: int = 1, pp: int = 1) -> ParallelState:
    """Create every group. All ranks must call it with the same sizes (new_group is collective)."""
    global _STATE
    world = dist.get_world_size() if dist.is_initialized() else 1
    rank = dist.get_rank() if dist.is_initialized() else 0
    if world % (tp * pp) != 0:
        raise LayoutError(
            f"the world size ({world}) must be divisible by parallel.tp x parallel.pp ({tp} x {pp})."
        )
    dp = world // (tp * pp)
    tp_rank, dp_rank, pp_rank = layout_coordinates(rank, tp, dp)
    state = ParallelState(tp=tp, pp=pp, dp=dp, tp_rank=tp_rank, pp_rank=pp_rank, dp_rank=dp_rank)
    if not dist.is_initialized():
        _STATE = state
        return state

    # dist.new_group must be called by every rank for every group, in the same order.
    for p in range(pp):
        for d in range(dp):
            ranks = [rank_of(t, d, p, tp, dp) for t in range(tp)]
            group = dist.new_group(ranks, timeout=collective_timeout())
            if rank in ranks:
                state.tp_group = group
    for p in range(pp):
        for t in range(tp):
            ranks = [rank_of(t, d, p, tp, dp) for d in range(dp)]
            group = dist.new_group(ranks, timeout=collective_timeout())
            if rank in ranks:
                state.dp_group = group
    for d in range(dp):
        for t in range(tp):
            ranks = [rank_of(t, d, p, tp, dp) for p in range(pp)]
            group = dist.new_group(ranks, timeout=collective_timeout())
            if rank in ranks:
                state.pp_group = group
                state.pp_ranks = tuple(ranks)
            embedding_ranks = sorted({ranks[0], ranks[-1]})
            group = dist.new_group(embedding_ranks, timeout=collective_timeout())
            if rank in embedding_ranks:
                state.embedding_group = group
    for d in range(dp):
        ranks = [rank_of(t, d, p, tp, dp) for p in range(pp) for t in range(tp)]
        group = dist.new_group(ranks, timeout=collective_timeout())
        if rank in ranks:
            state.model_parallel_group = group
    _STATE = state
    return state


def destroy_model_parallel() -> None:
    global _STATE
    _STATE = ParallelState()


def get_state() -> ParallelState:
    return _STATE


@contextlib.contextmanager
def single_process_layout():
    """Build or run modules as for one process (TP=1, PP=1), whatever groups this process has: layers read the
    parallel state when they are built and called (merging checkpoints, TP=1 references in tests)."""
    global _STATE
    saved = _STATE
    _STATE = ParallelState()
    try:
        yield
    finally:
        _STATE = saved


def tp_size() -> int:
    return _STATE.tp


def tp_rank() -> int:
    return _STATE.tp_rank


def tp_group():
    return _STATE.tp_group


def dp_size() -> int:
    return _STATE.dp


def dp_rank() -> int:
    return _STATE.dp_rank


def dp_group():
    return _STATE.dp_group


def pp_size() -> int:
    return _STATE.pp


def pp_rank() -> int:
    return _STATE.pp_rank


def pp_group():
    return _STATE.pp_group


def is_first_stage() -> bool:
    return _STATE.pp_rank == 0


def is_last_stage() -> bool:
    return _STATE.pp_rank == _STATE.pp - 1


def check_model_layout(model_cfg, tp: int, seq_length: Optional[int] = None,
                       sequence_parallel: bool = False) -> None:
    """tp must divide everything that is sharded across it; say which key otherwise (``validation``)."""
    check_tp_divides(model_cfg, tp, seq_length, sequence_parallel, error=LayoutError)
