"""What the training loop and the checkpoint manager may ask of an engine, and which engine a run uses.

Two engines implement ``Engine``: ``LocalEngine`` (one process or one tensor-parallel group, plain PyTorch)
and ``DeepSpeedEngine`` (data parallelism, ZeRO, the pipeline schedule). Nothing outside an engine touches
its optimizer or DeepSpeed's objects: the checkpoint manager saves and loads through ``save_to`` /
``load_from`` and, for checkpoints of another layout, through ``load_full_weights`` /
``load_full_optimizer_state`` (canonical, layout-independent tensors keyed by ``init_key``).

Why the state is a directory rather than one ``state_dict``: under ZeRO every rank holds a different
partition of the optimizer and DeepSpeed writes and reads its own files, so each engine saves its rank's
share into the checkpoint directory. ``LocalEngine``'s file is its ``state_dict()`` (model + optimizer).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Protocol, runtime_checkable

import torch

from megatron_mtp.config import Config
from megatron_mtp.parallel.canonical import inject_optimizer_state, marks_of
from megatron_mtp.training.lr_schedule import learning_rate

# On-disk format ids of the engines' checkpoint files (meta.json's "engine"); bump the version when the
# files change so that old checkpoints stay readable by id.
LOCAL_FORMAT = "local-v1"  # model_tpXX.pt = {"model": state_dict, "optimizer": AdamW state_dict}
DEEPSPEED_FORMAT = "deepspeed-v1"  # DeepSpeed's own files (checkpoint/deepspeed_format.py reads them)


@dataclass
class StepResult:
    loss: torch.Tensor  # weighted total, averaged over micro-batches (a device tensor: no host sync)
    head_losses: torch.Tensor  # [n] per-head mean losses
    grad_norm: torch.Tensor
    lr: float
    skipped: bool = False  # the loss or gradient norm was not finite, so no update (training/guard.py)


@runtime_checkable
class Engine(Protocol):
    model: torch.nn.Module  # this rank's module (a pipeline stage under PP)
    checkpoint_format: str  # LOCAL_FORMAT or DEEPSPEED_FORMAT

    def train_step(self, micro_batches: list, step: int) -> StepResult:
        """One optimizer step over the micro-batches (gradient accumulation), LR from ``lr_at(step)``."""

    def eval_step(self, micro_batches: list) -> torch.Tensor:
        """Per-head mean losses [n] over the micro-batches (and DP ranks), on every rank."""

    def lr_at(self, step: int) -> float:
        ...

    def save_to(self, ckpt_dir: str) -> None:
        """Write this rank's model and optimizer shards into ``ckpt_dir``."""

    def load_from(self, ckpt_dir: str, load_optimizer: bool = True) -> None:
        """Read back what ``save_to`` wrote (same layout)."""

    def load_full_weights(self, weight: Callable[[str], torch.Tensor]) -> None:
        """Take this rank's shard of every canonical weight (``weight(init_key)``), masters included."""

    def load_full_optimizer_state(self, optim: dict) -> bool:
        """Take this rank's shards of canonical Adam moments; False (nothing changed) when impossible."""

    def parameter_marks(self) -> list:
        """name and partition marks of every parameter of ``model`` (saved per rank for readers)."""

    def optimizer_keys(self) -> Optional[list]:
        """init_keys of the optimizer's parameters, group by group (the numbering of its state_dict)."""


class EngineBase:
    """What both engines share, from their ``cfg``, ``model`` and (torch) ``optimizer``."""

    def lr_at(self, step: int) -> float:
        return lr_at(self.cfg, step)

    def load_full_optimizer_state(self, optim: dict) -> bool:
        return inject_optimizer_state(self.optimizer, self.model, optim)

    def parameter_marks(self) -> list:
        return parameter_marks(self.model)

    def optimizer_keys(self) -> Optional[list]:
        return optimizer_keys(self.optimizer, self.model)


def uses_deepspeed_layout(dp: int, pp: int, zero_stage: int) -> bool:
    """The one place that decides the engine: data parallelism, pipeline stages or ZeRO need DeepSpeed;
    one replica (one process or one TP group) runs LocalEngine."""
    return dp > 1 or pp > 1 or zero_stage > 0


def uses_deepspeed(cfg: Config, dp: int) -> bool:
    return uses_deepspeed_layout(dp, cfg.parallel.pp, cfg.parallel.zero_stage)


def lr_at(cfg: Config, step: int) -> float:
    """The learning rate of optimizer step ``step`` (both engines set it every step)."""
    o = cfg.optimizer
    return learning_rate(step, o.lr, o.min_lr, o.warmup_iters, o.decay_iters or cfg.train.iters)


def parameter_marks(model: torch.nn.Module) -> list:
    return [dict(name=name, **marks_of(p)) for name, p in model.named_parameters()
            if getattr(p, "init_key", None) is not None]


def optimizer_keys(optimizer, model: torch.nn.Module) -> Optional[list]:
    """init_keys of a torch optimizer's parameters, group by group, or None when its groups hold something
    else (ZeRO's flat partitions)."""
    if optimizer is None or not hasattr(optimizer, "param_groups"):
        return None
    keys = {id(p): getattr(p, "init_key", None) for p in model.parameters()}
    out = []
    for group in optimizer.param_groups:
        names = [keys.get(id(p)) for p in group["params"]]
        if any(k is None for k in names):
            return None
        out.append(names)
    return out
