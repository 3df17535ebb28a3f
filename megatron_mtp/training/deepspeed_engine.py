"""The DeepSpeed engine: data parallelism, ZeRO optimizer sharding and the pipeline schedule.

Implements ``training.engine.Engine``, as ``LocalEngine`` does, so the training loop and the checkpoint
manager drive either. Every touch of DeepSpeed's private API goes through ``ds_compat``. What DeepSpeed
does here, and what we keep:

* **DeepSpeed**: the DP gradient all-reduce (ZeRO 0) or reduce-scatter into optimizer shards (ZeRO 1/2), the
  sharded optimizer step and parameter all-gather, bf16 master weights with fp32 gradient accumulation on
  GPU, the pipeline engine and its 1F1B schedule (PP > 1), tied-weight gradient all-reduce across stages,
  and checkpoint files (``save_checkpoint`` / ``load_checkpoint``).
* **Ours**: the process groups (``megatron_mtp.parallel.state``, handed to DeepSpeed as a Megatron-style
  ``mpu`` with PP = 1, or as an equal ``PipeModelDataParallelTopology`` with PP > 1), the torch AdamW client
  optimizer with our param groups, the learning rate (set every step from ``lr_schedule``, exactly as
  ``LocalEngine`` does, so curves match), the layout-independent initialisation, and the loss.

The DeepSpeed config is generated from ``parallel.*``, ``optimizer.*`` and ``train.*`` (see ``ds_config``);
``parallel.deepspeed_config`` (a JSON file) is merged over it, and a JSON that contradicts our config (a
different batch size, ZeRO stage, clipping, precision, or its own optimizer/scheduler) is a ``ConfigError``.
"""
from __future__ import annotations

import copy
import json
import os
from contextlib import nullcontext
from datetime import timedelta
from typing import Callable, Optional

import torch
import torch.distributed as dist

from megatron_mtp.config import Config, ConfigError
from megatron_mtp.model.builder import build_model, param_dtype
from megatron_mtp.model.compile import apply_compile
from megatron_mtp.model.mtp_model import checkpoint_interval
from megatron_mtp.ops.fp8 import apply_fp8, check_fp8_device
from megatron_mtp.parallel import state
from megatron_mtp.parallel.canonical import copy_into_model
from megatron_mtp.parallel.distributed import _free_port
from megatron_mtp.parallel.layers import initialize_parameters
from megatron_mtp.training import ds_compat
from megatron_mtp.training.engine import DEEPSPEED_FORMAT, EngineBase, StepResult
from megatron_mtp.training.grads import autocast_context, clip_gradients
from megatron_mtp.training.guard import all_finite, poison_non_finite
from megatron_mtp.training.optimizer import build_optimizer
from megatron_mtp.validation import check_zero_with_pipeline, validate_layout

# ---------------------------------------------------------------------------------------------------------
# The model-parallel unit DeepSpeed queries for groups


