"""The training loop, top to bottom: set up the parallel world, data, model and engine; then step, log,
evaluate and save until ``train.iters``.
"""
from __future__ import annotations

import os
import random
import signal
import time
from typing import Optional

import numpy as np
import torch
import torch.distributed as dist

from megatron_mtp.checkpoint.manager import CheckpointManager
from megatron_mtp.config import Config, ConfigError
from megatron_mtp.data.pipeline import build_train_iterators
from megatron_mtp.model.builder import build_model
from megatron_mtp.model.mtp_model import count_parameters
from megatron_mtp.parallel import state
from megatron_mtp.parallel.distributed import init_distributed
from megatron_mtp.parallel.random import model_parallel_seed
from megatron_mtp.training import run_lock
from megatron_mtp.training.deepspeed_engine import DeepSpeedEngine
from megatron_mtp.training.engine import uses_deepspeed
from megatron_mtp.training.guard import SkipCounter, save_if_finite
from megatron_mtp.training.local_engine import LocalEngine, use_master_weights
from megatron_mtp.training.metrics import (MetricsLogger, flops_per_token, peak_flops, peak_memory_gib,
                                           plot_head_losses)
from megatron_mtp.validation import validate_run


def resolve_device(cfg: Config) -> torch.device:
    want = cfg.train.device
    if want == "auto":
        want = "cuda" if torch.cuda.is_available() else "cpu"
    if want == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError("train.device is cuda but no CUDA device is visible; use --train.device cpu.")
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def resolve_dtype(cfg: Config, device: torch.device) -> torch.dtype:
    """The compute dtype: bf16 on the GPU by default (bf16 parameters with fp32 masters under
    ``train.master_weights``, the default; else autocast over fp32 parameters), fp32 on the CPU."""
    name = cfg.train.dtype
    if name == "auto":
        name = "bfloat16" if device.type == "cuda" else "float32"
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float64": torch.float64}[name]


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


class _StopRequest:
    """SIGTERM / SIGUSR1 (Slurm pre-emption) ask for a checkpoint at the next step boundary, then exit."""

    def __init__(self):
        self.signal: Optional[int] = None
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            try:
                signal.signal(sig, self._handler)
            except ValueError:  # not the main thread (e.g. inside a test harness)
                pass

    def _handler(self, signum, frame):
        self.signal = signum

    def requested(self, device: torch.device) -> bool:
        flag = torch.tensor([1.0 if self.signal is not None else 0.0], device=device)
        if dist.is_initialized():
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)  # every rank stops at the same step
        return bool(flag.item())


