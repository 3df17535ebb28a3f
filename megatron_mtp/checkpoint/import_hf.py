"""Start MTP training from an existing HuggingFace Llama checkpoint.

An L-layer Llama becomes an n-head MTP model with ``model.num_layers = L - 1 + n``: its first L-1 layers
are the trunk, its last layer is head 1 (the next-token head), and heads 2..n start as copies of head 1
(``init_heads="copy"``) or of the last trunk layer (``"trunk"``). Importing therefore *adds* n-1 layers
(compute-matched comparisons should compare against an L-1+n layer baseline). Embedding, final norm and
``lm_head`` become ours unchanged (the unembedding is shared by all heads).

Our own HF exports (``tools/export_checkpoint.py --format hf``) carry ``mtp_config.json`` and
``mtp_heads.safetensors``: importing one restores every head exactly (unless ``n_heads`` asks otherwise).
"""
from __future__ import annotations

import json
import os
from typing import Optional

from safetensors.torch import load_file as load_safetensors

from megatron_mtp.checkpoint.hf_layout import HF_LAYER_NAMES, fuse_layer
from megatron_mtp.checkpoint.formats import publish_as_run
from megatron_mtp.checkpoint.reader import config_of
from megatron_mtp.checkpoint.store import LOCAL_FORMAT
from megatron_mtp.config import Config, ConfigError, validate
from megatron_mtp.errors import CheckpointError
from megatron_mtp.io_utils import UnsafeFileError, load_torch


def _read_json(path: str) -> dict:
    with open(path) as f:
        return json.load(f)


def read_hf_tensors(hf_dir: str) -> dict:
    """Every tensor of an HF model directory (single or sharded safetensors, or pytorch_model.bin)."""
    single = os.path.join(hf_dir, "model.safetensors")
    index = os.path.join(hf_dir, "model.safetensors.index.json")
    if os.path.isfile(single):
        return load_safetensors(single)
    if os.path.isfile(index):
        out = {}
        for shard in sorted(set(_read_json(index)["weight_map"].values())):
            out.update(load_safetensors(os.path.join(hf_dir, shard)))
        return out
    binary = os.path.join(hf_dir, "pytorch_model.bin")
    if os.path.isfile(binary):
        try:
            return load_torch(binary)
        except UnsafeFileError as exc:
            raise CheckpointError(f"{binary} holds Python objects other than tensors ({exc.global_name}), which "
                                  f"could run code when loaded, so it is refused; use its safetensors files.") from None
    raise CheckpointError(f"{hf_dir} holds no model.safetensors, model.safetensors.index.json or pytorch_model.bin; "
                          f"pass a HuggingFace Llama model directory.")


def _rope_theta(hf: dict) -> float:
    params = hf.get("rope_parameters") or {}
    scaling = hf.get("rope_scaling") or {}
    kind = params.get("rope_type") or scaling.get("rope_type") or scaling.get("type") or "default"
    if kind != "default":
        raise CheckpointError(f"the model uses RoPE scaling {kind!r}, which megatron_mtp does not implement; "
                              f"import a model with plain RoPE.")
    return float(params.get("rope_theta") or hf.get("rope_theta") or 10000.0)