class MegatronMPU:
    """Megatron-style ``mpu`` over ``megatron_mtp.parallel.state``.

    "Model parallel" is DeepSpeed's (and Megatron's) everything-holding-one-replica group, TP x PP; its rank
    is the position in that group (pp_rank * tp + tp_rank), as in DeepSpeed's own ``PipelineParallelGrid``.
    Tensor-parallel getters answer for the TP group alone. No ``get_sequence_parallel_*``: DeepSpeed's
    "sequence parallel" is Ulysses, not Megatron's sequence parallelism, which stays inside our layers.
    """

    # one model replica: TP x PP
    def get_model_parallel_rank(self) -> int:
        s = state.get_state()
        return s.pp_rank * s.tp + s.tp_rank

    def get_model_parallel_world_size(self) -> int:
        s = state.get_state()
        return s.tp * s.pp

    def get_model_parallel_group(self):
        return state.get_state().model_parallel_group

    # data parallel
    def get_data_parallel_rank(self) -> int:
        return state.dp_rank()

    def get_data_parallel_world_size(self) -> int:
        return state.dp_size()

    def get_data_parallel_group(self):
        return state.dp_group()

    def get_data_parallel_group_ranks(self) -> list:
        s = state.get_state()
        return [state.rank_of(s.tp_rank, d, s.pp_rank, s.tp, s.dp) for d in range(s.dp)]

    # tensor parallel
    def get_tensor_model_parallel_rank(self) -> int:
        return state.tp_rank()

    def get_tensor_model_parallel_world_size(self) -> int:
        return state.tp_size()

    def get_tensor_model_parallel_group(self):
        return state.tp_group()

    def get_tensor_model_parallel_src_rank(self) -> int:
        s = state.get_state()
        return state.rank_of(0, s.dp_rank, s.pp_rank, s.tp, s.dp)

    get_slice_parallel_rank = get_tensor_model_parallel_rank
    get_slice_parallel_world_size = get_tensor_model_parallel_world_size
    get_slice_parallel_group = get_tensor_model_parallel_group

    # pipeline parallel
    def get_pipe_parallel_rank(self) -> int:
        return state.pp_rank()

    def get_pipe_parallel_world_size(self) -> int:
        return state.pp_size()

    def get_pipe_parallel_group(self):
        return state.pp_group()

    get_pipeline_model_parallel_rank = get_pipe_parallel_rank
    get_pipeline_model_parallel_world_size = get_pipe_parallel_world_size
    get_pipeline_model_parallel_group = get_pipe_parallel_group


def pipeline_topology(tp: int, pp: int, dp: int):
    """DeepSpeed's topology for our layout; its row-major rank order (pipe, data, model) is Megatron's
    tp -> dp -> pp, which ``check_topology`` verifies rank by rank."""
    from deepspeed.runtime.pipe.topology import PipeModelDataParallelTopology

    topo = PipeModelDataParallelTopology(num_pp=pp, num_mp=tp, num_dp=dp)
    check_topology(topo, tp, pp, dp)
    return topo


def check_topology(topo, tp: int, pp: int, dp: int) -> None:
    for rank in range(tp * pp * dp):
        coord = topo.get_coord(rank)
        ours = state.layout_coordinates(rank, tp, dp)  # (tp_rank, dp_rank, pp_rank)
        if (coord.model, coord.data, coord.pipe) != ours:
            raise RuntimeError(f"DeepSpeed's topology puts rank {rank} at {coord}, ours at tp/dp/pp {ours}.")


# ---------------------------------------------------------------------------------------------------------
# The DeepSpeed config


def _is_bf16(device: torch.device, dtype: torch.dtype) -> bool:
    return device.type == "cuda" and dtype == torch.bfloat16


def ds_config(cfg: Config, device: torch.device, dtype: torch.dtype) -> dict:
    """Our DeepSpeed config, before the user's JSON is merged over it.

    Precision: fp32 on CPU. On GPU with bf16 and ZeRO >= 1, DeepSpeed holds bf16 parameters and fp32 master
    weights with fp32 gradient accumulation. DeepSpeed has no fp32-accumulating bf16 mode without ZeRO, so
    with ZeRO 0 DeepSpeed stays fp32 (fp32 weights, grads, all-reduce) and the forward runs under bf16
    autocast, as ``LocalEngine`` does.
    """
    t, o, p = cfg.train, cfg.optimizer, cfg.parallel
    cuda = device.type == "cuda"
    config = {
        "train_batch_size": t.global_batch_size,
        "train_micro_batch_size_per_gpu": t.micro_batch_size,
        "gradient_accumulation_steps": t.grad_accum,
        "gradient_clipping": float(o.clip_grad),
        "zero_allow_untested_optimizer": True,  # our torch AdamW client optimizer
        "zero_optimization": {
            "stage": p.zero_stage,
            "reduce_bucket_size": p.reduce_bucket_size,
            "allgather_bucket_size": p.allgather_bucket_size,
            "contiguous_gradients": True,
            # Overlap needs streams, and gloo has no reduce-scatter: both only on GPU.
            "overlap_comm": cuda,
            "reduce_scatter": cuda,
        },
        "steps_per_print": 2**31 - 1,  # our loop logs
        "wall_clock_breakdown": False,
        "comms_logger": {"enabled": False},
        "dump_state": False,
    }
    if _is_bf16(device, dtype) and p.zero_stage >= 1:
        config["bf16"] = {"enabled": True}
        config["data_types"] = {"grad_accum_dtype": "fp32"}
    if p.pp > 1:
        config["pipeline"] = {
            "activation_checkpoint_interval": checkpoint_interval(t.activation_checkpointing),
            # DeepSpeed's activation partitioning across TP assumes the activation is replicated over TP;
            # under sequence parallelism every TP rank holds a different shard.
            "pipe_partitioned": not p.sequence_parallel,
            "grad_partitioned": not p.sequence_parallel,
        }
    return config


