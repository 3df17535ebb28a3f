"""The MTP model on one process: memory-efficient heads == plain autograd, compute matching, memory."""
import weakref

import pytest
import torch

from megatron_mtp.config import load_config
from megatron_mtp.model.mtp_loss import IGNORE, head_targets
from megatron_mtp.model.mtp_model import MTPModel, count_parameters
from megatron_mtp.parallel.layers import initialize_parameters


def tiny_cfg(n_heads=4, head_type="transformer", **model):
    cfg = load_config("configs/tiny.yaml", [f"--mtp.n_heads={n_heads}", f"--mtp.head_type={head_type}"])
    cfg.model.hidden_size, cfg.model.num_attention_heads, cfg.model.num_kv_heads = 32, 4, 2
    cfg.model.ffn_hidden_size, cfg.model.vocab_size, cfg.model.make_vocab_size_divisible_by = 64, 50, 16
    for key, value in model.items():
        setattr(cfg.model, key, value)
    return cfg


def build(cfg, dtype=torch.float64, seed=7):
    model = MTPModel(cfg.model, cfg.mtp, dtype=dtype)
    initialize_parameters(model, seed)
    return model


def grads_after(model, batches):
    model.zero_grad(set_to_none=True)
    losses = []
    for tokens in batches:
        loss, per_head = model(tokens)
        (loss / len(batches)).backward()
        losses.append(per_head)
    return torch.stack(losses), {n: p.grad.clone() for n, p in model.named_parameters()}


def test_head_targets_shift_and_mask():
    tokens = torch.arange(6).view(1, 6)  # inputs 0..4, S = 5
    t = head_targets(tokens, 3)
    assert t[0].tolist() == [[1, 2, 3, 4, 5]]
    assert t[1].tolist() == [[2, 3, 4, 5, IGNORE]]
    assert t[2].tolist() == [[3, 4, 5, IGNORE, IGNORE]]


@pytest.mark.parametrize("head_type", ["transformer", "linear"])
@pytest.mark.parametrize("n_heads", [1, 2, 4])
def test_memory_efficient_gradients_equal_plain_autograd(n_heads, head_type):
    """float64, rtol 1e-6, gradient accumulation over 2 micro-batches, one target ignored."""
    cfg = tiny_cfg(n_heads, head_type)
    cfg.mtp.loss_weights = [1.0 / (i + 1) for i in range(n_heads)]  # non-trivial weights
    gen = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, cfg.model.vocab_size, (2, 13), generator=gen) for _ in range(2)]
    cfg.mtp.memory_efficient = True
    losses_me, grads_me = grads_after(build(cfg), batches)
    cfg.mtp.memory_efficient = False
    losses_ref, grads_ref = grads_after(build(cfg), batches)
    torch.testing.assert_close(losses_me, losses_ref, rtol=1e-6, atol=0)
    assert grads_me.keys() == grads_ref.keys()
    for name in grads_ref:
        torch.testing.assert_close(grads_me[name], grads_ref[name], rtol=1e-6, atol=1e-12, msg=name)


def test_lean_loss_memory_gives_the_same_losses_and_gradients():
    """mtp.loss_memory=lean (Liger-sized chunks: 2 of them here, d(unembedding) accumulated in the weight dtype)
    equals the default single-chunk loss, float64, rtol 1e-10; and the planner charges it less memory."""
    from megatron_mtp.ops import lean_chunk_size
    from megatron_mtp.training.memory_model import ce_buffer_bytes

    cfg = tiny_cfg(3)
    gen = torch.Generator().manual_seed(1)
    batches = [torch.randint(0, cfg.model.vocab_size, (2, 13), generator=gen)]
    losses_fast, grads_fast = grads_after(build(cfg), batches)
    cfg.mtp.loss_memory = "lean"
    assert lean_chunk_size(2 * 12, 64, 32) == 16  # 24 tokens, V_local = 64, d = 32: two chunks
    losses_lean, grads_lean = grads_after(build(cfg), batches)
    torch.testing.assert_close(losses_lean, losses_fast, rtol=1e-10, atol=0)
    for name in grads_fast:
        torch.testing.assert_close(grads_lean[name], grads_fast[name], rtol=1e-10, atol=1e-14, msg=name)
    big = load_config("configs/7b.yaml").model
    assert ce_buffer_bytes(big, 16384, 1, 2, "lean") < ce_buffer_bytes(big, 16384, 1, 2, "fast") / 2


def test_per_head_losses_are_normalised_by_their_own_counts():
    cfg = tiny_cfg(3)
    model = build(cfg)
    tokens = torch.randint(0, cfg.model.vocab_size, (2, 9))
    _, per_head = model(tokens)
    logits = model.logits(tokens[:, :-1], heads="all")
    for i, (lg, tgt) in enumerate(zip(logits, head_targets(tokens, 3))):
        expected = torch.nn.functional.cross_entropy(lg.reshape(-1, lg.size(-1)), tgt.reshape(-1), ignore_index=IGNORE)
        torch.testing.assert_close(per_head[i].double(), expected.double(), rtol=1e-5, atol=0)


