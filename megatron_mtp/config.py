"""Run configuration: dataclass sections, YAML files, dotted command-line overrides, validation.

A config is a tree of small dataclasses, one per concern (model, mtp, parallel, data, optimizer, train,
checkpoint, logging). YAML files and ``--section.key value`` overrides only ever *set* fields that exist,
with values of the field's type; anything else is a one-sentence ``ConfigError`` naming the key.
"""
from __future__ import annotations

import dataclasses
import json
import os
import sys
import typing
from dataclasses import dataclass, field
from typing import Any, Optional

import yaml

from megatron_mtp.errors import ConfigError
from megatron_mtp.io_utils import atomic_write_text
from megatron_mtp.validation import validate_combinations, validate_layout  # noqa: F401  (validate_layout: here too)


# The byte-level tokenizer's vocabulary (bytes 0..255, EOD 256, pad 257): known without any file, so a
# byte-level config gets its vocab_size here, in validation.
BYTE_VOCAB_SIZE = 258


def option(default=None, help: str = "", factory=None):
    """A config key: its default and the one line ``mtp-train --help`` shows for it."""
    if factory is not None:
        return field(default_factory=factory, metadata={"help": help})
    return field(default=default, metadata={"help": help})


@dataclass
class ModelConfig:
    # Llama-style decoder shape. num_layers counts EVERY transformer layer, head layers included, so
    # models with different numbers of MTP heads are compute-matched (paper section 3).
    vocab_size: Optional[int] = option(
        BYTE_VOCAB_SIZE, "vocabulary size; left out of a config = the tokenizer's, else at least the tokenizer's")
    hidden_size: int = option(128, "model width d")
    num_layers: int = option(6, "transformer layers, the n head layers INCLUDED (compute-matched across n)")
    num_attention_heads: int = option(4, "attention heads per layer")
    num_kv_heads: Optional[int] = option(None, "key/value heads (grouped-query attention); null = num_attention_heads")
    ffn_hidden_size: Optional[int] = option(None, "SwiGLU width; null = Llama's 2/3 * 4d rounded up to ffn_multiple_of")
    ffn_multiple_of: int = option(32, "rounding of the derived SwiGLU width")
    max_seq_length: int = option(4096, "longest sequence the RoPE tables cover")
    rope_theta: float = option(10000.0, "RoPE base")
    norm_eps: float = option(1e-5, "RMSNorm epsilon")
    tie_embeddings: bool = option(False, "share the input embedding and the unembedding")
    init_std: float = option(0.02, "standard deviation of the weight initialisation")
    # Megatron pads the vocabulary to a multiple of this times tp so every shard has equal rows.
    make_vocab_size_divisible_by: int = option(128, "pad the vocabulary to a multiple of this x tp (Megatron)")
    # Dropout (0 = off, the Llama default): on each residual branch's output, and on attention
    # probabilities (drawn per TP rank from the RNG tracker, see megatron_mtp/parallel/random.py).
    hidden_dropout: float = option(0.0, "dropout on each residual branch's output (0 = off)")
    attention_dropout: float = option(0.0, "dropout on attention probabilities (0 = off)")

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
    n_heads: int = option(4, "future tokens predicted (n in the paper); 1 = a standard next-token LM")
    head_type: str = option("transformer", "transformer (one layer per head) | linear (paper Table S4)")
    loss_weights: Optional[list] = option(None, "per-head weights of the summed loss, e.g. [1, 0.5, 0.5, 0.5]; "
                                                "null = all 1")
    # Paper Fig. 2: run each head's forward+backward in turn so only one head's logits ever exist.
    memory_efficient: bool = option(True, "run each head's forward and backward in turn (paper Fig. 2)")
    # Workspace of each head's fused cross-entropy (docs/cross_entropy.md). "fast": logits chunks of up to 4 GiB
    # and a float32 d(unembedding) accumulator (the fastest setting measured). "lean": Liger-Kernel's footprint,
    # chunks of ~T x d logits with d(unembedding) accumulated in bf16 -- 64-128 MiB at d = 4096 instead of up
    # to 4 GiB, for 3-61 % more loss time (most at large vocabularies; H100, docs/cross_entropy.md).
    loss_memory: str = option("fast", "fused cross-entropy workspace: fast (up to 4 GiB) | lean (~100 MiB, slower)")


