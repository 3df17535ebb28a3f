"""Export a checkpoint (any layout) for evaluation and serving.

* ``hf``: a HuggingFace Llama directory that ``LlamaForCausalLM`` / lm-evaluation-harness load as it is
  (``model.safetensors``, or shards + ``model.safetensors.index.json`` above ``max_shard_bytes`` as
  ``save_pretrained`` writes them; files mode 0644; a ``README.md`` model card; ``modeling_mtp_llama.py`` so
  ``AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)`` returns every head's logits).
  Trunk + head 1 form the standard model: ``model.layers.{0..L-1}`` are the trunk layers then head 1's
  layer, ``model.norm`` is the shared final norm and ``lm_head`` the unembedding (padded rows dropped).
  Heads 2..n go to ``mtp_heads.safetensors`` (``mtp_heads.{j}.<HF layer names>``, j=0 for head 2) with
  ``mtp_config.json`` describing them, for speculative decoders. Tokenizer files come along; for the
  byte-level tokenizer a ``tokenizers`` byte-level BPE ``tokenizer.json`` with exactly our ids (bytes
  0..255, EOD 256, pad 257).
* ``meta``: the layout of Meta's multi-token-prediction release: ``consolidated.pth`` (``tok_embeddings``,
  ``layers.{i}.attention.wq/wk/wv/wo``, ``layers.{i}.feed_forward.w1/w2/w3``, ``attention_norm``,
  ``ffn_norm``, ``norm``, ``output``; heads 2..n as ``extra_heads.{j}.*``) and ``params.json``. Meta's
  RoPE is interleaved (complex pairs), so wq/wk rows are permuted from the half-split layout we (and
  HuggingFace) use.

One layer's tensors are split into HF / Meta names (and fused back on import) by ``checkpoint/hf_layout.py``.
"""
from __future__ import annotations

import json
import os
from typing import Optional

import torch

from megatron_mtp.checkpoint.formats import open_checkpoint
from megatron_mtp.checkpoint.hf_layout import HF_LAYER_NAMES, META_LAYER_NAMES, fuse_layer, split_layer
from megatron_mtp.checkpoint.import_hf import hf_to_canonical
from megatron_mtp.checkpoint.reader import config_of
from megatron_mtp.checkpoint.store import locate_run_tokenizer, read_meta, resolve_checkpoint, verify_checkpoint
from megatron_mtp.config import Config
from megatron_mtp.data.tokenizers import MODEL_FILE_NAMES, build_tokenizer, tokenizer_files
from megatron_mtp.errors import CheckpointError, DataError
from megatron_mtp.io_utils import (atomic_save_safetensors, atomic_torch_save, atomic_write_bytes, atomic_write_text,
                                   load_torch)
from megatron_mtp.model.mtp_model import trunk_layer_count

EOD_TOKEN, PAD_TOKEN = "<|endoftext|>", "<|pad|>"


def layer_keys(cfg) -> list:
    """Our layer keys in export order: trunk layers, then heads 1..n."""
    return [f"trunk.{i}" for i in range(trunk_layer_count(cfg.model, cfg.mtp))] + \
           [f"heads.{j}" for j in range(cfg.mtp.n_heads)]


def split_standard_and_extra(cfg) -> tuple:
    """(layer keys of the standard Llama: trunk + head 1, keys of the extra heads 2..n) — the split both
    export formats make."""
    keys = layer_keys(cfg)
    first_extra = len(keys) - cfg.mtp.n_heads + 1
    return keys[:first_extra], keys[first_extra:]


def _require_transformer_heads(cfg, fmt: str) -> None:
    if cfg.mtp.head_type != "transformer":
        raise CheckpointError(
            f"the {fmt} format needs transformer heads (a Llama layer per head), but this model has "
            f"mtp.head_type={cfg.mtp.head_type!r}; linear heads cannot be expressed as Llama layers.")


# ---------------------------------------------------------------------------------------------------------
# Sources