def config_from_hf(hf: dict, n_heads: int, hf_dir: str, base: Optional[dict] = None):
    """Our Config for an HF Llama config.json with ``n_heads`` heads (num_layers = L - 1 + n)."""
    if hf.get("model_type", "llama") not in ("llama", "mistral") and "LlamaForCausalLM" not in hf.get("architectures", []):
        raise CheckpointError(f"{hf_dir} is a {hf.get('model_type')!r} model; only Llama-architecture models "
                              f"can be imported.")
    if hf.get("attention_bias") or hf.get("mlp_bias"):
        raise CheckpointError(f"{hf_dir} uses biases in attention or MLP, which megatron_mtp's Llama layers do not "
                              f"have; import a bias-free Llama model.")
    if hf.get("hidden_act", "silu") != "silu":
        raise CheckpointError(f"{hf_dir} uses hidden_act={hf.get('hidden_act')!r}; only silu (SwiGLU) is supported.")
    cfg = config_of({"config": base}, hf_dir) if base else Config()
    m = cfg.model
    L = int(hf["num_hidden_layers"])
    if L < 2:
        raise CheckpointError(f"{hf_dir} has {L} layer(s); an MTP model needs at least one trunk layer plus head "
                              f"1, so import a model with at least 2 layers.")
    m.vocab_size = int(hf["vocab_size"])
    m.hidden_size = int(hf["hidden_size"])
    m.num_attention_heads = int(hf["num_attention_heads"])
    m.num_kv_heads = int(hf.get("num_key_value_heads") or m.num_attention_heads)
    m.ffn_hidden_size = int(hf["intermediate_size"])
    m.norm_eps = float(hf.get("rms_norm_eps", 1e-5))
    m.rope_theta = _rope_theta(hf)
    m.max_seq_length = int(hf.get("max_position_embeddings", m.max_seq_length))
    m.tie_embeddings = bool(hf.get("tie_word_embeddings", False))
    if hf.get("head_dim") and int(hf["head_dim"]) != m.hidden_size // m.num_attention_heads:
        raise CheckpointError(f"{hf_dir} has head_dim={hf['head_dim']} != hidden_size / num_attention_heads; "
                              f"megatron_mtp needs the standard Llama head size.")
    cfg.mtp.head_type = "transformer"
    cfg.mtp.n_heads = n_heads
    if cfg.mtp.loss_weights is not None and len(cfg.mtp.loss_weights) != n_heads:
        cfg.mtp.loss_weights = None
    m.num_layers = L - 1 + n_heads
    cfg.data.seq_length = min(cfg.data.seq_length, m.max_seq_length)
    try:
        validate(cfg)
    except ConfigError as exc:
        raise CheckpointError(f"{hf_dir} cannot become an MTP model: {exc}") from None
    return cfg


def _tokenizer_settings(cfg, hf_dir: str, mtp: Optional[dict]) -> None:
    tok = (mtp or {}).get("tokenizer") or {}
    if tok.get("tokenizer_type") == "byte":
        cfg.data.tokenizer_type, cfg.data.tokenizer_model = "byte", None
    elif os.path.isfile(os.path.join(hf_dir, "tokenizer.json")):
        cfg.data.tokenizer_type, cfg.data.tokenizer_model = "hf", os.path.abspath(os.path.join(hf_dir, "tokenizer.json"))
    elif os.path.isfile(os.path.join(hf_dir, "tokenizer.model")):
        cfg.data.tokenizer_type = "sentencepiece"
        cfg.data.tokenizer_model = os.path.abspath(os.path.join(hf_dir, "tokenizer.model"))


