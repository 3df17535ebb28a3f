"""Random-number streams for tensor parallelism (Megatron's ``CudaRNGStatesTracker``, for CPU and CUDA).

Two kinds of randomness live in a TP group:

* **Replicated regions** (the residual stream without sequence parallelism) hold the same activations on
  every TP rank, so their dropout masks must be the same everywhere: they draw from torch's *default*
  generator, seeded identically on every TP rank.
* **TP regions** (attention probabilities of this rank's heads, and sequence shards under sequence
  parallelism) hold different data on every rank, so their masks must be independent: they draw inside
  ``get_rng_tracker().fork()``, which swaps in a stream seeded with an offset per TP rank and swaps the
  default state back afterwards, so the replicated stream is not disturbed.

Initialisation uses neither: ``layers.initialize_parameters`` seeds a private generator per parameter.
Activation checkpointing must replay the tracker too, or recomputed attention dropout would draw new masks
(wrong gradients): use :func:`checkpoint` from here rather than ``torch.utils.checkpoint`` directly.
"""
from __future__ import annotations

import contextlib
import random
from typing import Optional

import numpy as np
import torch
import torch.utils.checkpoint

from megatron_mtp.parallel import state

MODEL_PARALLEL_RNG = "model-parallel"
# Megatron's offsets: the TP stream sits far from the default seed; pipeline stages get their own seeds.
TP_SEED_OFFSET = 2718
PP_SEED_OFFSET = 100


def _use_cuda() -> bool:
    # Only when CUDA is already in use: a CPU run on a GPU machine must not create a CUDA context.
    return torch.cuda.is_available() and torch.cuda.is_initialized()


def _capture(cuda: bool) -> dict:
    return {"cpu": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state() if cuda else None}


def _restore(states: dict) -> None:
    torch.set_rng_state(states["cpu"])
    if states["cuda"] is not None:
        torch.cuda.set_rng_state(states["cuda"])


def _seeded_states(seed: int, cuda: bool) -> dict:
    """Generator states for ``seed``. Not torch.manual_seed: without a CUDA context it would queue a CUDA
    seed for lazy initialisation, which would then silently override the default CUDA seed."""
    cuda_state = None
    if cuda:
        orig = torch.cuda.get_rng_state()
        torch.cuda.manual_seed(seed)
        cuda_state = torch.cuda.get_rng_state()
        torch.cuda.set_rng_state(orig)
    return {"cpu": torch.Generator().manual_seed(seed).get_state(), "cuda": cuda_state}


class RNGStatesTracker:
    """Named generator states that ``fork`` swaps in for the default CPU (and current CUDA) generator."""

    def __init__(self):
        self.states: dict = {}
        self.seeds: set = set()

    def reset(self) -> None:
        self.states, self.seeds = {}, set()

    def add(self, name: str, seed: int, cuda: Optional[bool] = None) -> None:
        """Create stream ``name`` from ``seed`` without touching the current default generators."""
        if name in self.states:
            raise ValueError(f"RNG stream {name!r} already exists.")
        if seed in self.seeds:
            raise ValueError(f"RNG seed {seed} is already used by another stream.")
        cuda = _use_cuda() if cuda is None else cuda
        self.states[name] = _seeded_states(seed, cuda)
        self.seeds.add(seed)

    def get_states(self) -> dict:
        """A copy of every stream, e.g. for a checkpoint."""
        return {name: {k: (None if v is None else v.clone()) for k, v in s.items()}
                for name, s in self.states.items()}

    def set_states(self, states: dict) -> None:
        self.states = {name: {k: (None if v is None else v.clone()) for k, v in s.items()}
                       for name, s in states.items()}

    @contextlib.contextmanager
    def fork(self, name: str = MODEL_PARALLEL_RNG):
        """Draw from stream ``name`` inside the block; the default generators continue untouched after it."""
        if name not in self.states:
            if name != MODEL_PARALLEL_RNG:
                raise KeyError(f"RNG stream {name!r} was never added to the tracker.")
            # Nobody called model_parallel_seed (e.g. a model built by hand): derive the TP stream from the
            # default seed, which is the same on every TP rank, so masks still differ per rank.
            self.add(name, _tp_seed(torch.initial_seed()))
        orig = _capture(self.states[name]["cuda"] is not None)
        _restore(self.states[name])
        try:
            yield
        finally:
            self.states[name] = _capture(orig["cuda"] is not None)
            _restore(orig)


_TRACKER = RNGStatesTracker()


def get_rng_tracker() -> RNGStatesTracker:
    return _TRACKER


def _tp_seed(base: int) -> int:
    return base + TP_SEED_OFFSET + state.tp_rank()


def model_parallel_seed(seed: int, device: Optional[torch.device] = None) -> None:
    """Seed the default generators (same on every TP rank of a stage) and the tracker's TP stream (one per
    TP rank). Call after ``initialize_model_parallel`` and before the first forward; Megatron's
    ``model_parallel_cuda_manual_seed``."""
    base = seed + PP_SEED_OFFSET * state.pp_rank()
    cuda = (device.type == "cuda") if device is not None else _use_cuda()
    torch.manual_seed(base)
    _TRACKER.reset()
    _TRACKER.add(MODEL_PARALLEL_RNG, _tp_seed(base), cuda=cuda)


# ---------------------------------------------------------------------------------------------------------
# Activation checkpointing that replays the tracker


class _TrackerSnapshot:
    """Forward side: remember the tracker's streams as they were when the checkpointed region started."""

    def __init__(self):
        self.states: Optional[dict] = None

    def __enter__(self):
        self.states = _TRACKER.get_states()
        return self

    def __exit__(self, *exc):
        return False


class _TrackerReplay:
    """Recompute side: run the region from the remembered streams, then put the current ones back."""

    def __init__(self, snapshot: _TrackerSnapshot):
        self.snapshot = snapshot
        self.current: Optional[dict] = None

    def __enter__(self):
        self.current = _TRACKER.get_states()
        _TRACKER.set_states(self.snapshot.states)
        return self

    def __exit__(self, *exc):
        _TRACKER.set_states(self.current)
        return False


def _tracker_contexts():
    snapshot = _TrackerSnapshot()
    return snapshot, _TrackerReplay(snapshot)


def checkpoint(function, *args, **kwargs):
    """``torch.utils.checkpoint`` (non-reentrant) that also replays the TP RNG stream on recompute; torch
    itself already replays the default CPU/CUDA generators (``preserve_rng_state``)."""
    return torch.utils.checkpoint.checkpoint(function, *args, use_reentrant=False,
                                             context_fn=_tracker_contexts, **kwargs)


# ---------------------------------------------------------------------------------------------------------
# Every random stream of this process, for checkpoints


def all_rng_states() -> dict:
    """python, numpy, torch (CPU and, once initialised, CUDA) and the TP tracker's states."""
    out = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
           "tracker": get_rng_tracker().get_states()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        out["cuda"] = torch.cuda.get_rng_state_all()
    return out


class RNGStates:
    """The checkpoint component of this process's random streams (state_dict / load_state_dict)."""

    def state_dict(self) -> dict:
        return all_rng_states()

    def load_state_dict(self, saved: dict) -> None:
        set_all_rng_states(saved)


def set_all_rng_states(saved: dict) -> None:
    """Restore what ``all_rng_states`` captured."""
    random.setstate(saved["python"])
    np.random.set_state(saved["numpy"])
    torch.set_rng_state(saved["torch"])
    if saved.get("tracker") is not None:
        get_rng_tracker().set_states(saved["tracker"])
    if "cuda" in saved and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(saved["cuda"])