# Keys of our config a user JSON may repeat but not change: "path": "the setting that owns it".
_OWNED = {
    "train_batch_size": "train.global_batch_size",
    "train_micro_batch_size_per_gpu": "train.micro_batch_size",
    "gradient_accumulation_steps": "train.grad_accum",
    "gradient_clipping": "optimizer.clip_grad",
    "zero_optimization.stage": "parallel.zero_stage",
    "bf16.enabled": "train.dtype (bfloat16 on GPU with parallel.zero_stage >= 1)",
    "fp16.enabled": "train.dtype (fp16 is not supported)",
    "data_types.grad_accum_dtype": "train.dtype",
    "pipeline.activation_checkpoint_interval": "train.activation_checkpointing",
}
_FORBIDDEN = {
    "optimizer": "the optimizer is ours: set optimizer.lr, beta1, beta2, eps and weight_decay instead",
    "scheduler": "the learning-rate schedule is ours: set optimizer.lr, min_lr, warmup_iters and decay_iters",
}


def _get(d: dict, path: str):
    for part in path.split("."):
        if not isinstance(d, dict) or part not in d:
            return None
        d = d[part]
    return d


def _merge(base: dict, over: dict) -> dict:
    out = copy.deepcopy(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def _same(a, b) -> bool:
    if isinstance(a, bool) or isinstance(b, bool):
        return bool(a) == bool(b)
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return float(a) == float(b)
    return str(a).lower() == str(b).lower()


def merge_user_config(ours: dict, path: Optional[str]) -> dict:
    """``parallel.deepspeed_config`` merged over ours; a contradiction is a one-sentence ConfigError."""
    if not path:
        return ours
    if not os.path.isfile(path):
        raise ConfigError(f"parallel.deepspeed_config {path!r} does not exist; give the path of a DeepSpeed JSON.")
    try:
        with open(path) as f:
            user = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"parallel.deepspeed_config {path!r} is not valid JSON ({exc.__class__.__name__}).") from None
    if not isinstance(user, dict):
        raise ConfigError(f"parallel.deepspeed_config {path!r} must hold a JSON object.")
    for key, why in _FORBIDDEN.items():
        if key in user:
            raise ConfigError(f"parallel.deepspeed_config {path!r} sets {key!r}, but {why}.")
    for key, owner in _OWNED.items():
        theirs, mine = _get(user, key), _get(ours, key)
        if theirs is None or theirs == "auto":
            continue
        if mine is None:
            mine = False if key.endswith(".enabled") else None
        if mine is None or not _same(theirs, mine):
            raise ConfigError(f"parallel.deepspeed_config {path!r} sets {key}={theirs!r} but our config gives "
                              f"{mine!r} (from {owner}); remove it from the JSON or change {owner.split(' ')[0]}.")
    user = {k: v for k, v in user.items() if v != "auto"}
    return _merge(ours, user)