def load_source(path: str):
    """(cfg, weights callable init_key -> fp32 tensor) from a run dir, checkpoint dir or HF export."""
    if os.path.isfile(os.path.join(path, "config.json")):
        cfg, weights = hf_to_canonical(path)
        return cfg, weights.__getitem__
    ckpt = resolve_checkpoint(path)
    verify_checkpoint(ckpt)
    reader = open_checkpoint(ckpt)
    locate_run_tokenizer(reader.cfg, ckpt)
    cache = {}

    def weights(key):
        if key not in cache:
            cache[key] = reader.weight(key).float()
        return cache[key]

    return reader.cfg, weights


# ---------------------------------------------------------------------------------------------------------
# HF


def hf_config(cfg, num_layers: int, tokenizer=None) -> dict:
    m = cfg.model
    eos = getattr(tokenizer, "eod", None)
    pad = getattr(tokenizer, "pad", None)
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": m.vocab_size,
        "hidden_size": m.hidden_size,
        "intermediate_size": m.ffn_size,
        "num_hidden_layers": num_layers,
        "num_attention_heads": m.num_attention_heads,
        "num_key_value_heads": m.kv_heads,
        "head_dim": m.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": m.max_seq_length,
        "initializer_range": m.init_std,
        "rms_norm_eps": m.norm_eps,
        "rope_theta": m.rope_theta,  # transformers 4.x
        "rope_parameters": {"rope_type": "default", "rope_theta": m.rope_theta},  # transformers 5.x
        "attention_bias": False,
        "attention_dropout": 0.0,
        "mlp_bias": False,
        "tie_word_embeddings": bool(m.tie_embeddings),
        "bos_token_id": None,
        "eos_token_id": eos,
        "pad_token_id": pad,
        "use_cache": True,
        "torch_dtype": "float32",
        "dtype": "float32",
    }


def byte_level_tokenizer_json() -> str:
    """A ``tokenizers`` tokenizer.json that maps text to our byte-level ids: UTF-8 byte b -> id b, plus
    ``<|endoftext|>`` = 256 (EOD) and ``<|pad|>`` = 257. A BPE model with no merges over the GPT-2
    byte-to-unicode alphabet, byte-level pre-tokenizer and decoder, no added BOS/EOS."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from tokenizers.pre_tokenizers import ByteLevel

    alphabet = ByteLevel.alphabet()  # the 256 printable stand-ins of the bytes
    byte_to_char = _bytes_to_unicode()
    vocab = {byte_to_char[b]: b for b in range(256)}
    assert set(vocab) == set(alphabet)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], fuse_unk=False))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    from tokenizers import AddedToken

    tok.add_special_tokens([AddedToken(EOD_TOKEN, special=True, normalized=False),
                            AddedToken(PAD_TOKEN, special=True, normalized=False)])
    assert tok.token_to_id(EOD_TOKEN) == 256 and tok.token_to_id(PAD_TOKEN) == 257
    return tok.to_str(pretty=True)


def _bytes_to_unicode() -> dict:
    """GPT-2's reversible byte -> printable character table (what the ByteLevel pre-tokenizer emits)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(bs, cs)}


def export_tokenizer(cfg):
    """The run's tokenizer, loaded before an export writes anything: an export without a complete tokenizer
    is refused (evaluation harnesses would fail on it later, or silently use another tokenizer)."""
    try:
        return build_tokenizer(cfg.data.tokenizer_type, cfg.data.tokenizer_model)
    except DataError as exc:
        raise CheckpointError(f"cannot export a complete tokenizer: {exc}. The run directory's own copy is "
                              f"RUN/tokenizer/; restore it (or data.tokenizer_model) and export again") from None