@dataclass
class ParallelConfig:
    tp: int = option(1, "tensor-parallel size (innermost group, within a node)")
    pp: int = option(1, "pipeline-parallel stages (DeepSpeed pipeline engine)")
    sequence_parallel: bool = option(False, "shard norm/dropout activations along the sequence across TP")
    zero_stage: int = option(0, "DeepSpeed ZeRO stage: 0 (plain DDP), 1, or 2 (2 only without pipeline)")
    deepspeed_config: Optional[str] = option(None, "a DeepSpeed JSON merged with ours")
    pipeline_partition: str = option("parameters", "pipeline stage split: parameters | uniform | type:TransformerLayer")
    reduce_bucket_size: int = option(50_000_000, "DeepSpeed gradient reduce bucket (elements)")
    allgather_bucket_size: int = option(50_000_000, "DeepSpeed all-gather bucket (elements)")
    backend: Optional[str] = option(None, "torch.distributed backend; null = nccl on CUDA, gloo on CPU")


@dataclass
class DataConfig:
    # Megatron's blend forms of preprocessed .bin/.idx prefixes: [weight1, prefix1, weight2, prefix2, ...], the
    # string "w1 p1 w2 p2", or prefixes alone ([p1, p2] or "p1 p2": blended in proportion to size). Empty = the
    # embedded default corpus: the Python standard library's source on this machine, with the run's tokenizer.
    paths: list = option(help="blend of .bin/.idx prefixes: [w1, p1, w2, p2], \"w1 p1 w2 p2\" or [p1, p2] (by size); "
                              "[] = the embedded stdlib corpus", factory=list)
    seq_length: int = option(256, "tokens per training sample")
    split: str = option("969,30,1", "train,valid,test shares of each prefix's documents")
    # None = inferred from tokenizer_model (*.json or a directory with tokenizer.json: hf; *.model or a
    # directory with tokenizer.model: sentencepiece), byte without a model.
    tokenizer_type: Optional[str] = option(None, "byte | hf | sentencepiece; null = inferred from tokenizer_model "
                                                 "(byte without one)")
    tokenizer_model: Optional[str] = option(None, "tokenizer.json, a SentencePiece .model or an HF tokenizer directory")
    cache_dir: Optional[str] = option(None, "cache of sample indexes and the default corpus; null = "
                                            "$MTP_DATA_CACHE or ~/.cache/megatron_mtp")


@dataclass
class OptimizerConfig:
    lr: float = option(3e-4, "peak learning rate")
    min_lr: float = option(3e-5, "learning rate at the end of the cosine decay")
    weight_decay: float = option(0.1, "AdamW weight decay (matrices only)")
    beta1: float = option(0.9, "AdamW beta1")
    beta2: float = option(0.95, "AdamW beta2")
    eps: float = option(1e-8, "AdamW epsilon")
    clip_grad: float = option(1.0, "global grad-norm clipping across TP/PP/DP; 0 disables")
    warmup_iters: int = option(100, "linear warm-up steps")
    decay_iters: Optional[int] = option(None, "cosine decay length; null = train.iters")
    fused: Optional[bool] = option(None, "fused AdamW on CUDA; null = when available")


@dataclass
class TrainConfig:
    iters: int = option(200, "optimizer steps")
    micro_batch_size: int = option(8, "samples per rank per forward")
    global_batch_size: Optional[int] = option(None, "samples per step; null = micro_batch_size x grad_accum x dp")
    grad_accum: Optional[int] = option(None, "micro-batches per step; null = derived from global_batch_size")
    seed: int = option(1234, "seed of initialisation, data order and dropout")
    run_dir: str = option("runs/default", "directory of config.yaml, metrics, TensorBoard, checkpoints")
    device: str = option("auto", "auto | cpu | cuda")
    dtype: str = option("auto", "auto (bf16 on GPU, fp32 on CPU) | float32 | bfloat16 | float64")
    activation_checkpointing: str = option("none", "none | full | every_<k> (recompute every k-th layer)")
    # Megatron's --exit-interval: fit a long run into time-limited jobs; the schedule and data order still
    # follow train.iters.
    exit_interval: int = option(0, "save and exit at every multiple of this step; 0 = run to train.iters")
    eval_interval: int = option(0, "validate every k steps; 0 disables validation")
    eval_iters: int = option(10, "micro-batches per validation")
    compile: bool = option(False, "torch.compile each transformer layer (GPU; fuses norms, RoPE, SwiGLU)")
    # DeepSpeed's bf16 regime: bf16 parameters with fp32 master weights and fp32 gradient accumulation.
    master_weights: bool = option(True, "GPU bf16: fp32 master weights (fast); false = fp32 parameters under autocast")