def _register_sequence_parallel_hooks(module: torch.nn.Module) -> list:
    """Under sequence parallelism replicated weights (norms) see only this rank's sequence shard, so their
    gradients must be summed over TP (``LocalEngine`` does it after backward). Here each gradient is summed
    as it arrives at the parameter's accumulator, before DeepSpeed accumulates, reduces or partitions it.

    A pre-hook on the AccumulateGrad node, not a tensor hook: tensor hooks also fire inside
    ``MemoryEfficientHeads``, whose per-head ``autograd.grad`` computes parameter gradients that reach the
    accumulator again in the outer backward (they would be summed twice). Returns the nodes (keep them alive).
    """
    if state.tp_size() == 1:
        return []
    group = state.tp_group()

    def prehook(grad_outputs):
        grad = grad_outputs[0]
        if grad is None:
            return None
        grad = grad.clone()
        dist.all_reduce(grad, group=group)
        return (grad,) + tuple(grad_outputs[1:])

    nodes = []
    for p in module.parameters():
        if getattr(p, "sequence_parallel", False) and p.requires_grad:
            accumulator = p.view_as(p).grad_fn.next_functions[0][0]
            accumulator.register_prehook(prehook)
            nodes.append(accumulator)
    return nodes


def _ensure_process_group(cfg: Config, device: torch.device) -> None:
    """DeepSpeed needs torch.distributed even for one process (ZeRO on one GPU): start a group of one and
    create our (trivial) parallel groups on it."""
    if dist.is_initialized():
        return
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    if not os.environ.get("MASTER_PORT"):
        os.environ["MASTER_PORT"] = str(_free_port())
    backend = cfg.parallel.backend or ("nccl" if device.type == "cuda" else "gloo")
    dist.init_process_group(backend=backend, init_method="env://", rank=0, world_size=1,
                            timeout=timedelta(seconds=600))
    state.initialize_model_parallel(cfg.parallel.tp, cfg.parallel.pp)


# ---------------------------------------------------------------------------------------------------------
# The engine