def write_tokenizer(tokenizer, out_dir: str, model_max_length: int) -> dict:
    """Tokenizer files AutoTokenizer loads; returns what mtp_config.json records about them."""
    common = {"model_max_length": model_max_length, "clean_up_tokenization_spaces": False}
    if tokenizer.name == "byte":
        atomic_write_text(os.path.join(out_dir, "tokenizer.json"), byte_level_tokenizer_json())
        tc = {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": EOD_TOKEN, "pad_token": PAD_TOKEN,
              "add_bos_token": False, "add_eos_token": False, **common}
        atomic_write_text(os.path.join(out_dir, "tokenizer_config.json"), json.dumps(tc, indent=1))
        atomic_write_text(os.path.join(out_dir, "special_tokens_map.json"),
                          json.dumps({"eos_token": EOD_TOKEN, "pad_token": PAD_TOKEN}, indent=1))
        return {"tokenizer_type": "byte", "tokenizer_file": "tokenizer.json", "sha256": tokenizer.content_hash()}
    files = tokenizer_files(tokenizer)
    for name, source in files.items():
        if name != "tokenizer_config.json":
            with open(source, "rb") as stream:
                atomic_write_bytes(os.path.join(out_dir, name), stream.read())
    # The source directory's tokenizer_config.json (chat template, ...) with the ids this model was trained on.
    tc = {}
    if "tokenizer_config.json" in files:
        try:
            with open(files["tokenizer_config.json"], encoding="utf-8") as stream:
                loaded = json.load(stream)
            tc = loaded if isinstance(loaded, dict) else {}
        except (OSError, ValueError):
            tc = {}
    tc.pop("auto_map", None)  # never carry code references from a file we did not write
    special = {"eos_token": tokenizer.token_name(tokenizer.eod)}
    if tokenizer.pad is not None:
        special["pad_token"] = tokenizer.token_name(tokenizer.pad)
    if tokenizer.name == "hf":
        tc.update(tokenizer_class="PreTrainedTokenizerFast", **special, **common)
        model_file = "tokenizer.json"
    else:
        tc.update(tokenizer_class="LlamaTokenizer", add_bos_token=tc.get("add_bos_token", True),
                  add_eos_token=False, **special, **common)
        model_file = "tokenizer.model"
    atomic_write_text(os.path.join(out_dir, "tokenizer_config.json"), json.dumps(tc, indent=1))
    return {"tokenizer_type": tokenizer.name, "tokenizer_file": model_file, "sha256": tokenizer.content_hash()}


# As transformers' save_pretrained: one model.safetensors up to this size, else shards with an index.
DEFAULT_MAX_SHARD_BYTES = 5 * 10**9
REMOTE_CODE_FILE = "modeling_mtp_llama.py"
_SIZE_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}


def parse_size(text) -> int:
    """``"5GB"``, ``"500MiB"`` or a number of bytes -> bytes."""
    value = str(text).strip().upper().replace(" ", "")
    number = value.rstrip("KMGIB")
    unit = value[len(number):]
    try:
        size = int(float(number) * _SIZE_UNITS[unit])
    except (KeyError, ValueError):
        raise CheckpointError(f"shard size {text!r} is not a size such as 5GB, 500MB or 2GiB.") from None
    if size < 1:
        raise CheckpointError(f"shard size {text!r} must be positive.")
    return size


def save_sharded(tensors: dict, out_dir: str, max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES) -> list:
    """``model.safetensors``, or ``model-0000k-of-0000N.safetensors`` + ``model.safetensors.index.json`` when the
    tensors exceed ``max_shard_bytes`` (packed in order; a tensor larger than that gets a shard of its own).
    Earlier weight files in ``out_dir`` go first: a stale single file would shadow a new index. Returns the files."""
    for name in os.listdir(out_dir):
        if name == "model.safetensors" or name == "model.safetensors.index.json" or (
                name.startswith("model-") and name.endswith(".safetensors")):
            os.remove(os.path.join(out_dir, name))
    shards, current, size = [], {}, 0
    for key, tensor in tensors.items():
        nbytes = tensor.numel() * tensor.element_size()
        if current and size + nbytes > max_shard_bytes:
            shards.append(current)
            current, size = {}, 0
        current[key] = tensor
        size += nbytes
    shards.append(current)
    if len(shards) == 1:
        atomic_save_safetensors(shards[0], os.path.join(out_dir, "model.safetensors"), metadata={"format": "pt"})
        return ["model.safetensors"]
    names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    weight_map = {}
    for name, shard in zip(names, shards):
        atomic_save_safetensors(shard, os.path.join(out_dir, name), metadata={"format": "pt"})
        weight_map.update({key: name for key in shard})
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    atomic_write_text(os.path.join(out_dir, "model.safetensors.index.json"), json.dumps(index, indent=1))
    return names + ["model.safetensors.index.json"]


