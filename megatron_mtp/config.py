"""Run configuration: dataclass sections, YAML files, dotted command-line overrides, validation.

A config is a tree of small dataclasses, one per concern (model, mtp, parallel, data, optimizer, train,
checkpoint, logging). YAML files and ``--section.key value`` overrides only ever *set* fields that exist,
with values of the field's type; anything else is a one-sentence ``ConfigError`` naming the key.
"""
from __future__ import annotations

import dataclasses
import json
import os
import typing
from dataclasses import dataclass, field
from typing import Any, Optional

import yaml

from megatron_mtp.errors import ConfigError
from megatron_mtp.io_utils import atomic_write_text
from megatron_mtp.validation import validate_combinations, validate_layout  # noqa: F401  (validate_layout: here too)


@dataclass
class ModelConfig:
    # Llama-style decoder shape. num_layers counts EVERY transformer layer, head layers included, so
    # models with different numbers of MTP heads are compute-matched (paper section 3).
    vocab_size: int = 258
    hidden_size: int = 128
    num_layers: int = 6
    num_attention_heads: int = 4
    num_kv_heads: Optional[int] = None  # grouped-query attention; None = as many as attention heads
    ffn_hidden_size: Optional[int] = None  # None = Llama's rule: 2/3 * 4h rounded up to multiple_of
    ffn_multiple_of: int = 32
    max_seq_length: int = 4096
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    tie_embeddings: bool = False
    init_std: float = 0.02
    # Megatron pads the vocabulary to a multiple of this times tp so every shard has equal rows.
    make_vocab_size_divisible_by: int = 128
    # Dropout (0 = off, the Llama default): on each residual branch's output, and on attention
    # probabilities (drawn per TP rank from the RNG tracker, see megatron_mtp/parallel/random.py).
    hidden_dropout: float = 0.0
    attention_dropout: float = 0.0

    @property
    def kv_heads(self) -> int:
        return self.num_kv_heads or self.num_attention_heads

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def ffn_size(self) -> int:
        if self.ffn_hidden_size:
            return self.ffn_hidden_size
        hidden = int(2 * 4 * self.hidden_size / 3)
        m = self.ffn_multiple_of
        return m * ((hidden + m - 1) // m)

    def padded_vocab_size(self, tp: int = 1) -> int:
        multiple = self.make_vocab_size_divisible_by * tp
        return multiple * ((self.vocab_size + multiple - 1) // multiple)


@dataclass
class MTPConfig:
    n_heads: int = 4  # number of future tokens predicted (n in the paper); 1 = standard next-token LM
    head_type: str = "transformer"  # "transformer" (one layer per head) | "linear" (paper Table S4)
    loss_weights: Optional[list] = None  # per-head weights of the summed loss; None = all 1
    # Paper Fig. 2: run each head's forward+backward in turn so only one head's logits ever exist.
    memory_efficient: bool = True
    # Workspace of each head's fused cross-entropy (docs/cross_entropy.md). "fast": logits chunks of up to 4 GiB
    # and a float32 d(unembedding) accumulator (the fastest setting measured). "lean": Liger-Kernel's footprint,
    # chunks of ~T x d logits with d(unembedding) accumulated in bf16 -- 64-128 MiB at d = 4096 instead of up
    # to 4 GiB, for 3-61 % more loss time (most at large vocabularies; H100, docs/cross_entropy.md).
    loss_memory: str = "fast"


@dataclass
class ParallelConfig:
    tp: int = 1  # tensor-parallel size (innermost group, within a node)
    pp: int = 1  # pipeline-parallel stages (DeepSpeed pipeline engine)
    sequence_parallel: bool = False  # shard norms/dropout activations along the sequence across TP
    zero_stage: int = 0  # DeepSpeed ZeRO stage: 0 (plain DDP), 1 or 2 (2 only without pipeline)
    deepspeed_config: Optional[str] = None  # a user DeepSpeed JSON merged with ours
    pipeline_partition: str = "parameters"  # "parameters" | "uniform" | "type:TransformerLayer"
    reduce_bucket_size: int = 50_000_000
    allgather_bucket_size: int = 50_000_000
    backend: Optional[str] = None  # None = nccl on CUDA, gloo on CPU


@dataclass
class DataConfig:
    # Blend: [weight1, prefix1, weight2, prefix2, ...] of preprocessed .bin/.idx prefixes. Empty = the
    # embedded default corpus: the Python standard library's source on this machine, byte-level tokens.
    paths: list = field(default_factory=list)
    seq_length: int = 256
    split: str = "969,30,1"
    tokenizer_type: str = "byte"  # byte | hf | sentencepiece
    tokenizer_model: Optional[str] = None
    cache_dir: Optional[str] = None  # where sample indexes and the default corpus are cached
    num_workers: int = 0


@dataclass
class OptimizerConfig:
    lr: float = 3e-4
    min_lr: float = 3e-5
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    clip_grad: float = 1.0  # global grad-norm clipping across TP/PP/DP; 0 disables
    warmup_iters: int = 100
    decay_iters: Optional[int] = None  # cosine decay length; None = train.iters
    fused: Optional[bool] = None  # fused AdamW on CUDA; None = when available


@dataclass
class TrainConfig:
    iters: int = 200
    micro_batch_size: int = 8
    global_batch_size: Optional[int] = None  # None = micro_batch_size * grad_accum * dp
    grad_accum: Optional[int] = None  # derived from global batch when None
    seed: int = 1234
    run_dir: str = "runs/default"
    device: str = "auto"  # auto | cpu | cuda
    dtype: str = "auto"  # auto (bf16 on GPU, fp32 on CPU) | float32 | bfloat16 | float64
    activation_checkpointing: str = "none"  # none | full | every_<k>
    # Save and exit once the step is a multiple of this (Megatron's --exit-interval: fit a long run into
    # time-limited jobs; the schedule and data order still follow train.iters). 0 = run to train.iters.
    exit_interval: int = 0
    eval_interval: int = 0  # 0 disables validation
    eval_iters: int = 10
    compile: bool = False  # torch.compile each transformer layer (GPU; fuses norms, RoPE, SwiGLU)
    # GPU bf16: bf16 parameters with fp32 master weights and fp32 gradient accumulation (fast; DeepSpeed's
    # bf16 regime). false = fp32 parameters under bf16 autocast.
    master_weights: bool = True


@dataclass
class CheckpointConfig:
    interval: int = 0  # save every k steps; 0 = only at the end and on SIGTERM/SIGUSR1
    keep_last: int = 2
    load: Optional[str] = None  # checkpoint dir to start from; None = resume from run_dir if present
    save: bool = True
    finetune: bool = False  # load weights only (fresh optimizer, step 0)


@dataclass
class LoggingConfig:
    interval: int = 10
    tensorboard: bool = True
    plot: bool = True  # write loss_per_head.png in the run dir at the end


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    mtp: MTPConfig = field(default_factory=MTPConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def save(self, path: str) -> None:
        atomic_write_text(path, yaml.safe_dump(self.to_dict(), sort_keys=False))


# ---------------------------------------------------------------------------------------------------------
# Setting values with type checks


def _field_types(section_cls) -> dict:
    hints = typing.get_type_hints(section_cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(section_cls)}


def _coerce(value: Any, typ, key: str) -> Any:
    """Convert ``value`` (from YAML or a command-line string) to ``typ`` or raise a ConfigError."""
    origin = typing.get_origin(typ)
    if origin is typing.Union:  # Optional[X]
        args = [a for a in typing.get_args(typ) if a is not type(None)]
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
            return None
        return _coerce(value, args[0], key)
    if typ is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "1", "yes", "on", "false", "0", "no", "off"):
            return value.lower() in ("true", "1", "yes", "on")
        raise ConfigError(f"{key} must be true or false, got {value!r}.")
    if typ is int:
        if isinstance(value, bool):
            raise ConfigError(f"{key} must be an integer, got {value!r}.")
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(value.replace("_", ""))
            except ValueError:
                pass
        raise ConfigError(f"{key} must be an integer, got {value!r}.")
    if typ is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{key} must be a number, got {value!r}.")
    if typ is str:
        if isinstance(value, (dict, list)):
            raise ConfigError(f"{key} must be a string, got {value!r}.")
        return str(value)
    if typ is list or origin is list:
        if isinstance(value, str):
            try:
                value = yaml.safe_load(value)
            except yaml.YAMLError:
                value = [v for v in value.split(",") if v]
            if isinstance(value, (str, int, float)):
                value = [value]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key} must be a list, got {value!r}.")
        return list(value)
    return value


def set_value(cfg: Config, dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    if len(parts) != 2:
        raise ConfigError(f"config key {dotted!r} must look like section.key (e.g. mtp.n_heads).")
    section_name, key = parts
    if section_name not in _field_types(Config):
        sections = ", ".join(_field_types(Config))
        raise ConfigError(f"unknown config section {section_name!r} in {dotted!r}; sections are: {sections}.")
    section = getattr(cfg, section_name)
    types = _field_types(type(section))
    if key not in types:
        raise ConfigError(f"unknown config key {dotted!r}; {section_name} has: {', '.join(types)}.")
    setattr(section, key, _coerce(value, types[key], dotted))


def _apply_mapping(cfg: Config, mapping: dict, source: str) -> None:
    if not isinstance(mapping, dict):
        raise ConfigError(f"{source} must hold a mapping of sections (model:, mtp:, train:, ...).")
    for section_name, values in mapping.items():
        if not isinstance(values, dict):
            raise ConfigError(f"section {section_name!r} in {source} must be a mapping of keys to values.")
        for key, value in values.items():
            set_value(cfg, f"{section_name}.{key}", value)


def parse_overrides(args: list) -> list:
    """``['--mtp.n_heads', '2', '--train.iters=5']`` -> ``[('mtp.n_heads', '2'), ('train.iters', '5')]``."""
    pairs, i = [], 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--"):
            raise ConfigError(f"unexpected argument {arg!r}; overrides look like --section.key value.")
        arg = arg[2:]
        if "=" in arg:
            key, value = arg.split("=", 1)
            i += 1
        else:
            if i + 1 >= len(args):
                raise ConfigError(f"override --{arg} needs a value.")
            key, value = arg, args[i + 1]
            i += 2
        pairs.append((key, value))
    return pairs


def load_config(path: Optional[str] = None, overrides: Optional[list] = None) -> Config:
    """Defaults, then the YAML file (if any), then ``--section.key value`` overrides; then validation."""
    cfg = Config()
    if path is not None:
        if not os.path.isfile(path):
            raise ConfigError(f"config file {path!r} does not exist; pass --config with a YAML file path.")
        with open(path) as f:
            try:
                data = yaml.safe_load(f) or {}
            except yaml.YAMLError as exc:
                raise ConfigError(f"config file {path!r} is not valid YAML ({exc.__class__.__name__}).") from None
        _apply_mapping(cfg, data, path)
    for key, value in parse_overrides(overrides or []):
        set_value(cfg, key, value)
    validate(cfg)
    return cfg


def config_from_dict(data: dict) -> Config:
    cfg = Config()
    _apply_mapping(cfg, data, "the saved config")
    validate(cfg)
    return cfg


# ---------------------------------------------------------------------------------------------------------
# Validation: every invalid combination a user can write gets one sentence naming the key.


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)


def validate(cfg: Config, world_size: Optional[int] = None) -> None:
    m, mtp, p, t, o = cfg.model, cfg.mtp, cfg.parallel, cfg.train, cfg.optimizer
    _check(m.vocab_size > 0, f"model.vocab_size must be positive, got {m.vocab_size}.")
    _check(m.hidden_size > 0, f"model.hidden_size must be positive, got {m.hidden_size}.")
    _check(m.num_layers > 0, f"model.num_layers must be positive, got {m.num_layers}.")
    _check(m.num_attention_heads > 0, f"model.num_attention_heads must be positive, got {m.num_attention_heads}.")
    _check(
        m.hidden_size % m.num_attention_heads == 0,
        f"model.hidden_size ({m.hidden_size}) must be divisible by model.num_attention_heads "
        f"({m.num_attention_heads}).",
    )
    _check(m.head_dim % 2 == 0, f"model.hidden_size / num_attention_heads = {m.head_dim} must be even for RoPE.")
    _check(m.kv_heads > 0, f"model.num_kv_heads must be positive, got {m.num_kv_heads}.")
    _check(
        m.num_attention_heads % m.kv_heads == 0,
        f"model.num_kv_heads ({m.kv_heads}) must divide model.num_attention_heads ({m.num_attention_heads}) "
        f"for grouped-query attention.",
    )
    _check(mtp.n_heads >= 1, f"mtp.n_heads must be at least 1, got {mtp.n_heads}.")
    _check(mtp.head_type in ("transformer", "linear"), f"mtp.head_type must be transformer or linear, got {mtp.head_type!r}.")
    _check(mtp.loss_memory in ("fast", "lean"), f"mtp.loss_memory must be fast or lean, got {mtp.loss_memory!r}.")
    head_layers = mtp.n_heads if mtp.head_type == "transformer" else 0
    _check(
        head_layers < m.num_layers if mtp.head_type == "transformer" else mtp.n_heads <= m.num_layers,
        f"mtp.n_heads ({mtp.n_heads}) must be smaller than model.num_layers ({m.num_layers}): num_layers counts "
        f"the head layers too, and the trunk needs at least one layer.",
    )
    if mtp.loss_weights is not None:
        _check(
            len(mtp.loss_weights) == mtp.n_heads,
            f"mtp.loss_weights has {len(mtp.loss_weights)} entries but mtp.n_heads is {mtp.n_heads}.",
        )
        _check(
            all(isinstance(w, (int, float)) and not isinstance(w, bool) and w >= 0 for w in mtp.loss_weights),
            f"mtp.loss_weights must be non-negative numbers, got {mtp.loss_weights}.",
        )
    _check(p.tp >= 1, f"parallel.tp must be at least 1, got {p.tp}.")
    _check(p.pp >= 1, f"parallel.pp must be at least 1, got {p.pp}.")
    _check(p.zero_stage in (0, 1, 2), f"parallel.zero_stage must be 0, 1 or 2, got {p.zero_stage}.")
    _check(cfg.data.seq_length > 0, f"data.seq_length must be positive, got {cfg.data.seq_length}.")
    _check(
        cfg.data.seq_length <= m.max_seq_length,
        f"data.seq_length ({cfg.data.seq_length}) exceeds model.max_seq_length ({m.max_seq_length}).",
    )
    _check(cfg.data.tokenizer_type in ("byte", "hf", "sentencepiece"),
           f"data.tokenizer_type must be byte, hf or sentencepiece, got {cfg.data.tokenizer_type!r}.")
    _check(len(cfg.data.paths) % 2 == 0 or len(cfg.data.paths) == 1,
           "data.paths must be [weight1, prefix1, weight2, prefix2, ...] or a single prefix.")
    _check(t.iters >= 0, f"train.iters must be non-negative, got {t.iters}.")
    _check(t.exit_interval >= 0, f"train.exit_interval must be non-negative, got {t.exit_interval}.")
    _check(t.micro_batch_size >= 1, f"train.micro_batch_size must be at least 1, got {t.micro_batch_size}.")
    _check(t.device in ("auto", "cpu", "cuda"), f"train.device must be auto, cpu or cuda, got {t.device!r}.")
    _check(t.dtype in ("auto", "float32", "bfloat16", "float64"),
           f"train.dtype must be auto, float32, bfloat16 or float64, got {t.dtype!r}.")
    ac = t.activation_checkpointing
    _check(ac in ("none", "full") or (ac.startswith("every_") and ac[6:].isdigit() and int(ac[6:]) > 0),
           f"train.activation_checkpointing must be none, full or every_<k>, got {ac!r}.")
    _check(o.lr > 0, f"optimizer.lr must be positive, got {o.lr}.")
    _check(0 <= o.min_lr <= o.lr, f"optimizer.min_lr ({o.min_lr}) must lie between 0 and optimizer.lr ({o.lr}).")
    _check(o.warmup_iters >= 0, f"optimizer.warmup_iters must be non-negative, got {o.warmup_iters}.")
    _check(cfg.logging.interval >= 1, f"logging.interval must be at least 1, got {cfg.logging.interval}.")
    _check(cfg.checkpoint.keep_last >= 1, f"checkpoint.keep_last must be at least 1, got {cfg.checkpoint.keep_last}.")
    validate_combinations(cfg)  # rules spanning sections: validation.py
    if world_size is not None:
        validate_layout(cfg, world_size)


def describe(cfg: Config) -> str:
    return json.dumps(cfg.to_dict(), indent=1)
