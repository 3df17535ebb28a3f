"""All n heads of a megatron_mtp HF export in transformers: ``modeling_mtp_llama.py`` of the export directory.

The export copies this file verbatim, so it imports only torch, safetensors and transformers, never megatron_mtp.
``AutoModelForCausalLM.from_pretrained(export, trust_remote_code=True)`` returns ``MTPLlamaForCausalLM``: the
plain ``LlamaForCausalLM`` (trunk + head 1: generation, loss and lm-evaluation-harness behave exactly as the
plain Llama load) plus heads 2..n, read from ``mtp_heads.safetensors``. A forward over a whole sequence (no
``past_key_values`` given) also returns ``heads_logits``: one ``[batch, seq, vocab]`` tensor per head, head 1
first; head i at position t predicts token t+i. Without ``trust_remote_code`` the same directory loads as a
plain ``LlamaForCausalLM``, heads 2..n ignored.
"""
from dataclasses import dataclass
from typing import Optional

from torch import nn
from transformers import LlamaForCausalLM
from transformers.modeling_outputs import CausalLMOutputWithPast
from transformers.models.llama.modeling_llama import LlamaDecoderLayer


@dataclass
class MTPCausalLMOutput(CausalLMOutputWithPast):
    heads_logits: Optional[tuple] = None


class MTPLlamaForCausalLM(LlamaForCausalLM):
    # Heads 2..n are not in the Llama weight files; from_pretrained reads them from their own file.
    _keys_to_ignore_on_load_missing = [r"^mtp_heads\."]

    def __init__(self, config):
        super().__init__(config)
        self.mtp_trunk_layers = int(config.mtp_trunk_layers)
        # Head j+2 is one Llama layer applied to the trunk's output, then the shared norm and unembedding.
        self.mtp_heads = nn.ModuleList(
            LlamaDecoderLayer(config, layer_idx=config.num_hidden_layers + j) for j in range(config.mtp_n_heads - 1))

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, **kwargs):
        from safetensors.torch import load_file
        from transformers.utils import cached_file

        model = super().from_pretrained(pretrained_model_name_or_path, *args, **kwargs)
        if len(model.mtp_heads):
            name = getattr(model.config, "mtp_heads_file", None) or "mtp_heads.safetensors"
            path = cached_file(pretrained_model_name_or_path, name)
            prefix = "mtp_heads."
            state = {k[len(prefix):]: v for k, v in load_file(path).items() if k.startswith(prefix)}
            reference = model.lm_head.weight
            model.mtp_heads.load_state_dict(state, strict=True, assign=True)
            model.mtp_heads.to(device=reference.device, dtype=reference.dtype)
        return model

    def forward(self, *args, **kwargs):
        # The extra heads need the trunk's full-sequence output and the inputs the layer after it receives (mask,
        # rotary embeddings): a pre-hook on head 1's layer captures both, so they match the model's own exactly.
        # With a KV cache given (generation) only head 1 runs, as in the plain model.
        given_cache = any(kwargs.get(name) is not None for name in _CACHE_ARGUMENTS)
        want_heads = not given_cache and len(self.mtp_heads) > 0 and not kwargs.get("logits_to_keep")
        captured = {}

        def capture(module, layer_args, layer_kwargs):
            captured["hidden"] = layer_args[0] if layer_args else layer_kwargs["hidden_states"]
            captured["kwargs"] = {k: v for k, v in layer_kwargs.items()
                                  if k != "hidden_states" and k not in _CACHE_ARGUMENTS and not _is_cache(v)}

        handle = (self.model.layers[self.mtp_trunk_layers].register_forward_pre_hook(capture, with_kwargs=True)
                  if want_heads else None)
        try:
            out = super().forward(*args, **kwargs)
        finally:
            if handle is not None:
                handle.remove()
        heads = None
        if want_heads and "hidden" in captured:
            heads = [out.logits]
            for layer in self.mtp_heads:
                h = layer(captured["hidden"], **captured["kwargs"])
                h = h[0] if isinstance(h, tuple) else h
                heads.append(self.lm_head(self.model.norm(h)))
            heads = tuple(heads)
        return MTPCausalLMOutput(**{**out, "heads_logits": heads})


# Names transformers has used for the KV cache argument, and use_cache: extra heads never touch the cache.
_CACHE_ARGUMENTS = ("past_key_values", "past_key_value", "cache", "use_cache")


def _is_cache(value) -> bool:
    try:
        from transformers.cache_utils import Cache
    except ImportError:
        return False
    return isinstance(value, Cache)