def remote_code_source() -> str:
    """The text of ``hf_modeling_mtp.py``, written into exports as ``modeling_mtp_llama.py``."""
    with open(os.path.join(os.path.dirname(os.path.abspath(__file__)), "hf_modeling_mtp.py"), encoding="utf-8") as f:
        return f.read()


def export_hf(source: str, out_dir: str, dtype: torch.dtype = torch.float32,
              max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES) -> str:
    """Write the HF Llama directory for checkpoint/run ``source`` into ``out_dir``; returns ``out_dir``."""
    cfg, weights = load_source(source)
    _require_transformer_heads(cfg, "hf")
    tokenizer = export_tokenizer(cfg)
    info = source_info(source)
    os.makedirs(out_dir, exist_ok=True)
    main_keys, extra_keys = split_standard_and_extra(cfg)
    V = cfg.model.vocab_size
    tensors = {"model.embed_tokens.weight": weights("embedding")[:V], "model.norm.weight": weights("final_norm")}
    if not cfg.model.tie_embeddings:
        tensors["lm_head.weight"] = weights("output")[:V]
    for i, key in enumerate(main_keys):
        for suffix, t in split_layer(weights, key, cfg).items():
            tensors[f"model.layers.{i}.{suffix}"] = t
    extra = {}
    for j, key in enumerate(extra_keys):
        for suffix, t in split_layer(weights, key, cfg).items():
            extra[f"mtp_heads.{j}.{suffix}"] = t
    cast = lambda d: {k: v.to(dtype).contiguous() for k, v in d.items()}  # noqa: E731
    weight_files = save_sharded(cast(tensors), out_dir, max_shard_bytes)
    if extra:
        atomic_save_safetensors(cast(extra), os.path.join(out_dir, "mtp_heads.safetensors"), metadata={"format": "pt"})
    tok_info = write_tokenizer(tokenizer, out_dir, cfg.model.max_seq_length)
    hf = hf_config(cfg, len(main_keys), tokenizer)
    hf["torch_dtype"] = hf["dtype"] = str(dtype).replace("torch.", "")
    # trust_remote_code=True loads every head (MTPLlamaForCausalLM); without it, the plain LlamaForCausalLM.
    hf["auto_map"] = {"AutoModelForCausalLM": f"{REMOTE_CODE_FILE[:-3]}.MTPLlamaForCausalLM"}
    hf.update(mtp_n_heads=cfg.mtp.n_heads, mtp_trunk_layers=len(main_keys) - 1,
              mtp_heads_file="mtp_heads.safetensors" if extra else None)
    atomic_write_text(os.path.join(out_dir, "config.json"), json.dumps(hf, indent=1))
    atomic_write_text(os.path.join(out_dir, REMOTE_CODE_FILE), remote_code_source())
    gen = {"eos_token_id": hf["eos_token_id"], "pad_token_id": hf["pad_token_id"], "do_sample": False}
    atomic_write_text(os.path.join(out_dir, "generation_config.json"), json.dumps(gen, indent=1))
    mtp = {
        "n_heads": cfg.mtp.n_heads,
        "head_type": cfg.mtp.head_type,
        "head_offsets": list(range(1, cfg.mtp.n_heads + 1)),  # head i predicts token t+i
        "main_head": {"offset": 1, "layer": f"model.layers.{len(main_keys) - 1}"},
        "extra_heads": [{"offset": j + 2, "prefix": f"mtp_heads.{j}"} for j in range(len(extra_keys))],
        "extra_heads_file": "mtp_heads.safetensors" if extra else None,
        "layer_names": list(HF_LAYER_NAMES),
        "shared": {"norm": "model.norm.weight",
                   "unembedding": "model.embed_tokens.weight" if cfg.model.tie_embeddings else "lm_head.weight"},
        "trunk_layers": len(main_keys) - 1,
        "usage": "head 1 = the LlamaForCausalLM itself; head j+2 = mtp_heads.{j} applied to the output of "
                 "model.layers.{trunk_layers-1} (the trunk), then model.norm and the unembedding",
        "tokenizer": tok_info,
        "weight_files": weight_files,
        "training": info,
        "megatron_mtp_config": cfg.to_dict(),
    }
    atomic_write_text(os.path.join(out_dir, "mtp_config.json"), json.dumps(mtp, indent=1))
    atomic_write_text(os.path.join(out_dir, "README.md"), model_card(cfg, info, tokenizer, weight_files, dtype))
    for name in os.listdir(out_dir):  # readable by the evaluation jobs of other users, as save_pretrained leaves them
        if os.path.isfile(os.path.join(out_dir, name)):
            os.chmod(os.path.join(out_dir, name), 0o644)
    return out_dir


