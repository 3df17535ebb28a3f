"""Export a checkpoint (any layout) for evaluation and serving.

* ``hf``: a HuggingFace Llama directory that ``LlamaForCausalLM`` / lm-evaluation-harness load as it is.
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

Our layer -> HF names: the fused QKV is grouped per KV head ([q heads of group g, k_g, v_g] for each g),
so it is viewed as [kv_heads, group + 2, head_dim, hidden] and split; ``gate_up`` is [gate; up].
"""
from __future__ import annotations

import json
import os
import shutil
from typing import Optional

import torch

from megatron_mtp.checkpoint.formats import open_checkpoint
from megatron_mtp.checkpoint.reader import config_of
from megatron_mtp.checkpoint.store import resolve_checkpoint, verify_checkpoint
from megatron_mtp.config import Config
from megatron_mtp.errors import CheckpointError
from megatron_mtp.io_utils import atomic_torch_save, atomic_write_text, load_torch
from megatron_mtp.model.mtp_model import trunk_layer_count

HF_LAYER_NAMES = ("input_layernorm.weight", "self_attn.q_proj.weight", "self_attn.k_proj.weight",
                  "self_attn.v_proj.weight", "self_attn.o_proj.weight", "post_attention_layernorm.weight",
                  "mlp.gate_proj.weight", "mlp.up_proj.weight", "mlp.down_proj.weight")
META_LAYER_NAMES = ("attention_norm.weight", "attention.wq.weight", "attention.wk.weight", "attention.wv.weight",
                    "attention.wo.weight", "ffn_norm.weight", "feed_forward.w1.weight", "feed_forward.w3.weight",
                    "feed_forward.w2.weight")  # same order as HF_LAYER_NAMES (w1 gate, w3 up, w2 down)
EOD_TOKEN, PAD_TOKEN = "<|endoftext|>", "<|pad|>"


# ---------------------------------------------------------------------------------------------------------
# One transformer layer: our fused tensors <-> separate projections


def split_layer(weights, key: str, cfg) -> dict:
    """Our layer ``key`` (e.g. ``trunk.0``, ``heads.2``) -> HF per-layer names (suffixes of HF_LAYER_NAMES)."""
    m = cfg.model
    hd, nkv = m.head_dim, m.kv_heads
    group = m.num_attention_heads // nkv
    qkv = weights(f"{key}.qkv").view(nkv, group + 2, hd, m.hidden_size)
    gate_up = weights(f"{key}.mlp.gate_up")
    f = gate_up.size(0) // 2
    return {
        "input_layernorm.weight": weights(f"{key}.attn_norm"),
        "self_attn.q_proj.weight": qkv[:, :group].reshape(m.num_attention_heads * hd, m.hidden_size),
        "self_attn.k_proj.weight": qkv[:, group].reshape(nkv * hd, m.hidden_size),
        "self_attn.v_proj.weight": qkv[:, group + 1].reshape(nkv * hd, m.hidden_size),
        "self_attn.o_proj.weight": weights(f"{key}.out"),
        "post_attention_layernorm.weight": weights(f"{key}.mlp_norm"),
        "mlp.gate_proj.weight": gate_up[:f],
        "mlp.up_proj.weight": gate_up[f:],
        "mlp.down_proj.weight": weights(f"{key}.mlp.down"),
    }


def fuse_layer(hf: dict, key: str, cfg) -> dict:
    """Inverse of ``split_layer``: HF per-layer tensors -> our canonical tensors for layer ``key``."""
    m = cfg.model
    hd, nkv = m.head_dim, m.kv_heads
    group = m.num_attention_heads // nkv
    q = hf["self_attn.q_proj.weight"].reshape(nkv, group, hd, -1)
    k = hf["self_attn.k_proj.weight"].reshape(nkv, 1, hd, -1)
    v = hf["self_attn.v_proj.weight"].reshape(nkv, 1, hd, -1)
    return {
        f"{key}.attn_norm": hf["input_layernorm.weight"],
        f"{key}.qkv": torch.cat([q, k, v], dim=1).reshape(-1, q.size(-1)),
        f"{key}.out": hf["self_attn.o_proj.weight"],
        f"{key}.mlp_norm": hf["post_attention_layernorm.weight"],
        f"{key}.mlp.gate_up": torch.cat([hf["mlp.gate_proj.weight"], hf["mlp.up_proj.weight"]], dim=0),
        f"{key}.mlp.down": hf["mlp.down_proj.weight"],
    }


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
        from megatron_mtp.checkpoint.import_hf import hf_to_canonical

        cfg, weights = hf_to_canonical(path)
        return cfg, weights.__getitem__
    ckpt = resolve_checkpoint(path)
    verify_checkpoint(ckpt)
    reader = open_checkpoint(ckpt)
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