def train(cfg: Config) -> dict:
    """Run training as configured; returns a summary (final losses, steps, run dir)."""
    env = init_distributed(cfg.parallel.backend, timeout_s=cfg.parallel.timeout_minutes * 60,
                           heartbeat_timeout_s=cfg.parallel.heartbeat_timeout_s)
    dp = validate_run(cfg, env.world_size)  # every cross-section rule, before anything is written
    state.initialize_model_parallel(cfg.parallel.tp, cfg.parallel.pp)
    device = resolve_device(cfg)
    dtype = resolve_dtype(cfg, device)
    is_logger = env.rank == env.world_size - 1 if cfg.parallel.pp > 1 else env.rank == 0
    print(f"rank {env.rank}/{env.world_size} (launcher {env.launcher}): tp {state.tp_rank()}/{state.tp_size()} "
          f"dp {state.dp_rank()}/{dp} pp {state.pp_rank()}/{state.pp_size()} on {device}", flush=True)
    run_dir = cfg.train.run_dir
    # One run directory, one trainer: refused on every rank before anything is written (training/run_lock.py).
    run_lock.lock_run_dir(run_dir, env.rank, device)
    if env.rank == 0:
        os.makedirs(run_dir, exist_ok=True)
        cfg.save(os.path.join(run_dir, "config.yaml"))
    seed_everything(cfg.train.seed)

    # ---- data: every DP rank reads its own slice of each global batch ----
    t = cfg.train
    train_iter, valid_iter = build_train_iterators(cfg, dp_rank=state.dp_rank(), dp_size=dp,
                                                   is_builder=env.rank == 0)

    # Dropout streams: the default one alike on every TP rank, the tracker's one per TP rank. Seeded after
    # the data set-up, which may draw random numbers on the builder rank only.
    model_parallel_seed(cfg.train.seed, device)

    # ---- model and engine ----
    if uses_deepspeed(cfg, dp):
        engine = DeepSpeedEngine(cfg, device, dtype)
    else:
        engine = LocalEngine(build_model(cfg, device, dtype, seed=cfg.train.seed), cfg, device, dtype,
                             master_weights=use_master_weights(cfg, device, dtype))
    n_params = count_parameters(engine.model)
    if env.rank == 0:
        print(f"model: {n_params / 1e6:.2f}M parameters on this rank, {cfg.mtp.n_heads} heads "
              f"({cfg.mtp.head_type}), global batch {t.global_batch_size} x {cfg.data.seq_length} tokens, "
              f"grad accumulation {t.grad_accum}", flush=True)

    # ---- resume ----
    ckpt = CheckpointManager(cfg, engine, env.rank)
    start_step = ckpt.resume(train_iter)
    logger = MetricsLogger(run_dir, enabled=is_logger, tensorboard=cfg.logging.tensorboard, resume=start_step > 0,
                           start_step=start_step)

    tokens_per_step = t.global_batch_size * cfg.data.seq_length
    flops_per_step = flops_per_token(cfg.model, cfg.mtp, cfg.data.seq_length) * tokens_per_step
    gpus = env.world_size
    peak = peak_flops(device)
    stop = _StopRequest()
    # Non-finite steps are skipped by the engines; here they are counted, left out of the logged losses, and
    # too many in a row stop the run (training/guard.py). Checkpoints go through save_if_finite.
    skips = SkipCounter(t.max_consecutive_skips, is_reporter=is_logger)
    last_record: dict = {}
    step = start_step
    window_start, window_steps = time.perf_counter(), 0
    window_loss, window_heads = 0.0, 0.0  # sums over the logging window, kept on the device
    while step < t.iters:
        micro_batches = [next(train_iter) for _ in range(t.grad_accum)]
        result = engine.train_step(micro_batches, step)
        skips.record(result.skipped, step + 1)  # raises on train.max_consecutive_skips in a row
        # Logged losses are means over the logging window's applied steps (as Megatron logs them): device
        # tensors, no sync.
        if not result.skipped:
            window_loss = window_loss + result.loss.detach()
            window_heads = window_heads + result.head_losses.detach()
        step += 1
        window_steps += 1
        if step % cfg.logging.interval == 0 or step == t.iters:
            # Host syncs: this copy once per log interval; every step, the one-element stop-request flag below
            # and the non-finite test of the engines (training/guard.py).
            skipped = skips.take_window()
            applied = window_steps - skipped
            if applied:
                losses = (window_heads / applied).float().cpu().tolist()
                mean_loss = float(window_loss / applied)
            else:
                losses, mean_loss = [float("nan")] * cfg.mtp.n_heads, float("nan")
            elapsed = time.perf_counter() - window_start
            tflops = flops_per_step * window_steps / elapsed / gpus / 1e12
            record = {
                "step": step,
                "loss": mean_loss,
                **{f"loss_head_{i + 1}": float(v) for i, v in enumerate(losses)},
                "lr": result.lr,
                "grad_norm": float(result.grad_norm),
                "tokens_per_s": tokens_per_step * window_steps / elapsed,
                "step_time_s": elapsed / window_steps,
                "tflops": tflops,
                "mfu": tflops * 1e12 / peak if peak else None,
                "memory_gib": peak_memory_gib(device),
                "consumed_samples": step * t.global_batch_size,
                "skipped_iters": skipped,
            }
            logger.log(record, t.iters)
            last_record = record
        if t.eval_interval and valid_iter is not None and step % t.eval_interval == 0:
            heads = engine.eval_step([next(valid_iter) for _ in range(t.eval_iters)])
            if is_logger:
                print(f"validation at step {step}: " + " ".join(f"head{i + 1} {float(v):.4f}"
                                                               for i, v in enumerate(heads)), flush=True)
        if ckpt.due(step):
            save_if_finite(ckpt, engine, step, train_iter)
        if stop.requested(device):
            if env.rank == 0:
                print(f"stop signal received: saving a checkpoint at step {step} and exiting", flush=True)
            save_if_finite(ckpt, engine, step, train_iter)
            break
        if t.exit_interval and step % t.exit_interval == 0 and step < t.iters:
            if env.rank == 0:
                print(f"train.exit_interval reached: saving a checkpoint at step {step} and exiting", flush=True)
            if not ckpt.saved_at(step):
                save_if_finite(ckpt, engine, step, train_iter)
            break
        if window_steps and step % cfg.logging.interval == 0:  # evaluation and saving stay out of the timing
            window_start, window_steps = time.perf_counter(), 0
            window_loss, window_heads = 0.0, 0.0
    else:
        if cfg.checkpoint.save and not ckpt.saved_at(step):
            save_if_finite(ckpt, engine, step, train_iter)
    logger.close()
    if is_logger and cfg.logging.plot and last_record:
        plot_head_losses(run_dir)
    if env.rank == 0:
        run_lock.release(run_dir)
    return {"step": step, "run_dir": run_dir, "last": last_record, "rank": env.rank}
