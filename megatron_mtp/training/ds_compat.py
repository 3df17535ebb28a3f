"""Every touch of DeepSpeed's private API, in one place, each with the DeepSpeed versions it was checked
against. ``tests/test_ds_compat.py`` fails loudly when an installed DeepSpeed no longer has a patched member
(``PATCHED_MEMBERS``); update the patch, the versions and the test together.

Public DeepSpeed API (``deepspeed.initialize``, ``save_checkpoint`` / ``load_checkpoint``, ``train_batch``,
``PipelineModule`` and its specs, the topology) is used where it belongs; only what reaches past it is here.
DeepSpeed is imported inside the functions: it is an optional dependency, and it picks its accelerator when
first imported, which ``DeepSpeedEngine`` sets up before anything here runs.
"""
from __future__ import annotations

import importlib
import logging
import sys
from typing import Callable

import torch

from megatron_mtp.io_utils import allow_globals, load_torch

CHECKED_VERSIONS = ("0.19.8",)

# (module, class or None, member): everything below reads or replaces these. The test imports each and
# checks the member exists.
PATCHED_MEMBERS = (
    ("deepspeed.runtime.compiler", None, "compile"),  # quiet_startup
    ("deepspeed.runtime.compiler", None, "dummy_decorator"),  # quiet_startup
    ("deepspeed.runtime.zero.muon.muon_optimizer", None, None),  # quiet_startup: imported early
    ("deepspeed.comm.torch", None, "build_shm_op"),  # quiet_startup
    ("deepspeed.runtime.engine", "DeepSpeedEngine", "_take_model_step"),  # own_fp32_clipping
    ("deepspeed.runtime.engine", "DeepSpeedEngine", "clip_fp32_gradients"),  # own_fp32_clipping
    ("deepspeed.runtime.engine", "DeepSpeedEngine", "_copy_recovery_script"),  # keep_recovery_script_in
    ("deepspeed.runtime.engine", "DeepSpeedEngine", "checkpoint_engine"),  # load_checkpoints_weights_only
    ("deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine", "TorchCheckpointEngine", "load"),
    ("deepspeed.runtime.pipe.engine", "PipelineEngine", "agg_additional_losses"),  # additional_losses
    ("deepspeed.runtime.zero.stage_1_and_2", "DeepSpeedZeroOptimizer", "refresh_fp32_params"),  # refresh_fp32_params
    ("deepspeed.runtime.bf16_optimizer", "BF16_Optimizer", "refresh_fp32_params"),
    ("deepspeed.runtime.pipe.module", "PipelineModule", "_partition_layers"),  # overridden: pipeline_module.py
    ("deepspeed.runtime.pipe.module", "PipelineModule", "_layer_specs"),  # layer_specs
    ("deepspeed.runtime.pipe.module", "PipelineModule", "_count_layer_params"),  # count_layer_params
    ("deepspeed.runtime.pipe.module", "PipelineModule", "_set_bounds"),  # set_stage_bounds
    ("deepspeed.runtime.pipe.module", "PipelineModule", "_topo"),
    ("deepspeed.runtime.pipe.module", "PipelineModule", "ds_pipe_replicated"),  # is_pipe_replicated (on params)
    ("deepspeed.runtime.pipe.module", "PipelineModule", "get_additional_losses"),
    ("deepspeed.runtime.utils", None, "partition_uniform"),
    ("deepspeed.runtime.utils", None, "partition_balanced"),
    ("deepspeed.runtime.fp16.loss_scaler", None, "LossScaler"),  # _data_classes (weights-only allow-list)
    ("deepspeed.runtime.fp16.loss_scaler", None, "DynamicLossScaler"),
    ("deepspeed.runtime.zero.config", None, "ZeroStageEnum"),
    ("deepspeed.utils.tensor_fragment", None, "fragment_address"),
)
# Attributes DeepSpeed sets on instances (of the class, or of the parameters it holds): the test looks for the
# assignment in the class's source.
INSTANCE_MEMBERS = {"checkpoint_engine", "agg_additional_losses", "_layer_specs", "_topo", "ds_pipe_replicated"}


def quiet_startup(device: torch.device) -> None:
    """Cut DeepSpeed's start-up, which is seconds per process (checked: 0.19.8):

    * INFO logging off;
    * ZeRO and the bf16 optimizer import DeepSpeed's Muon optimizer for ``isinstance`` checks, and that module
      ``torch.compile``-decorates its kernels at import, which imports torch's inductor (5-10 s a process).
      We never run Muon (the optimizer is our AdamW), so it is imported once here with the decorator off;
    * on CPU, no JIT build of DeepSpeed's shared-memory all-reduce op (a C++ compile of a minute or more on a
      fresh machine, used only by inference all-reduce).
    Both are speed-ups only: if a DeepSpeed release moves these internals, start-up is just slower.
    """
    from deepspeed.utils import logger as ds_logger

    ds_logger.setLevel(logging.WARNING)
    try:
        if "deepspeed.runtime.zero.muon.original_muon" not in sys.modules:
            from deepspeed.runtime import compiler

            compile_decorator = compiler.compile
            compiler.compile = lambda: compiler.dummy_decorator
            try:
                importlib.import_module("deepspeed.runtime.zero.muon.muon_optimizer")
            finally:
                compiler.compile = compile_decorator
    except (ImportError, AttributeError):
        pass
    if device.type == "cpu":
        try:
            module = importlib.import_module("deepspeed.comm.torch")
            if hasattr(module, "build_shm_op"):
                module.build_shm_op = lambda: None
        except ImportError:
            pass


