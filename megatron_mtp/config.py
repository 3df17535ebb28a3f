"""Run configuration: dataclass sections, YAML files, dotted command-line overrides, validation.

A config is a tree of small dataclasses, one per concern (model, mtp, parallel, data, optimizer, train,
checkpoint, logging). YAML files and ``--section.key value`` overrides only ever *set* fields that exist,
with values of the field's type; anything else is a one-sentence ``ConfigError`` naming the key.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
import typing
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

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
    # Bounded waits (docs/training.md, "Faults and failure model"): a collective that waits longer than this
    # ends the job (the process groups' timeout; torch's defaults are 10 minutes for NCCL, 30 for gloo) ...
    timeout_minutes: float = option(5.0, "a collective waiting longer than this ends the job")
    # ... and a rank whose heartbeat stalls this long (a stopped or frozen process, an unreachable node) ends
    # it sooner, naming that rank (parallel/watchdog.py). 0 = no watchdog.
    heartbeat_timeout_s: float = option(60.0, "a rank silent this long ends the job, named; 0 = no watchdog")


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
    # train.compile with fp32 master weights (training/master_weights.py): the clip factor, AdamW and the bf16
    # copy as one compiled pass per parameter, reading the bf16 gradients directly with one micro-batch.
    compiled_step: bool = option(False, "with train.compile and fp32 master weights: clip, AdamW and the bf16 "
                                        "copy in one compiled pass (not yet timed on a GPU); false = torch's "
                                        "AdamW then a copy")


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
    # FP8 (e4m3 forward, e5m2 gradients, dynamic per-tensor scales: ops/fp8.py) for the trunk's and heads'
    # linears; the unembedding and the cross-entropy stay bf16. Needs FP8 tensor cores (Ada, Hopper).
    fp8: bool = option(False, "FP8 GEMMs for the trunk's and heads' linear layers (GPU with compute capability >= 8.9)")
    # A step whose loss or gradient norm is not finite is skipped (no update; counted as skipped_iters in the
    # log). This many skips in a row end the run with an error: the model is diverging, not hiccuping.
    max_consecutive_skips: int = option(10, "non-finite steps skipped in a row before the run stops with an error")


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
        if value is None or isinstance(value, (dict, list)):
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
        try:
            with open(path, encoding="utf-8") as f:
                data = yaml.safe_load(f) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"config file {path!r} is not valid YAML ({exc.__class__.__name__}).") from None
        except UnicodeDecodeError:
            raise ConfigError(f"config file {path!r} is not UTF-8 text; save it as UTF-8 YAML.") from None
        except OSError as exc:
            raise ConfigError(f"config file {path!r} cannot be read ({exc.strerror or exc}).") from None
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


# Per-field ranges. Every field of every section has one (tests/test_config.py holds the table to the dataclasses),
# so a value outside it is one sentence naming the key, the value and what is allowed, before anything runs:
# a NaN learning rate or a negative epsilon would otherwise train NaNs and exit 0, and a 0 where a count belongs
# would be read as "unset" by an ``or`` somewhere downstream. Types are already enforced by ``_coerce``.


@dataclass(frozen=True)
class _Range:
    ok: Callable[[Any], bool]
    allowed: str  # completes "<section.key> must ..."
    optional: bool = False  # None is allowed too (the field's documented default meaning)

    def check(self, key: str, value: Any) -> None:
        if value is None and self.optional:
            return
        if value is None or not self.ok(value):
            allowed = f"{self.allowed} (or none)" if self.optional else self.allowed
            raise ConfigError(f"{key} must {allowed}, got {value!r}.")


def _ints(lo: int, hi: Optional[int] = None, optional: bool = False) -> _Range:
    if hi is None:
        words = {0: "be non-negative", 1: "be positive"}.get(lo, f"be at least {lo}")
        return _Range(lambda v: isinstance(v, int) and v >= lo, words, optional)
    return _Range(lambda v: isinstance(v, int) and lo <= v <= hi, f"lie in {lo}..{hi}", optional)


def _floats(lo: float, hi: float = math.inf, lo_open: bool = False, hi_open: bool = True,
            optional: bool = False) -> _Range:
    """A finite number in the interval; NaN and infinities are never allowed."""
    def ok(v) -> bool:
        if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v):
            return False
        return (v > lo if lo_open else v >= lo) and (v < hi if hi_open else v <= hi)

    if hi == math.inf:
        words = f"be a finite number {'>' if lo_open else '>='} {lo:g}"
    else:
        words = f"lie in {'(' if lo_open else '['}{lo:g}, {hi:g}{')' if hi_open else ']'}"
    return _Range(ok, words, optional)


def _choice(*values, optional: bool = False) -> _Range:
    names = [str(v) for v in values]
    return _Range(lambda v: v in values, f"be {', '.join(names[:-1])} or {names[-1]}", optional)


def _text(optional: bool = False) -> _Range:
    return _Range(lambda v: isinstance(v, str) and v.strip() != "", "be a non-empty string", optional)


_FLAG = _Range(lambda v: isinstance(v, bool), "be true or false")
_OPTIONAL_FLAG = _Range(lambda v: isinstance(v, bool), "be true or false", optional=True)


def _loss_weights_ok(weights: list) -> bool:
    numbers = all(isinstance(w, (int, float)) and not isinstance(w, bool) and math.isfinite(w) and w >= 0
                  for w in weights)
    return numbers and sum(weights) > 0


def _split_ok(split: str) -> bool:
    """data.split: up to three non-negative numbers (train, valid, test weights) with a positive sum."""
    try:
        ratios = [float(part) for part in str(split).replace("/", ",").split(",")]
    except ValueError:
        return False
    return 1 <= len(ratios) <= 3 and all(math.isfinite(r) and r >= 0 for r in ratios) and sum(ratios) > 0


def _activation_checkpointing_ok(v: str) -> bool:
    return v in ("none", "full") or (v.startswith("every_") and v[6:].isdigit() and int(v[6:]) > 0)


_RANGES = {
    "model": {
        "vocab_size": _ints(1, optional=True),  # None: taken from the tokenizer (data.tokenizers)
        "hidden_size": _ints(1),
        "num_layers": _ints(1),
        "num_attention_heads": _ints(1),
        "num_kv_heads": _ints(1, optional=True),
        "ffn_hidden_size": _ints(1, optional=True),
        "ffn_multiple_of": _ints(1),
        "max_seq_length": _ints(1),
        "rope_theta": _floats(0, lo_open=True),
        "norm_eps": _floats(0, lo_open=True),
        "tie_embeddings": _FLAG,
        "init_std": _floats(0, lo_open=True),
        "make_vocab_size_divisible_by": _ints(1),
        "hidden_dropout": _floats(0, 1),
        "attention_dropout": _floats(0, 1),
    },
    "mtp": {
        "n_heads": _ints(1),
        "head_type": _choice("transformer", "linear"),
        "loss_weights": _Range(_loss_weights_ok, "be a list of non-negative finite numbers with a positive sum",
                               optional=True),
        "memory_efficient": _FLAG,
        "loss_memory": _choice("fast", "lean"),
    },
    "parallel": {
        "tp": _ints(1),
        "pp": _ints(1),
        "sequence_parallel": _FLAG,
        "zero_stage": _choice(0, 1, 2),
        "deepspeed_config": _text(optional=True),
        "pipeline_partition": _text(),  # which layer classes it may name is checked where the pipeline is cut
        "reduce_bucket_size": _ints(1),
        "allgather_bucket_size": _ints(1),
        "backend": _choice("nccl", "gloo", "mpi", "ucc", optional=True),
        "timeout_minutes": _floats(0, lo_open=True),
        "heartbeat_timeout_s": _floats(0),
    },
    "data": {
        "paths": _Range(lambda v: isinstance(v, list), "be a list"),  # its structure: see validate()
        "seq_length": _ints(1),
        "split": _Range(_split_ok, "be up to three non-negative numbers with a positive sum, such as '969,30,1'"),
        "tokenizer_type": _choice("byte", "hf", "sentencepiece", optional=True),  # None: inferred
        "tokenizer_model": _text(optional=True),
        "cache_dir": _text(optional=True),
    },
    "optimizer": {
        "lr": _floats(0, lo_open=True),
        "min_lr": _floats(0),  # and at most optimizer.lr: see validate()
        "weight_decay": _floats(0),
        "beta1": _floats(0, 1),
        "beta2": _floats(0, 1),
        "eps": _floats(0, lo_open=True),
        "clip_grad": _floats(0),
        "warmup_iters": _ints(0),
        "decay_iters": _ints(1, optional=True),
        "fused": _OPTIONAL_FLAG,
        "compiled_step": _FLAG,
    },
    "train": {
        "iters": _ints(0),
        "micro_batch_size": _ints(1),
        "global_batch_size": _ints(1, optional=True),
        "grad_accum": _ints(1, optional=True),
        "seed": _ints(0, 2**62),
        "run_dir": _text(),
        "device": _choice("auto", "cpu", "cuda"),
        "dtype": _choice("auto", "float32", "bfloat16", "float64"),
        "activation_checkpointing": _Range(_activation_checkpointing_ok, "be none, full or every_<k>"),
        "exit_interval": _ints(0),
        "eval_interval": _ints(0),
        "eval_iters": _ints(1),
        "compile": _FLAG,
        "master_weights": _FLAG,
        "fp8": _FLAG,
        "max_consecutive_skips": _ints(1),
    },
    "checkpoint": {
        "interval": _ints(0),
        "keep_last": _ints(1),
        "load": _text(optional=True),
        "save": _FLAG,
        "finetune": _FLAG,
    },
    "logging": {
        "interval": _ints(1),
        "tensorboard": _FLAG,
        "plot": _FLAG,
        "wandb": _FLAG,
        "wandb_project": _text(),
        "wandb_name": _text(optional=True),
        "wandb_mode": _choice("online", "offline", "disabled"),
    },
}


def check_ranges(cfg: Config) -> None:
    """Every field against its range in ``_RANGES``; the first value outside it is a ConfigError."""
    for section_name, rules in _RANGES.items():
        section = getattr(cfg, section_name)
        for key, rule in rules.items():
            rule.check(f"{section_name}.{key}", getattr(section, key))


def validate(cfg: Config, world_size: Optional[int] = None) -> None:
    m = cfg.model
    if m.vocab_size is None and not cfg.data.tokenizer_model:
        m.vocab_size = BYTE_VOCAB_SIZE  # byte level: known without a file; otherwise the data layer sets it
    check_ranges(cfg)  # first: the checks below divide by and compare these fields
    m, mtp, o = cfg.model, cfg.mtp, cfg.optimizer
    _check(
        m.hidden_size % m.num_attention_heads == 0,
        f"model.hidden_size ({m.hidden_size}) must be divisible by model.num_attention_heads "
        f"({m.num_attention_heads}).",
    )
    _check(m.head_dim % 2 == 0, f"model.hidden_size / num_attention_heads = {m.head_dim} must be even for RoPE.")
    _check(
        m.num_attention_heads % m.kv_heads == 0,
        f"model.num_kv_heads ({m.kv_heads}) must divide model.num_attention_heads ({m.num_attention_heads}) "
        f"for grouped-query attention.",
    )
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
        cfg.data.seq_length <= m.max_seq_length,
        f"data.seq_length ({cfg.data.seq_length}) exceeds model.max_seq_length ({m.max_seq_length}).",
    )
    _check(not (cfg.data.tokenizer_type == "byte" and cfg.data.tokenizer_model),
           f"data.tokenizer_type is byte but data.tokenizer_model is {cfg.data.tokenizer_model!r}: the byte "
           f"tokenizer takes no model file; drop data.tokenizer_type to use the file (its type is inferred).")
    _check(all(isinstance(p, (str, int, float)) and not isinstance(p, bool) for p in cfg.data.paths),
           f"data.paths must hold prefixes and weights (strings and numbers), got {cfg.data.paths!r}.")
    _check(0 <= o.min_lr <= o.lr, f"optimizer.min_lr ({o.min_lr}) must lie between 0 and optimizer.lr ({o.lr}).")
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
