"""One transformer layer in HuggingFace Llama and Meta layouts: our fused tensors <-> separate projections.

Shared by the exporter (ours -> HF / Meta) and the importer (HF -> ours), so neither imports the other for it.
The fused QKV is grouped per KV head ([q heads of group g, k_g, v_g] for each g), so it is viewed as
[kv_heads, group + 2, head_dim, hidden] and split; ``gate_up`` is [gate; up].
"""
from __future__ import annotations

import torch

HF_LAYER_NAMES = ("input_layernorm.weight", "self_attn.q_proj.weight", "self_attn.k_proj.weight",
                  "self_attn.v_proj.weight", "self_attn.o_proj.weight", "post_attention_layernorm.weight",
                  "mlp.gate_proj.weight", "mlp.up_proj.weight", "mlp.down_proj.weight")
META_LAYER_NAMES = ("attention_norm.weight", "attention.wq.weight", "attention.wk.weight", "attention.wv.weight",
                    "attention.wo.weight", "ffn_norm.weight", "feed_forward.w1.weight", "feed_forward.w3.weight",
                    "feed_forward.w2.weight")  # same order as HF_LAYER_NAMES (w1 gate, w3 up, w2 down)

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