def own_fp32_clipping(ds_engine, clip: Callable[[], torch.Tensor], on_norm: Callable[[torch.Tensor], None]) -> None:
    """Without ZeRO or bf16 DeepSpeed steps the torch optimizer itself: run ``clip`` (our TP/PP-aware norm
    and clipping) right before that step, after the DP/tied reductions, hand the norm to ``on_norm``, and
    skip DeepSpeed's own clipping (checked: 0.19.8, ``DeepSpeedEngine._take_model_step`` /
    ``clip_fp32_gradients``)."""
    take_model_step = ds_engine._take_model_step

    def _take_model_step(*args, **kwargs):
        on_norm(clip())
        return take_model_step(*args, **kwargs)

    ds_engine._take_model_step = _take_model_step
    ds_engine.clip_fp32_gradients = lambda: None


def keep_recovery_script_in(ds_engine, ckpt_dir: str) -> None:
    """DeepSpeed drops its zero_to_fp32.py next to the tags, i.e. into our checkpoints/ directory: keep it
    inside the step directory, which is published atomically with the rest (checked: 0.19.8)."""
    cls = type(ds_engine)
    if hasattr(cls, "_copy_recovery_script"):
        ds_engine._copy_recovery_script = lambda _save_path: cls._copy_recovery_script(ds_engine, ckpt_dir)


def _data_classes() -> list:
    """The plain data holders DeepSpeed pickles into its ZeRO optimizer files (checked: 0.19.8): an enum, a
    dataclass of two ints and the loss scaler's attributes. None runs code when built."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [ZeroStageEnum, fragment_address, LossScaler, DynamicLossScaler]


def allow_deepspeed_files() -> None:
    """Weights-only loading (``io_utils.load_torch``) may build ``_data_classes`` for files that name them;
    called by whatever reads DeepSpeed's files (the engine, ``checkpoint/deepspeed_format.py``)."""
    allow_globals("deepspeed.", _data_classes)


def load_checkpoints_weights_only(ds_engine) -> None:
    """DeepSpeed's checkpoint engine unpickles with ``weights_only=False`` (0.19.8), so a hostile file would
    run code: every DeepSpeed file (model states, layer files, ZeRO partitions) is read through
    ``io_utils.load_torch`` instead, which raises ``UnsafeFileError`` for anything but tensors and data."""
    allow_deepspeed_files()
    checkpoint_engine = ds_engine.checkpoint_engine

    def load(path: str, map_location=None):
        return load_torch(path, map_location=map_location if map_location is not None else "cpu")

    checkpoint_engine.load = load


def is_pipe_replicated(param) -> bool:
    """A tied weight's copy on a stage that does not own it (DeepSpeed marks it ``ds_pipe_replicated``;
    checked: 0.19.8): gradient norms count it once, on the owning stage. False outside DeepSpeed."""
    return bool(getattr(param, "ds_pipe_replicated", False))


def refresh_fp32_params(ds_engine) -> None:
    """DeepSpeed's mixed-precision optimizers keep fp32 master copies: refresh them from the module after
    its weights were overwritten (checked: 0.19.8, bf16 / ZeRO 1-2 optimizers)."""
    optimizer = getattr(ds_engine, "optimizer", None)
    if optimizer is not None and hasattr(optimizer, "refresh_fp32_params"):
        optimizer.refresh_fp32_params()


def additional_losses(ds_engine) -> list:
    """The pipeline engine's per-head losses of the last ``train_batch`` (averaged over micro-batches and
    DP, broadcast to every stage; checked: 0.19.8 ``PipelineEngine.agg_additional_losses``)."""
    return list(ds_engine.agg_additional_losses.values())


def has_additional_losses() -> bool:
    """Does this DeepSpeed's pipeline report additional losses (the per-head losses)?"""
    from deepspeed.pipe import PipelineModule

    return hasattr(PipelineModule, "get_additional_losses")


# ---- the pipeline module (training/pipeline_module.py overrides PipelineModule._partition_layers, the hook
# DeepSpeed calls from __init__ to place layers; checked: 0.19.8)


def layer_specs(module) -> list:
    """The PipelineModule's layer specs, in order."""
    return module._layer_specs


def count_layer_params(module) -> list:
    """Parameters per layer spec, as DeepSpeed's ``parameters`` partitioner counts them."""
    return module._count_layer_params()


def set_stage_bounds(module, parts: list) -> None:
    """Keep the layers [parts[stage], parts[stage + 1]) of this rank's stage."""
    stage = module._topo.get_coord(module.global_rank).pipe
    module._set_bounds(start=parts[stage], stop=parts[stage + 1])


def partition_uniform(num_items: int, num_parts: int) -> list:
    from deepspeed.runtime import utils

    return utils.partition_uniform(num_items=num_items, num_parts=num_parts)


def partition_balanced(weights: list, num_parts: int) -> list:
    from deepspeed.runtime import utils

    return utils.partition_balanced(weights=weights, num_parts=num_parts)