def test_compute_matched_parameter_counts_and_plain_llama():
    """n=1 with L layers is exactly an L-layer Llama (HF LlamaForCausalLM); n=4 has the same count."""
    transformers = pytest.importorskip("transformers")
    cfg = tiny_cfg(1, make_vocab_size_divisible_by=1)
    counts = {n: count_parameters(MTPModel(cfg.model, tiny_cfg(n, make_vocab_size_divisible_by=1).mtp)) for n in (1, 2, 4)}
    assert counts[1] == counts[2] == counts[4]
    m = cfg.model
    hf_cfg = transformers.LlamaConfig(vocab_size=m.vocab_size, hidden_size=m.hidden_size,
                                      intermediate_size=m.ffn_size, num_hidden_layers=m.num_layers,
                                      num_attention_heads=m.num_attention_heads, num_key_value_heads=m.kv_heads,
                                      rms_norm_eps=m.norm_eps, rope_theta=m.rope_theta, tie_word_embeddings=False,
                                      max_position_embeddings=m.max_seq_length, attention_bias=False, mlp_bias=False)
    hf = transformers.LlamaForCausalLM(hf_cfg).double().eval()
    assert count_parameters(hf) == counts[1]

    ours = build(cfg)
    hf.load_state_dict(hf_state_dict(ours, cfg.model))
    tokens = torch.randint(0, m.vocab_size, (2, 11))
    ours_logits = ours.logits(tokens)[0]
    with torch.no_grad():
        hf_logits = hf(tokens).logits
    torch.testing.assert_close(ours_logits, hf_logits, rtol=1e-9, atol=1e-9)


def hf_state_dict(model, m):
    """Our single-process n=1 weights under HF Llama names (a test-local mapping kept independent of the
    exporter, so the two check each other)."""
    sd = {"model.embed_tokens.weight": model.embedding.weight, "model.norm.weight": model.output.final_norm.weight,
          "lm_head.weight": model.output.output_weight}
    layers = list(model.trunk) + list(model.output.heads)
    group, hd = m.num_attention_heads // m.kv_heads, m.head_dim
    for i, layer in enumerate(layers):
        p = f"model.layers.{i}."
        qkv = layer.attn.qkv.weight.view(m.kv_heads, group + 2, hd, m.hidden_size)
        sd[p + "self_attn.q_proj.weight"] = qkv[:, :group].reshape(-1, m.hidden_size)
        sd[p + "self_attn.k_proj.weight"] = qkv[:, group].reshape(-1, m.hidden_size)
        sd[p + "self_attn.v_proj.weight"] = qkv[:, group + 1].reshape(-1, m.hidden_size)
        sd[p + "self_attn.o_proj.weight"] = layer.attn.out.weight
        gate, up = layer.mlp.gate_up.weight.chunk(2, dim=0)
        sd[p + "mlp.gate_proj.weight"], sd[p + "mlp.up_proj.weight"] = gate, up
        sd[p + "mlp.down_proj.weight"] = layer.mlp.down.weight
        sd[p + "input_layernorm.weight"] = layer.attn_norm.weight
        sd[p + "post_attention_layernorm.weight"] = layer.mlp_norm.weight
    return {k: v.detach().clone() for k, v in sd.items()}


class SavedTensorMeter:
    """Tracks the bytes of tensors saved for backward that are alive at once (peak), and the largest one."""

    def __init__(self):
        self.live = self.peak = self.largest_numel = 0

    class _Box:
        def __init__(self, t):
            self.t = t

    def pack(self, t):
        box = self._Box(t)
        nbytes = t.numel() * t.element_size()
        self.live += nbytes
        self.peak = max(self.peak, self.live)
        self.largest_numel = max(self.largest_numel, t.numel())
        weakref.finalize(box, self._free, nbytes)
        return box

    def _free(self, nbytes):
        self.live -= nbytes

    @staticmethod
    def unpack(box):
        return box.t

    def hooks(self):
        return torch.autograd.graph.saved_tensors_hooks(self.pack, self.unpack)


def peak_saved(cfg, tokens):
    model = build(cfg, dtype=torch.float32)
    meter = SavedTensorMeter()
    with meter.hooks():
        loss, _ = model(tokens)
        loss.backward()
    return meter


def test_memory_efficient_heads_hold_one_head_at_a_time():
    """Peak saved activations with 4 memory-efficient heads stay at trunk + one head; plain autograd keeps
    all four heads' activations; and no saved tensor is as large as one head's [tokens, vocab] logits."""
    cfg = tiny_cfg(4, num_layers=6, vocab_size=2000, make_vocab_size_divisible_by=1)
    tokens = torch.randint(0, cfg.model.vocab_size, (2, 64))
    n_tokens = tokens.numel() - tokens.size(0)
    cfg.mtp.memory_efficient = True
    efficient = peak_saved(cfg, tokens)
    cfg.mtp.memory_efficient = False
    plain = peak_saved(cfg, tokens)

    one_head_cfg = tiny_cfg(1, num_layers=3, vocab_size=2000, make_vocab_size_divisible_by=1)
    one_head = peak_saved(one_head_cfg, tokens)  # 2 trunk layers + 1 head: the efficient path's budget
    assert efficient.peak <= one_head.peak * 1.05, (efficient.peak, one_head.peak)
    assert plain.peak > 1.8 * efficient.peak, (plain.peak, efficient.peak)
    assert efficient.largest_numel < n_tokens * cfg.model.vocab_size