class DeepSpeedEngine(EngineBase):
    """DP / ZeRO / pipeline training through DeepSpeed (``training.engine.Engine``)."""

    checkpoint_format = DEEPSPEED_FORMAT

    def __init__(self, cfg: Config, device: torch.device, dtype: torch.dtype):
        self.cfg, self.device, self.dtype = cfg, device, dtype
        os.environ.setdefault("LOCAL_RANK", "0")  # DeepSpeed's PipelineModule reads it
        if device.type == "cpu":  # a CPU run on a GPU machine: DeepSpeed must not pick the CUDA accelerator
            os.environ.setdefault("DS_ACCELERATOR", "cpu")
        # DeepSpeed is imported here, not at module level: it picks its accelerator when imported (the line
        # above must come first), and runs that never use it do not pay for the import.
        import deepspeed

        ds_compat.quiet_startup(device)

        _ensure_process_group(cfg, device)
        # DeepSpeed's comm layer wraps the process group we started (no new rendezvous, no MPI discovery).
        deepspeed.init_distributed(dist_backend=dist.get_backend(), auto_mpi_discovery=False, verbose=False)
        s = state.get_state()
        p, t = cfg.parallel, cfg.train
        # The rules validation.py applies before a run, kept when the engine is built directly.
        check_zero_with_pipeline(p)
        validate_layout(cfg, s.tp * s.pp * s.dp)
        self.config = merge_user_config(ds_config(cfg, device, dtype), p.deepspeed_config)
        self.pipelined = p.pp > 1
        # bf16 without DeepSpeed's bf16 mode (ZeRO 0 on GPU): autocast over fp32 weights, as LocalEngine.
        use_autocast = dtype == torch.bfloat16 and not self.config.get("bf16", {}).get("enabled", False)
        self._autocast = (lambda: autocast_context(device, dtype)) if use_autocast else nullcontext
        if self.pipelined:
            # (imports DeepSpeed's PipelineModule at its module level: after the accelerator choice above)
            from megatron_mtp.training.pipeline_module import build_pipeline_module

            if not ds_compat.has_additional_losses():
                raise ConfigError(f"parallel.pp={p.pp} needs a DeepSpeed whose pipeline reports additional losses "
                                  f"(the per-head losses), but deepspeed {deepspeed.__version__} does not; upgrade "
                                  f"deepspeed (tested with 0.19.8).")

            topology = pipeline_topology(s.tp, s.pp, s.dp)
            module = build_pipeline_module(cfg, topology, dtype=param_dtype(dtype), autocast=self._autocast)
            initialize_parameters(module, t.seed)  # init keys do not depend on the stage
            module.to(device)
            mpu = None  # DeepSpeed uses the module's grid, built from the same topology
        else:
            module = build_model(cfg, device, dtype, seed=t.seed, compile=False)
            mpu = MegatronMPU()
        if t.fp8 and self.pipelined:  # build_model did it on the other path
            check_fp8_device(device)
            apply_fp8(module)
        if t.compile:  # the same pass as the single-replica engine: compile each transformer layer in place
            apply_compile(module)
        self.optimizer = build_optimizer(module, cfg.optimizer, device)
        self.optimizer.param_groups[:] = [g for g in self.optimizer.param_groups if g["params"]]
        self.engine, _, _, _ = deepspeed.initialize(model=module, optimizer=self.optimizer, config=self.config,
                                                    mpu=mpu, dist_init_required=False)
        self.model = self.engine.module
        ds_compat.load_checkpoints_weights_only(self.engine)
        self._grad_accumulators = _register_sequence_parallel_hooks(self.model) if p.sequence_parallel else []
        self._grad_norm: Optional[torch.Tensor] = None
        self._own_clipping = False
        self._skipped = False  # set by our clipping hook when it drops a non-finite step
        if not (self.engine.zero_optimization() or self.engine.bfloat16_enabled() or self.engine.fp16_enabled()):
            self._own_fp32_clipping()

    def _own_fp32_clipping(self) -> None:
        """Without ZeRO or bf16 DeepSpeed steps the torch optimizer itself: compute the norm and clip with
        our groups right before that step (after DP/tied reductions), and skip DeepSpeed's own clipping.

        DeepSpeed's fp32 ZeRO-0 clipping (``clip_grad_norm_``) counts replicated parameters only on
        model-parallel rank 0, i.e. only on the first pipeline stage. ``grads.clip_gradients`` counts
        TP-sharded parameters on every TP rank, replicated ones on TP rank 0 of each stage, tied copies once,
        and sums over the TP x PP group (DP ranks already hold equal, averaged gradients).

        A non-finite norm skips the update (training/guard.py), as DeepSpeed's ZeRO optimizers do by themselves:
        ``_take_norm`` drops the gradients, so the torch optimizer's step passes over every parameter (weights
        and Adam moments untouched) while DeepSpeed's bookkeeping (step counters, zeroing) runs as usual."""
        self._own_clipping = True
        ds_compat.own_fp32_clipping(self.engine, lambda: clip_gradients(self.model, self.cfg.optimizer.clip_grad),
                                    on_norm=self._take_norm)

    def _take_norm(self, norm: torch.Tensor) -> None:
        """Our clipping's norm, right before DeepSpeed steps the torch optimizer: keep it for the log, and
        if it is not finite (on any rank: the test is reduced) drop every gradient, so the step is a no-op."""
        self._grad_norm = norm
        if not all_finite(norm):
            self._skipped = True
            for p in self.model.parameters():
                p.grad = None

    def _grad_norm_tensor(self) -> torch.Tensor:
        norm = self._grad_norm
        if norm is None:
            norm = self.engine.get_global_grad_norm()
        if norm is None:
            return torch.tensor(float("nan"))
        return norm.detach().float().reshape(()) if torch.is_tensor(norm) else torch.tensor(float(norm))

    @staticmethod
    def _pipe_batches(micro_batches: list) -> list:
        """(first stage's input, last stage's labels) per micro-batch: the whole sample travels with the
        activations (model/pipeline.py), so the labels are unused and cost nothing."""
        return [(tokens, tokens) for tokens in micro_batches]

    def _check_accum(self, micro_batches: list) -> None:
        if len(micro_batches) != self.engine.gradient_accumulation_steps():
            raise ValueError(f"train_step got {len(micro_batches)} micro-batches but DeepSpeed accumulates "
                             f"{self.engine.gradient_accumulation_steps()} (train.grad_accum).")

    def train_step(self, micro_batches: list, step: int) -> StepResult:
        self._check_accum(micro_batches)
        lr = self.lr_at(step)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self._grad_norm = None
        self._skipped = False
        if self.pipelined:
            # Under the pipeline the loss is computed inside DeepSpeed's schedule, so a non-finite loss is caught
            # through the gradients it produces (the gradient-norm test) rather than poisoned here.
            loss = self.engine.train_batch(data_iter=iter(self._pipe_batches(micro_batches)))
            heads = torch.stack([v.reshape(()) for v in ds_compat.additional_losses(self.engine)]).float()
            return StepResult(loss.detach().float(), heads, self._grad_norm_tensor(), lr, skipped=self._step_skipped())

        self.engine.train()
        losses = []
        for tokens in micro_batches:
            with self._autocast():
                loss, head_losses = self.engine(tokens.to(self.device, non_blocking=True))
            self.engine.backward(poison_non_finite(loss))  # a non-finite loss fails the step's gradient test
            self.engine.step()
            losses.append(torch.cat([loss.detach().float().reshape(1), head_losses.detach().float()]))
        mean = self._dp_mean(torch.stack(losses).mean(0))
        return StepResult(mean[0], mean[1:], self._grad_norm_tensor(), lr, skipped=self._step_skipped())

    def _step_skipped(self) -> bool:
        """Whether the step just taken left the weights alone (a non-finite gradient norm; the same on every
        rank: DeepSpeed reduces its overflow flag over DP and model parallel, our hook reduces over the world)."""
        return self._skipped if self._own_clipping else not self.engine.was_step_applied()

    def _dp_mean(self, values: torch.Tensor) -> torch.Tensor:
        group = state.dp_group()
        if group is not None and state.dp_size() > 1:
            values = values.clone()
            dist.all_reduce(values, group=group)
            values /= state.dp_size()
        return values

    @torch.no_grad()
    def eval_step(self, micro_batches: list) -> torch.Tensor:
        """Per-head mean losses over the micro-batches and DP ranks, on every rank."""
        if self.pipelined:
            self.model.take_eval_head_losses()
            self.engine.eval_batch(iter(self._pipe_batches(micro_batches)), bcast_loss=False,
                                   num_micro_batches=len(micro_batches))
            s = state.get_state()
            if state.is_last_stage():
                heads = self._dp_mean(torch.stack(self.model.take_eval_head_losses()).mean(0))
            else:
                heads = torch.zeros(self.cfg.mtp.n_heads, device=self.device)
            if s.pp_group is not None:
                dist.broadcast(heads, src=s.pp_ranks[-1], group=s.pp_group)
            return heads
        self.engine.eval()
        heads_sum = 0.0
        for tokens in micro_batches:
            with self._autocast():
                _, head_losses = self.engine(tokens.to(self.device))
            heads_sum = heads_sum + head_losses.float()
        return self._dp_mean(heads_sum / len(micro_batches))

    # ---- checkpoint hooks: DeepSpeed's own files, tag = the step directory the CheckpointManager made ----

    def save_to(self, ckpt_dir: str) -> None:
        root, tag = os.path.split(os.path.abspath(ckpt_dir))
        ds_compat.keep_recovery_script_in(self.engine, ckpt_dir)
        # save_latest=False: the manager owns the "latest" pointer and publishes the directory atomically.
        self.engine.save_checkpoint(root, tag=tag, save_latest=False)

    def load_from(self, ckpt_dir: str, load_optimizer: bool = True) -> None:
        root, tag = os.path.split(os.path.abspath(ckpt_dir))
        path, _ = self.engine.load_checkpoint(root, tag=tag, load_optimizer_states=load_optimizer,
                                              load_lr_scheduler_states=False,
                                              load_module_only=not load_optimizer)
        if path is None:
            raise RuntimeError(f"no DeepSpeed checkpoint files for this layout in {ckpt_dir}")

    @torch.no_grad()
    def load_full_weights(self, weight: Callable[[str], torch.Tensor]) -> None:
        copy_into_model(self.model, weight)
        ds_compat.refresh_fp32_params(self.engine)