def source_info(source: str) -> Optional[dict]:
    """What the model card reports about training: step, tokens seen and the last validation losses per head,
    from the checkpoint and its run's metrics.jsonl; None for an HF source."""
    if os.path.isfile(os.path.join(source, "config.json")):
        return None
    ckpt = resolve_checkpoint(source)
    meta = read_meta(ckpt)
    cfg = meta.get("config") or {}
    step = int(meta.get("step", 0))
    batch = (cfg.get("train") or {}).get("global_batch_size") or 0
    seq = (cfg.get("data") or {}).get("seq_length") or 0
    info = {"checkpoint": os.path.abspath(ckpt), "step": step, "tokens": step * int(batch) * int(seq),
            "validation": None}
    metrics = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(ckpt))), "metrics.jsonl")
    if os.path.isfile(metrics):
        last = None
        with open(metrics) as f:
            for line in f:
                try:
                    record = json.loads(line)
                except ValueError:
                    continue
                if isinstance(record, dict) and "valid_loss" in record and record.get("step", 0) <= step:
                    last = record
        if last is not None:
            heads = sorted((k for k in last if k.startswith("valid_loss_head_")),
                           key=lambda k: int(k.rsplit("_", 1)[1]))
            info["validation"] = {"step": last["step"], "heads": [float(last[k]) for k in heads]}
    return info


def model_card(cfg, info: Optional[dict], tokenizer, weight_files: list, dtype: torch.dtype) -> str:
    """The export's README.md: what the model is, what it was trained on, how well, and how to load it."""
    m, n = cfg.model, cfg.mtp.n_heads
    trunk = trunk_layer_count(cfg.model, cfg.mtp)
    if cfg.data.paths:
        data = "`" + " ".join(str(p) for p in cfg.data.paths) + f"` (data.paths; split {cfg.data.split})"
    else:
        data = "the Python standard library's source files (megatron_mtp's embedded corpus)"
    lines = [
        "---", "library_name: transformers", "tags:", "- multi-token-prediction", "- megatron_mtp", "---", "",
        "# Multi-token-prediction Llama", "",
        f"Trained with megatron_mtp: a shared Llama trunk of {trunk} layers and **{n} output heads**, head i "
        f"predicting token t+i (Gloeckle et al., 2024). Trunk + head 1 form a standard `LlamaForCausalLM` of "
        f"{trunk + 1} layers; heads 2..{n} are in `mtp_heads.safetensors`." if n > 1 else
        f"Trained with megatron_mtp: a standard Llama of {trunk + 1} layers (one head, next-token prediction).", "",
        "| | |", "|---|---|",
        f"| architecture | Llama: d = {m.hidden_size}, {m.num_attention_heads} attention heads "
        f"({m.kv_heads} key/value), "
        f"SwiGLU {m.ffn_size}, RoPE theta {m.rope_theta:g}, context {m.max_seq_length} |",
        f"| heads | {n} ({cfg.mtp.head_type}), {trunk} trunk layers + {n} head layers = {m.num_layers} layers |",
        f"| vocabulary | {m.vocab_size}, {tokenizer.describe()} |",
        f"| weights | {dtype} in {', '.join(f'`{w}`' for w in weight_files)} |",
        f"| data | {data} |",
    ]
    if info:
        lines.append(f"| training | {info['step']} steps, {info['tokens']:,} tokens "
                     f"(global batch {cfg.train.global_batch_size} x {cfg.data.seq_length}) |")
        valid = info.get("validation")
        if valid:
            losses = ", ".join(f"head {i + 1}: {v:.4f}" for i, v in enumerate(valid["heads"]))
            lines.append(f"| validation loss (nats, step {valid['step']}) | {losses} |")
        else:
            lines.append("| validation loss | not measured (the run had train.eval_interval 0) |")
    lines += [
        "", "## Load", "",
        "```python",
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        "tokenizer = AutoTokenizer.from_pretrained(PATH)",
        "model = AutoModelForCausalLM.from_pretrained(PATH)             # head 1: a plain LlamaForCausalLM",
        "mtp = AutoModelForCausalLM.from_pretrained(PATH, trust_remote_code=True)  # every head",
        "out = mtp(tokenizer('def f(x):', return_tensors='pt').input_ids)",
        "out.heads_logits  # one [batch, seq, vocab] tensor per head; head i at position t predicts token t+i",
        "```", "",
        "`trust_remote_code=True` runs `modeling_mtp_llama.py` from this directory (written by megatron_mtp's "
        "export; read it first). Self-speculative decoding and per-head perplexity: "
        "`mtp-generate --load PATH --speculative`, `mtp-eval-perplexity --load PATH --data PREFIX`.", "",
        "## Evaluate with lm-evaluation-harness", "",
        "```bash",
        "pip install 'lm-eval>=0.4'      # or megatron_mtp's eval extra",
        f"lm_eval --model hf --model_args pretrained=PATH,dtype={str(dtype).replace('torch.', '')} --tasks hellaswag",
        "```", "",
    ]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------------