def write_tokenizer(cfg, out_dir: str, model_max_length: int) -> Optional[dict]:
    """Tokenizer files AutoTokenizer loads; returns what mtp_config.json records about them."""
    t = cfg.data.tokenizer_type
    common = {"model_max_length": model_max_length, "clean_up_tokenization_spaces": False}
    if t == "byte":
        atomic_write_text(os.path.join(out_dir, "tokenizer.json"), byte_level_tokenizer_json())
        tc = {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": EOD_TOKEN, "pad_token": PAD_TOKEN,
              "add_bos_token": False, "add_eos_token": False, **common}
        atomic_write_text(os.path.join(out_dir, "tokenizer_config.json"), json.dumps(tc, indent=1))
        atomic_write_text(os.path.join(out_dir, "special_tokens_map.json"),
                          json.dumps({"eos_token": EOD_TOKEN, "pad_token": PAD_TOKEN}, indent=1))
        return {"tokenizer_type": "byte", "tokenizer_file": "tokenizer.json"}
    src = cfg.data.tokenizer_model
    if not src or not os.path.isfile(src):
        print(f"WARNING: tokenizer model {src!r} not found: the export has no tokenizer files; copy them in "
              f"before evaluating.", flush=True)
        return None
    from megatron_mtp.data.tokenizers import build_tokenizer

    tok = build_tokenizer(t, src)
    if t == "hf":
        shutil.copyfile(src, os.path.join(out_dir, "tokenizer.json"))
        eos = _token_name(tok, tok.eod)
        tc = {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": eos, **common}
        if tok.pad is not None:
            tc["pad_token"] = _token_name(tok, tok.pad)
        atomic_write_text(os.path.join(out_dir, "tokenizer_config.json"), json.dumps(tc, indent=1))
        return {"tokenizer_type": "hf", "tokenizer_file": "tokenizer.json"}
    shutil.copyfile(src, os.path.join(out_dir, "tokenizer.model"))
    tc = {"tokenizer_class": "LlamaTokenizer", "add_bos_token": True, "add_eos_token": False, **common}
    atomic_write_text(os.path.join(out_dir, "tokenizer_config.json"), json.dumps(tc, indent=1))
    return {"tokenizer_type": "sentencepiece", "tokenizer_file": "tokenizer.model"}


def _token_name(tok, token_id: int) -> Optional[str]:
    inner = getattr(tok, "_tokenizer", None)
    return inner.id_to_token(token_id) if inner is not None else None


def export_hf(source: str, out_dir: str, dtype: torch.dtype = torch.float32) -> str:
    """Write the HF Llama directory for checkpoint/run ``source`` into ``out_dir``; returns ``out_dir``."""
    from safetensors.torch import save_file

    cfg, weights = load_source(source)
    _require_transformer_heads(cfg, "hf")
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
    save_file(cast(tensors), os.path.join(out_dir, "model.safetensors"), metadata={"format": "pt"})
    if extra:
        save_file(cast(extra), os.path.join(out_dir, "mtp_heads.safetensors"), metadata={"format": "pt"})
    tok_info = write_tokenizer(cfg, out_dir, cfg.model.max_seq_length)
    try:
        from megatron_mtp.data.tokenizers import build_tokenizer

        tokenizer = build_tokenizer(cfg.data.tokenizer_type, cfg.data.tokenizer_model)
    except Exception:  # the tokenizer file may be missing on the exporting machine
        tokenizer = None
    hf = hf_config(cfg, len(main_keys), tokenizer)
    hf["torch_dtype"] = hf["dtype"] = str(dtype).replace("torch.", "")
    atomic_write_text(os.path.join(out_dir, "config.json"), json.dumps(hf, indent=1))
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
        "megatron_mtp_config": cfg.to_dict(),
    }
    atomic_write_text(os.path.join(out_dir, "mtp_config.json"), json.dumps(mtp, indent=1))
    return out_dir


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
    if cfg.data.tokenizer_type != "byte" and cfg.data.tokenizer_model and os.path.isfile(cfg.data.tokenizer_model):
        name = "tokenizer.model" if cfg.data.tokenizer_type == "sentencepiece" else "tokenizer.json"
        shutil.copyfile(cfg.data.tokenizer_model, os.path.join(out_dir, name))
        tok_info = name
    atomic_write_text(os.path.join(out_dir, "megatron_mtp.json"), json.dumps(
        {"tokenizer_type": cfg.data.tokenizer_type, "tokenizer_file": tok_info, "config": cfg.to_dict()}, indent=1))
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


def export(source: str, fmt: str, out_dir: str, dtype: torch.dtype = torch.float32) -> str:
    if fmt == "hf":
        return export_hf(source, out_dir, dtype)
    if fmt == "meta":
        return export_meta(source, out_dir, dtype)
    raise CheckpointError(f"unknown export format {fmt!r}; choose hf or meta.")
