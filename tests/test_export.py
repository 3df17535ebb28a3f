"""Export for evaluation and import for training.

* HF: ``transformers.LlamaForCausalLM`` loads the export and its logits equal our head-1 logits (float32,
  <= 1e-4) with the same greedy continuation; ``AutoTokenizer`` encodes text to our byte-level ids; the extra
  heads in ``mtp_heads.safetensors``, run as HF decoder layers on the trunk output, give our head-2 logits.
* Import: the export imported back is our model (trunk, head 1 and the extra heads, bit for bit); a plain
  Llama imports with n heads as L - 1 + n layers, heads copied from head 1 or from the last trunk layer, and
  trains from there.
* Meta: the export read back by a small reader (Meta names -> ours, interleaved RoPE -> half-split) gives
  our logits, and so does an independent Meta-style forward with complex (interleaved) rotary embeddings.
"""
from __future__ import annotations

import importlib.util
import json
import os
import shutil

import pytest
import torch

from helpers import REPO, _train_in_process, losses, tiny_overrides

SAMPLE = "def f(x):\n    return x * 2  # héllo ✓\n"


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny 2-head model trained for 3 steps (norms moved away from 1), saved as a run directory."""
    base = tmp_path_factory.mktemp("export")
    run, data = str(base / "run"), str(base / "data")
    _train_in_process(tiny_overrides(run, data, **{"train.iters": 3}))
    from megatron_mtp.checkpoint.merge import load_merged_model

    cfg, model, tok = load_merged_model(run)
    return {"base": base, "run": run, "data": data, "cfg": cfg, "model": model, "tok": tok}


def _ids(tok) -> torch.Tensor:
    return torch.tensor([tok.encode(SAMPLE)])


def _tool(name: str):
    spec = importlib.util.spec_from_file_location(name, os.path.join(REPO, "tools", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def hf_dir(trained):
    out = str(trained["base"] / "hf")
    assert _tool("export_checkpoint").main(["--load", trained["run"], "--format", "hf", "--output", out]) == 0
    return out


def test_hf_export_matches_transformers(trained, hf_dir):
    from transformers import AutoTokenizer, LlamaForCausalLM

    model, tok = trained["model"], trained["tok"]
    ids = _ids(tok)
    ours = model.logits(ids, heads="all")
    hf = LlamaForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    assert hf.config.num_hidden_layers == 3  # 2 trunk layers + head 1
    with torch.no_grad():
        out = hf(ids, output_hidden_states=True)
    assert (out.logits - ours[0]).abs().max().item() <= 1e-4

    # the same greedy continuation
    steps = 12
    with torch.no_grad():
        theirs = hf.generate(ids, max_new_tokens=steps, do_sample=False, eos_token_id=None, pad_token_id=257)
    mine = ids
    for _ in range(steps):
        nxt = model.logits(mine)[0][:, -1].argmax(-1, keepdim=True)
        mine = torch.cat([mine, nxt], dim=1)
    assert torch.equal(theirs, mine)

    # AutoTokenizer maps text to our byte-level ids (EOD 256, pad 257) and back
    at = AutoTokenizer.from_pretrained(hf_dir)
    assert at(SAMPLE)["input_ids"] == tok.encode(SAMPLE) == list(SAMPLE.encode("utf-8"))
    assert (at.eos_token_id, at.pad_token_id) == (256, 257)
    assert at.decode(tok.encode(SAMPLE)) == SAMPLE
    assert at("a<|endoftext|>b")["input_ids"] == [97, 256, 98]

    # the extra head, as a HF decoder layer on the trunk output, then the shared norm and unembedding
    from safetensors.torch import load_file
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer

    with open(os.path.join(hf_dir, "mtp_config.json")) as f:
        mtp = json.load(f)
    assert mtp["n_heads"] == 2 and mtp["trunk_layers"] == 2 and mtp["extra_heads"][0]["offset"] == 2
    extra = load_file(os.path.join(hf_dir, mtp["extra_heads_file"]))
    layer = LlamaDecoderLayer(hf.config, layer_idx=0).eval()
    layer.load_state_dict({k[len("mtp_heads.0."):]: v for k, v in extra.items() if k.startswith("mtp_heads.0.")})
    z = out.hidden_states[mtp["trunk_layers"]]  # output of the last trunk layer
    pos = torch.arange(ids.size(1))[None]
    with torch.no_grad():
        h = layer(z, position_ids=pos, position_embeddings=hf.model.rotary_emb(z, pos))
        h = h[0] if isinstance(h, tuple) else h
        head2 = hf.lm_head(hf.model.norm(h))
    assert (head2 - ours[1]).abs().max().item() <= 1e-4


def test_import_reproduces_and_trains(trained, hf_dir, tmp_path):
    from megatron_mtp.checkpoint.export import load_source
    from megatron_mtp.checkpoint.import_hf import hf_to_canonical, import_checkpoint
    from megatron_mtp.checkpoint.merge import load_merged_model
    from megatron_mtp.checkpoint.universal import param_infos

    src_cfg, src = load_source(trained["run"])
    # our export, imported back: every parameter identical (trunk, head 1 and head 2)
    cfg, weights = hf_to_canonical(hf_dir)
    assert (cfg.model.num_layers, cfg.mtp.n_heads, cfg.data.tokenizer_type) == (4, 2, "byte")
    for key in param_infos(src_cfg):
        assert torch.equal(weights[key], src(key)), key
    cfg2, model2, _ = load_merged_model(hf_dir)
    ids = _ids(trained["tok"])
    for a, b in zip(model2.logits(ids, heads="all"), trained["model"].logits(ids, heads="all")):
        assert torch.equal(a, b)

    # a plain Llama (no MTP files): L = 3 layers -> trunk 2 + n heads, num_layers = L - 1 + n
    plain = str(tmp_path / "plain")
    shutil.copytree(hf_dir, plain)
    os.remove(os.path.join(plain, "mtp_config.json"))
    os.remove(os.path.join(plain, "mtp_heads.safetensors"))
    cfg3, w3 = hf_to_canonical(plain, n_heads=3, init_heads="copy")
    assert (cfg3.model.num_layers, cfg3.mtp.n_heads, cfg3.data.tokenizer_type) == (5, 3, "hf")
    for j in (1, 2):
        for part in ("qkv", "out", "attn_norm", "mlp.gate_up"):
            assert torch.equal(w3[f"heads.{j}.{part}"], src(f"heads.0.{part}"))
    _, w4 = hf_to_canonical(plain, n_heads=3, init_heads="trunk")
    assert torch.equal(w4["heads.2.mlp.down"], src("trunk.1.mlp.down"))
    assert torch.equal(w4["heads.0.mlp.down"], src("heads.0.mlp.down"))

    # the CLI writes a run directory that mtp-train starts from (weights only, step 0, fresh optimizer)
    run = str(tmp_path / "imported")
    assert _tool("import_checkpoint").main(["--hf", hf_dir, "--output", run, "--n-heads", "2"]) == 0
    config = os.path.join(run, "config.yaml")
    train_dir = str(tmp_path / "ft")
    data = tiny_overrides(train_dir, trained["data"])
    keep = {"--data.paths", "--data.split", "--data.cache_dir", "--train.run_dir", "--logging.tensorboard",
            "--logging.plot", "--data.seq_length", "--train.micro_batch_size", "--train.grad_accum"}
    overrides = [x for i in range(0, len(data), 2) if data[i] in keep for x in data[i:i + 2]]
    _train_in_process(["--config", config, *overrides, "--train.iters", "2",
                       "--checkpoint.load", run, "--checkpoint.finetune", "true"])
    assert [r[0] for r in losses(train_dir)] == [1, 2]
    # its first loss is the imported model's loss, not a random model's (~ln 258 = 5.55 per head)
    first = losses(train_dir)[0]
    assert first[2] < losses(trained["run"])[0][2]


def test_meta_export_roundtrip(trained, tmp_path):
    from megatron_mtp.checkpoint.export import read_meta_export
    from megatron_mtp.checkpoint.merge import build_single_process_model

    out = str(tmp_path / "meta")
    assert _tool("export_checkpoint").main(["--load", trained["run"], "--format", "meta", "--output", out]) == 0
    with open(os.path.join(out, "params.json")) as f:
        params = json.load(f)
    assert params["n_future_tokens"] == 2 and params["n_layers"] == 4 and params["n_kv_heads"] == 2
    sd = torch.load(os.path.join(out, "consolidated.pth"), weights_only=True)
    assert {"tok_embeddings.weight", "norm.weight", "output.weight", "layers.2.attention.wq.weight",
            "extra_heads.0.feed_forward.w3.weight"} <= sd.keys()
    assert not any(k.startswith("layers.3.") for k in sd)  # trunk 2 + head 1; head 2 is extra_heads.0
    hidden = int(params["ffn_dim_multiplier"] * int(2 * 4 * params["dim"] / 3))  # Meta's ModelArgs rule
    hidden = params["multiple_of"] * ((hidden + params["multiple_of"] - 1) // params["multiple_of"])
    assert hidden == sd["layers.0.feed_forward.w1.weight"].shape[0] == trained["cfg"].model.ffn_size

    ids = _ids(trained["tok"])
    ours = trained["model"].logits(ids, heads="all")
    _, cfg, weights = read_meta_export(out)
    back = build_single_process_model(cfg, weights).logits(ids, heads="all")
    for a, b in zip(back, ours):
        assert (a - b).abs().max().item() <= 1e-6
    for i, ref in enumerate(meta_reference_forward(sd, params, ids)):
        assert (ref - ours[i]).abs().max().item() <= 1e-4, i


def test_export_errors(tmp_path, capsys):
    code = _tool("export_checkpoint").main(["--load", str(tmp_path / "nothing"), "--format", "hf",
                                            "--output", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("checkpoint error: ") and "does not exist" in err


# ---------------------------------------------------------------------------------------------------------
# A Meta-style forward (llama/model.py of the MTP release, in miniature): complex rotary embeddings on
# interleaved pairs, trunk = layers[:-1], heads = [layers[-1]] + extra_heads, shared norm and output.


def _rms(x, w, eps):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w


def _block(x, sd, p, params, freqs):
    dim, nh = params["dim"], params["n_heads"]
    nkv, hd = params["n_kv_heads"], dim // params["n_heads"]
    b, s, _ = x.shape
    h = _rms(x, sd[f"{p}.attention_norm.weight"], params["norm_eps"])
    q = (h @ sd[f"{p}.attention.wq.weight"].T).view(b, s, nh, hd)
    k = (h @ sd[f"{p}.attention.wk.weight"].T).view(b, s, nkv, hd)
    v = (h @ sd[f"{p}.attention.wv.weight"].T).view(b, s, nkv, hd)

    def rope(t):
        tc = torch.view_as_complex(t.float().reshape(*t.shape[:-1], -1, 2))
        return torch.view_as_real(tc * freqs[None, :, None, :]).flatten(3)

    q, k = rope(q), rope(k)
    k = k.repeat_interleave(nh // nkv, dim=2)
    v = v.repeat_interleave(nh // nkv, dim=2)
    att = torch.nn.functional.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                                           is_causal=True)
    x = x + att.transpose(1, 2).reshape(b, s, dim) @ sd[f"{p}.attention.wo.weight"].T
    h = _rms(x, sd[f"{p}.ffn_norm.weight"], params["norm_eps"])
    ff = torch.nn.functional.silu(h @ sd[f"{p}.feed_forward.w1.weight"].T) * (h @ sd[f"{p}.feed_forward.w3.weight"].T)
    return x + ff @ sd[f"{p}.feed_forward.w2.weight"].T


def meta_reference_forward(sd, params, tokens):
    hd = params["dim"] // params["n_heads"]
    seq = tokens.size(1)
    inv = 1.0 / (params["rope_theta"] ** (torch.arange(0, hd, 2).float() / hd))
    freqs = torch.polar(torch.ones(seq, hd // 2), torch.outer(torch.arange(seq).float(), inv))
    n_main = sum(1 for k in sd if k.endswith(".attention_norm.weight") and k.startswith("layers."))
    x = sd["tok_embeddings.weight"][tokens]
    with torch.no_grad():
        for i in range(n_main - 1):
            x = _block(x, sd, f"layers.{i}", params, freqs)
        heads = [f"layers.{n_main - 1}"] + [f"extra_heads.{j}" for j in range(params["n_future_tokens"] - 1)]
        return [_rms(_block(x, sd, p, params, freqs), sd["norm.weight"], params["norm_eps"]) @ sd["output.weight"].T
                for p in heads]