def hf_to_canonical(hf_dir: str, n_heads: Optional[int] = None, init_heads: str = "copy") -> tuple:
    """(cfg, canonical weights dict) from an HF Llama directory (see the module doc)."""
    if init_heads not in ("copy", "trunk"):
        raise CheckpointError(f"--init-heads must be copy or trunk, got {init_heads!r}.")
    config_path = os.path.join(hf_dir, "config.json")
    if not os.path.isfile(config_path):
        raise CheckpointError(f"{hf_dir} has no config.json; pass a HuggingFace model directory.")
    hf = _read_json(config_path)
    mtp_path = os.path.join(hf_dir, "mtp_config.json")
    mtp = _read_json(mtp_path) if os.path.isfile(mtp_path) else None
    saved_heads = int(mtp["n_heads"]) if mtp else 1
    n = int(n_heads or saved_heads)
    if n < 1:
        raise CheckpointError(f"--n-heads must be at least 1, got {n}.")
    base = (mtp or {}).get("megatron_mtp_config")
    cfg = config_from_hf(hf, n, hf_dir, base)
    _tokenizer_settings(cfg, hf_dir, mtp)
    tensors = read_hf_tensors(hf_dir)
    L = int(hf["num_hidden_layers"])

    def hf_layer(prefix: str) -> dict:
        try:
            return {name: tensors[f"{prefix}.{name}"].float() for name in HF_LAYER_NAMES}
        except KeyError as exc:
            raise CheckpointError(f"{hf_dir} lacks tensor {exc.args[0]}; it is not a complete Llama "
                                  f"checkpoint.") from None

    try:
        weights = {"embedding": tensors["model.embed_tokens.weight"].float(),
                   "final_norm": tensors["model.norm.weight"].float()}
    except KeyError as exc:
        raise CheckpointError(f"{hf_dir} lacks tensor {exc.args[0]}; it is not a complete Llama checkpoint.") from None
    if not cfg.model.tie_embeddings:
        if "lm_head.weight" not in tensors:
            raise CheckpointError(f"{hf_dir} lacks lm_head.weight but tie_word_embeddings is false; it is not a "
                                  f"complete Llama checkpoint.")
        weights["output"] = tensors["lm_head.weight"].float()
    for i in range(L - 1):
        weights.update(fuse_layer(hf_layer(f"model.layers.{i}"), f"trunk.{i}", cfg))
    weights.update(fuse_layer(hf_layer(f"model.layers.{L - 1}"), "heads.0", cfg))
    extra = {}
    extra_file = os.path.join(hf_dir, (mtp or {}).get("extra_heads_file") or "mtp_heads.safetensors")
    if mtp and os.path.isfile(extra_file):
        extra = load_safetensors(extra_file)
    for j in range(1, n):
        prefix = f"mtp_heads.{j - 1}"
        if f"{prefix}.{HF_LAYER_NAMES[0]}" in extra:
            src = {name: extra[f"{prefix}.{name}"].float() for name in HF_LAYER_NAMES}
        else:
            src = hf_layer(f"model.layers.{L - 1 if init_heads == 'copy' else L - 2}")
        weights.update(fuse_layer(src, f"heads.{j}", cfg))
    return cfg, weights


def import_checkpoint(hf_dir: str, run_dir: str, n_heads: int, init_heads: str = "copy") -> str:
    """Write ``run_dir`` (config.yaml + checkpoints/step_00000000, weights only, TP=1) from an HF model;
    returns the config path. Train with ``mtp-train --config RUN_DIR/config.yaml`` (or pass
    ``--checkpoint.load RUN_DIR --checkpoint.finetune true`` with your own config)."""
    cfg, weights = hf_to_canonical(hf_dir, n_heads, init_heads)
    os.makedirs(run_dir, exist_ok=True)
    if cfg.data.tokenizer_type != "byte" and cfg.data.tokenizer_model:
        from megatron_mtp.data.tokenizers import build_tokenizer, install_run_tokenizer

        # Absolute: training runs in RUN_DIR/train; a moved import finds its copy again (locate_tokenizer_model).
        copy = install_run_tokenizer(build_tokenizer(cfg.data.tokenizer_type, cfg.data.tokenizer_model), run_dir)
        cfg.data.tokenizer_model = os.path.abspath(os.path.join(run_dir, copy))
    cfg.parallel.tp = cfg.parallel.pp = 1
    cfg.checkpoint.load = os.path.abspath(run_dir)
    cfg.checkpoint.finetune = True
    cfg.train.run_dir = os.path.join(os.path.abspath(run_dir), "train")
    cfg.train.global_batch_size = cfg.train.grad_accum = None
    publish_as_run(run_dir, cfg, tp=1, pp=1, dp=1, weights=weights, optim=None, step=0, consumed_samples=0,
                   weights_only=True, engine=LOCAL_FORMAT)
    return os.path.join(run_dir, "config.yaml")