# Meta


def hf_to_meta_rope(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Rows of wq/wk from the half-split RoPE layout (HF, ours) to Meta's interleaved one: the inverse of
    the ``permute`` in HF's convert_llama_weights_to_hf.py."""
    rows, cols = w.shape
    return w.reshape(n_heads, 2, rows // n_heads // 2, cols).transpose(1, 2).reshape(rows, cols)


def meta_to_hf_rope(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    rows, cols = w.shape
    return w.reshape(n_heads, rows // n_heads // 2, 2, cols).transpose(1, 2).reshape(rows, cols)


def _to_meta_layer(hf_layer: dict, cfg) -> dict:
    m = cfg.model
    out = {}
    for hf_name, meta_name in zip(HF_LAYER_NAMES, META_LAYER_NAMES):
        t = hf_layer[hf_name]
        if meta_name == "attention.wq.weight":
            t = hf_to_meta_rope(t, m.num_attention_heads)
        elif meta_name == "attention.wk.weight":
            t = hf_to_meta_rope(t, m.kv_heads)
        out[meta_name] = t
    return out


def export_meta(source: str, out_dir: str, dtype: torch.dtype = torch.float32) -> str:
    cfg, weights = load_source(source)
    _require_transformer_heads(cfg, "meta")
    tokenizer = export_tokenizer(cfg)
    os.makedirs(out_dir, exist_ok=True)
    main_keys, extra_keys = split_standard_and_extra(cfg)
    V = cfg.model.vocab_size
    sd = {"tok_embeddings.weight": weights("embedding")[:V], "norm.weight": weights("final_norm"),
          "output.weight": weights("embedding" if cfg.model.tie_embeddings else "output")[:V]}
    for i, key in enumerate(main_keys):
        for name, t in _to_meta_layer(split_layer(weights, key, cfg), cfg).items():
            sd[f"layers.{i}.{name}"] = t
    for j, key in enumerate(extra_keys):
        for name, t in _to_meta_layer(split_layer(weights, key, cfg), cfg).items():
            sd[f"extra_heads.{j}.{name}"] = t
    sd = {k: v.to(dtype).contiguous().clone() for k, v in sd.items()}
    atomic_torch_save(sd, os.path.join(out_dir, "consolidated.pth"))
    m = cfg.model
    # Meta's ModelArgs derives the FFN width: multiple_of * ceil(int(multiplier * int(8 dim / 3)) / multiple_of).
    # multiple_of = our width and multiplier = width / int(8 dim / 3) give exactly our width, whatever it is.
    base = int(2 * 4 * m.hidden_size / 3)
    params = {"dim": m.hidden_size, "n_layers": m.num_layers, "n_heads": m.num_attention_heads,
              "n_kv_heads": m.kv_heads, "vocab_size": V, "multiple_of": m.ffn_size,
              "ffn_dim_multiplier": m.ffn_size / base, "norm_eps": m.norm_eps, "rope_theta": m.rope_theta,
              "n_future_tokens": cfg.mtp.n_heads}
    atomic_write_text(os.path.join(out_dir, "params.json"), json.dumps(params, indent=1))
    tok_info = None
    if tokenizer.name != "byte":
        tok_info = MODEL_FILE_NAMES[tokenizer.name]
        with open(tokenizer_files(tokenizer)[tok_info], "rb") as stream:
            atomic_write_bytes(os.path.join(out_dir, tok_info), stream.read())
    atomic_write_text(os.path.join(out_dir, "megatron_mtp.json"), json.dumps(
        {"tokenizer_type": cfg.data.tokenizer_type, "tokenizer_file": tok_info, "config": cfg.to_dict()}, indent=1))
    for name in os.listdir(out_dir):
        if os.path.isfile(os.path.join(out_dir, name)):
            os.chmod(os.path.join(out_dir, name), 0o644)
    return out_dir


def read_meta_export(path: str) -> tuple:
    """(params.json dict, canonical weights of our model) from a Meta-layout directory: the names mapped
    back and wq/wk permuted back to the half-split layout. The inverse of ``export_meta``."""
    with open(os.path.join(path, "params.json")) as f:
        params = json.load(f)
    sd = load_torch(os.path.join(path, "consolidated.pth"))
    cfg = Config()
    ours = os.path.join(path, "megatron_mtp.json")
    if os.path.isfile(ours):  # our own export: keep the rest of the config (tokenizer, context length, ...)
        with open(ours) as f:
            extra = json.load(f)
        cfg = config_of(extra, path)
        if extra.get("tokenizer_file") and cfg.data.tokenizer_type != "byte":
            cfg.data.tokenizer_model = os.path.join(path, extra["tokenizer_file"])
    m = cfg.model
    m.vocab_size, m.hidden_size, m.num_layers = params["vocab_size"], params["dim"], params["n_layers"]
    m.num_attention_heads, m.num_kv_heads = params["n_heads"], params.get("n_kv_heads") or params["n_heads"]
    m.norm_eps, m.rope_theta = params["norm_eps"], params.get("rope_theta", 10000.0)
    m.ffn_hidden_size = sd["layers.0.feed_forward.w1.weight"].shape[0]
    m.tie_embeddings = False
    cfg.mtp.n_heads, cfg.mtp.head_type = params.get("n_future_tokens", 1), "transformer"
    n_main = sum(1 for k in sd if k.startswith("layers.") and k.endswith(".attention_norm.weight"))

    def layer(prefix):
        hf = {}
        for hf_name, meta_name in zip(HF_LAYER_NAMES, META_LAYER_NAMES):
            t = sd[f"{prefix}.{meta_name}"].float()
            if meta_name == "attention.wq.weight":
                t = meta_to_hf_rope(t, m.num_attention_heads)
            elif meta_name == "attention.wk.weight":
                t = meta_to_hf_rope(t, m.kv_heads)
            hf[hf_name] = t
        return hf

    weights = {"embedding": sd["tok_embeddings.weight"].float(), "final_norm": sd["norm.weight"].float(),
               "output": sd["output.weight"].float()}
    for i in range(n_main - 1):
        weights.update(fuse_layer(layer(f"layers.{i}"), f"trunk.{i}", cfg))
    weights.update(fuse_layer(layer(f"layers.{n_main - 1}"), "heads.0", cfg))
    for j in range(cfg.mtp.n_heads - 1):
        weights.update(fuse_layer(layer(f"extra_heads.{j}"), f"heads.{j + 1}", cfg))
    return params, cfg, weights


def export(source: str, fmt: str, out_dir: str, dtype: torch.dtype = torch.float32,
           max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES) -> str:
    if fmt == "hf":
        return export_hf(source, out_dir, dtype, max_shard_bytes)
    if fmt == "meta":
        return export_meta(source, out_dir, dtype)
    raise CheckpointError(f"unknown export format {fmt!r}; choose hf or meta.")