@dataclass
class CheckpointConfig:
    interval: int = option(0, "save every k steps; 0 = only at the end and on SIGTERM/SIGUSR1")
    keep_last: int = option(2, "checkpoints kept")
    load: Optional[str] = option(None, "checkpoint to start from; null = resume from train.run_dir if it has one")
    save: bool = option(True, "save at the end of training")
    finetune: bool = option(False, "load weights only (fresh optimizer, step 0)")


@dataclass
class LoggingConfig:
    interval: int = option(10, "steps per log line / metrics.jsonl record (losses averaged over them)")
    tensorboard: bool = option(True, "write TensorBoard events under run_dir/tensorboard")
    plot: bool = option(True, "write loss_per_head.png in the run dir at the end")
    # Weights & Biases is optional: imported only when enabled (pip install wandb, or the package's wandb extra).
    wandb: bool = option(False, "also log every record to Weights & Biases")
    wandb_project: str = option("megatron_mtp", "W&B project")
    wandb_name: Optional[str] = option(None, "W&B run name; null = the run directory's name")
    wandb_mode: str = option("online", "online | offline (no network: sync later with `wandb sync`) | disabled")


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


# Keys earlier versions had. Every config.yaml those versions saved holds them, so setting one is ignored with
# a warning saying why it went, not refused: old runs resume with their own config.
REMOVED_KEYS = {
    "data.num_workers": "samples are memory-mapped slices read in microseconds, so a loader worker pool had "
                        "nothing to hide",
}


def set_value(cfg: Config, dotted: str, value: Any) -> None:
    if dotted in REMOVED_KEYS:
        print(f"WARNING: config key {dotted} was removed and is ignored ({REMOVED_KEYS[dotted]}); drop it from the "
              f"config.", file=sys.stderr, flush=True)
        return
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
    """Defaults, then the YAML file (if any), then ``--section.key value`` overrides; then validation.

    A ``model.vocab_size`` neither file nor overrides set becomes None: the data layer takes it from the
    tokenizer (``megatron_mtp.data.tokenizers.resolve_config_tokenizer``) before a run writes anything.
    """
    cfg = Config()
    cfg.model.vocab_size = None
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
    """A saved (resolved) config: every key it holds, defaults for the rest."""
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
    if m.vocab_size is None and not cfg.data.tokenizer_model:
        m.vocab_size = BYTE_VOCAB_SIZE
    _check(m.vocab_size is None or m.vocab_size > 0, f"model.vocab_size must be positive, got {m.vocab_size}.")
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
    _check(cfg.data.tokenizer_type in (None, "byte", "hf", "sentencepiece"),
           f"data.tokenizer_type must be byte, hf or sentencepiece (or left out), got {cfg.data.tokenizer_type!r}.")
    _check(not (cfg.data.tokenizer_type == "byte" and cfg.data.tokenizer_model),
           f"data.tokenizer_type is byte but data.tokenizer_model is {cfg.data.tokenizer_model!r}: the byte "
           f"tokenizer takes no model file; drop data.tokenizer_type to use the file (its type is inferred).")
    _check(all(isinstance(p, (str, int, float)) and not isinstance(p, bool) for p in cfg.data.paths),
           f"data.paths must hold prefixes and weights (strings and numbers), got {cfg.data.paths!r}.")
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
    _check(cfg.logging.wandb_mode in ("online", "offline", "disabled"),
           f"logging.wandb_mode must be online, offline or disabled, got {cfg.logging.wandb_mode!r}.")
    _check(cfg.checkpoint.keep_last >= 1, f"checkpoint.keep_last must be at least 1, got {cfg.checkpoint.keep_last}.")
    validate_combinations(cfg)  # rules spanning sections: validation.py
    if world_size is not None:
        validate_layout(cfg, world_size)


def describe(cfg: Config) -> str:
    return json.dumps(cfg.to_dict(), indent=1)


def _type_name(typ) -> str:
    if typing.get_origin(typ) is typing.Union:
        inner = [a for a in typing.get_args(typ) if a is not type(None)]
        return f"{_type_name(inner[0])} or null"
    if typ is list or typing.get_origin(typ) is list:
        return "list"
    return getattr(typ, "__name__", str(typ))


def config_reference() -> list:
    """Every config key as ``(section, key, type name, default, help)``, in declaration order: the source of
    ``mtp-train --help`` and of the key table in docs/training.md."""
    rows = []
    for section in dataclasses.fields(Config):
        section_cls = section.default_factory
        types = _field_types(section_cls)
        defaults = section_cls()
        for f in dataclasses.fields(section_cls):
            rows.append((section.name, f.name, _type_name(types[f.name]), getattr(defaults, f.name),
                         f.metadata.get("help", "")))
    return rows


def to_yaml(cfg: Config) -> str:
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)
