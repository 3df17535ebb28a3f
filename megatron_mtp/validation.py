"""Checks that span config sections (model x parallel x train): the one place for each rule.

Per-field checks (a value's type and range) live with the field in ``config.py``; what needs two sections
at once lives here, and every caller (``config.validate``, the parallel state, the pipeline, resharding)
asks this module instead of restating the rule. It sits just above ``errors``: it reads the config tree by
attribute and imports nothing else from the package, so every layer may call it before anything is
written.
"""
from __future__ import annotations

from megatron_mtp.errors import ConfigError, LayoutError

PARTITION_METHODS = ("parameters", "uniform")  # or "type:<layer class regex>"


def trunk_layer_count(model, mtp) -> int:
    """Trunk layers of a model: ``model.num_layers`` counts every transformer layer, the heads' included
    (compute-matched models, paper section 3), so transformer heads take ``mtp.n_heads`` of them."""
    return model.num_layers - mtp.n_heads if mtp.head_type == "transformer" else model.num_layers


def pipeline_pieces(cfg) -> int:
    """Units the pipeline partitioner distributes: the embedding, each trunk layer, the output group."""
    return trunk_layer_count(cfg.model, cfg.mtp) + 2


def check_tp_divides(model, tp: int, seq_length=None, sequence_parallel: bool = False,
                     error: type = LayoutError) -> None:
    """tp must divide everything sharded across it: heads are sharded whole per KV group (a rank owns
    kv_heads/tp groups with all their query heads), the SwiGLU width and the padded vocabulary by rows;
    under sequence parallelism so is the sequence."""
    sharded = [("model.num_attention_heads", model.num_attention_heads), ("model.num_kv_heads", model.kv_heads),
               ("the ffn size (model.ffn_hidden_size)", model.ffn_size)]
    if getattr(model, "vocab_size", 0) is not None:  # None until taken from the tokenizer; checked again then
        sharded.append(("the padded vocabulary (model.make_vocab_size_divisible_by x tp)", model.padded_vocab_size(tp)))
    for name, value in sharded:
        if value % tp:
            raise error(f"parallel.tp ({tp}) must divide {name} ({value}).")
    if sequence_parallel and tp > 1 and seq_length is not None and seq_length % tp:
        raise error(f"parallel.tp ({tp}) must divide data.seq_length ({seq_length}) under parallel.sequence_parallel.")


def check_zero_with_pipeline(parallel, error: type = ConfigError) -> None:
    if parallel.pp > 1 and parallel.zero_stage > 1:
        raise error(f"parallel.zero_stage={parallel.zero_stage} is not possible with pipeline parallelism "
                    f"(parallel.pp={parallel.pp}): DeepSpeed's pipeline engine supports ZeRO stage 0 or 1 only.")


def check_pipeline_layout(cfg, error: type = ConfigError) -> None:
    """Pipeline errors a user can cause, before any process builds a stage."""
    pp, pieces = cfg.parallel.pp, pipeline_pieces(cfg)
    if pp > pieces:
        raise error(
            f"parallel.pp ({pp}) exceeds the {pieces} pipeline pieces of this model (the embedding, "
            f"{pieces - 2} trunk layers and the output with all heads); use fewer stages or more model.num_layers.")
    check_partition_method(cfg.parallel.pipeline_partition, error)


def check_partition_method(method: str, error: type = ConfigError) -> None:
    if not (method in PARTITION_METHODS or str(method).startswith("type:")):
        raise error(f"parallel.pipeline_partition must be parameters, uniform or type:<layer class regex>, "
                    f"got {method!r}.")


def dropout_probability(model, name: str) -> float:
    """``model.<name>`` (hidden_dropout, attention_dropout), which must lie in [0, 1)."""
    p = getattr(model, name, 0.0)
    if not 0.0 <= p < 1.0:
        raise ConfigError(f"model.{name} must lie in [0, 1), got {p}.")
    return p


def check_fp8(train) -> None:
    """train.fp8 runs bf16 compute with FP8 GEMMs on a GPU (the device's FP8 support is checked when the model
    is built: ops/fp8.py)."""
    if not getattr(train, "fp8", False):
        return
    if train.device == "cpu":
        raise ConfigError("train.fp8 needs a GPU with FP8 tensor cores, but train.device is cpu; set train.fp8 false.")
    if train.dtype not in ("auto", "bfloat16"):
        raise ConfigError(f"train.fp8 computes around bf16 activations, but train.dtype is {train.dtype}; set "
                          f"train.dtype to auto or bfloat16, or train.fp8 false.")


def validate_combinations(cfg) -> None:
    """Every cross-section rule that needs no world size (``config.validate`` calls it last)."""
    check_zero_with_pipeline(cfg.parallel)
    check_tp_divides(cfg.model, cfg.parallel.tp, error=ConfigError)
    check_fp8(cfg.train)


def validate_layout(cfg, world_size: int) -> int:
    """Check the parallel layout against the world size; return the data-parallel size and fix batch sizes."""
    p, t = cfg.parallel, cfg.train
    if world_size % (p.tp * p.pp):
        raise ConfigError(f"the world size ({world_size}) must be divisible by parallel.tp x parallel.pp "
                          f"({p.tp} x {p.pp}).")
    dp = world_size // (p.tp * p.pp)
    per_step = t.micro_batch_size * dp
    if t.global_batch_size is None:
        t.global_batch_size = per_step * (t.grad_accum or 1)
    if t.global_batch_size % per_step:
        raise ConfigError(f"train.global_batch_size ({t.global_batch_size}) must be a multiple of "
                          f"train.micro_batch_size x data-parallel size ({t.micro_batch_size} x {dp}).")
    accum = t.global_batch_size // per_step
    if t.grad_accum is not None and t.grad_accum != accum:
        raise ConfigError(f"train.grad_accum ({t.grad_accum}) contradicts train.global_batch_size "
                          f"({t.global_batch_size}) = micro_batch_size ({t.micro_batch_size}) x data-parallel size "
                          f"({dp}) x grad_accum ({accum}).")
    t.grad_accum = accum
    return dp


def validate_run(cfg, world_size: int) -> int:
    """Everything a launch needs checked before any file is written; returns the data-parallel size."""
    dp = validate_layout(cfg, world_size)
    for name in ("hidden_dropout", "attention_dropout"):
        dropout_probability(cfg.model, name)
    check_tp_divides(cfg.model, cfg.parallel.tp, cfg.data.seq_length, cfg.parallel.sequence_parallel)
    if cfg.parallel.pp > 1:
        check_pipeline_layout(cfg)
    return dp
