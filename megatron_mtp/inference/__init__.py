"""Inference: KV-cache generation, self-speculative decoding with the MTP heads, decoding statistics.

    from megatron_mtp.inference import generate, SamplingParams, load_model
    cfg, model, tok = load_model("runs/tiny")
    out = generate(model, [tok.encode("def ")], 64, SamplingParams(greedy=True), heads=4, eod=tok.eod)
    print(tok.decode(out.tokens[0]), out.stats.summary())

See docs/inference.md.
"""
from megatron_mtp.inference.generation import DecodeStats, GenerationOutput, generate, verify_greedy, verify_sampled
from megatron_mtp.inference.kv_cache import KVCache
from megatron_mtp.inference.loading import ModelLoadError, default_dtype, load_model
from megatron_mtp.inference.sampling import SamplingParams, next_tokens, probabilities, sample
from megatron_mtp.inference.tree import DraftTree, continuation_accuracy, head_accuracy

__all__ = ["DecodeStats", "DraftTree", "GenerationOutput", "KVCache", "ModelLoadError", "SamplingParams",
           "continuation_accuracy", "default_dtype", "generate", "head_accuracy", "load_model", "next_tokens",
           "probabilities", "sample", "verify_greedy", "verify_sampled"]
