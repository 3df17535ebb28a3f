"""Convert a checkpoint to another tensor/pipeline/data-parallel layout.

Every tensor is turned into its full form with ``unshard`` (keyed by ``init_key``, vocabulary padding
dropped) and cut again with ``shard_of`` for the new layout; Adam's ``exp_avg`` / ``exp_avg_sq`` have the
parameter's shape and go the same way, the step count is shared. The result is a *run directory*
(``config.yaml`` with the new ``parallel.tp`` / ``parallel.pp``, ``checkpoints/step_XXXXXXXX``, ``latest``,
and the source run's ``metrics.jsonl`` up to that step), so

    mtp-train --config OUT/config.yaml            (launched with tp x pp x dp ranks)

continues the run exactly where it stopped: same step, data position, LR schedule and optimizer moments.

Files written: LocalEngine's own (``model_tpXX.pt``) when the new layout runs LocalEngine (pp=1, dp=1,
ZeRO 0); otherwise the layout-independent format (``weights.pt`` + ``optimizer.pt``, engine
``Universal``), which the CheckpointManager cuts for each rank of the DeepSpeed engine as it loads; the
first checkpoint saved afterwards is DeepSpeed's own again. Under ZeRO 1/2 the *target* optimizer is
sharded into flat partitions, which we do not write: the weights and position are restored and the
Adam moments restart from zero, with a loud warning (see docs/checkpoints.md). RNG states are kept only
when the layout does not change (they are per rank).
"""
from __future__ import annotations

import copy
import json
import os
import sys
from typing import Optional

from megatron_mtp.checkpoint.formats import open_checkpoint, publish_as_run
from megatron_mtp.checkpoint.store import (LOCAL_FORMAT, UNIVERSAL_FORMAT, locate_run_tokenizer, resolve_checkpoint,
                                           verify_checkpoint)
from megatron_mtp.config import ConfigError, validate
from megatron_mtp.data.tokenizers import build_tokenizer, install_run_tokenizer
from megatron_mtp.errors import CheckpointError, LayoutError
from megatron_mtp.io_utils import atomic_write_text
from megatron_mtp.training.engine import uses_deepspeed
from megatron_mtp.validation import validate_run


def _warn(msg: str) -> None:
    print(f"WARNING: {msg}", file=sys.stderr, flush=True)


def target_config(cfg, tp: int, pp: int, dp: int, zero_stage: Optional[int], run_dir: str):
    """The source config at the new layout; raises CheckpointError when the layout cannot hold the model."""
    cfg = copy.deepcopy(cfg)
    cfg.parallel.tp, cfg.parallel.pp = tp, pp
    if zero_stage is not None:
        cfg.parallel.zero_stage = zero_stage
    if pp > 1 and cfg.parallel.zero_stage > 1:
        cfg.parallel.zero_stage = 1
        _warn("ZeRO stage 2 is not possible with pipeline parallelism: the new config uses parallel.zero_stage 1.")
    cfg.train.grad_accum = None  # re-derived from the (unchanged) global batch at the new data-parallel size
    cfg.train.run_dir = os.path.abspath(run_dir)
    cfg.checkpoint.load = None
    cfg.checkpoint.finetune = False
    try:
        validate(cfg)
        validate_run(cfg, tp * pp * dp)
    except (ConfigError, LayoutError) as exc:
        raise CheckpointError(f"cannot reshard to tp={tp} pp={pp} dp={dp}: {str(exc).rstrip('.')}.") from None
    return cfg


def _copy_metrics(src_ckpt: str, out_dir: str, step: int) -> None:
    run_dir = os.path.dirname(os.path.dirname(os.path.abspath(src_ckpt)))
    src = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.isfile(src):
        return
    kept = []
    with open(src) as f:
        for line in f:
            try:
                if int(json.loads(line).get("step", 0)) <= step:
                    kept.append(line if line.endswith("\n") else line + "\n")
            except (json.JSONDecodeError, ValueError):
                continue
    atomic_write_text(os.path.join(out_dir, "metrics.jsonl"), "".join(kept))


def reshard(load: str, output: str, tp: int, pp: int, dp: Optional[int] = None,
            zero_stage: Optional[int] = None, weights_only: bool = False) -> str:
    """Write the checkpoint ``load`` (run dir or step dir) at layout tp x pp x dp into run dir ``output``;
    returns the new checkpoint directory."""
    ckpt = resolve_checkpoint(load)
    meta = verify_checkpoint(ckpt)
    reader = open_checkpoint(ckpt, meta, hash_files=False)  # verify_checkpoint hashed every file
    dp = int(dp or meta.get("dp", 1))
    if os.path.isdir(os.path.join(output, "checkpoints")):
        raise CheckpointError(f"{output} already holds checkpoints; choose a new --output directory.")
    locate_run_tokenizer(reader.cfg, ckpt)
    tokenizer = build_tokenizer(reader.cfg.data.tokenizer_type, reader.cfg.data.tokenizer_model)  # before writing
    cfg = target_config(reader.cfg, tp, pp, dp, zero_stage, output)
    optim = None if weights_only else reader.optimizer_state()
    if optim is None and not weights_only:
        _warn(f"{ckpt} holds no optimizer state this tool can read (e.g. DeepSpeed ZeRO partitions): the resharded "
              f"checkpoint keeps weights, step and data position, and Adam restarts from zero moments.")
    same = (meta.get("tp"), meta.get("pp"), meta.get("dp")) == (tp, pp, dp)
    rng = {r: p.get("rng") for r, p in reader.payloads.items()} if same else None
    os.makedirs(output, exist_ok=True)
    cfg.data.tokenizer_model = install_run_tokenizer(tokenizer, output)  # the new run carries its tokenizer
    target_local = not uses_deepspeed(cfg, dp)
    if not target_local and cfg.parallel.zero_stage > 0 and optim is not None:
        _warn(f"the new layout uses ZeRO stage {cfg.parallel.zero_stage}, whose optimizer partitions are "
              f"DeepSpeed's: the Adam moments are kept in the checkpoint but will only be restored by engines "
              f"with an unsharded optimizer (ZeRO 0); under ZeRO they restart from zero.")
    out = publish_as_run(output, cfg, tp=tp, pp=pp, dp=dp, weights=reader.weight, optim=optim, step=reader.step,
                         consumed_samples=reader.consumed_samples(), rng_by_rank=rng, weights_only=weights_only,
                         engine=LOCAL_FORMAT if target_local else UNIVERSAL_FORMAT)
    _copy_metrics(ckpt, output, reader.step)
    return out
