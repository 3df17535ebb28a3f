"""``train.compile``: ``torch.compile`` each ``TransformerLayer`` in place; none of it changes the maths.

Inductor fuses the memory-bound pieces of a Llama block (RMSNorm in fp32, RoPE, SwiGLU's silu*up, residual
adds, the casts) into a few Triton kernels, and its partitioner recomputes cheap pointwise results in
backward instead of saving them. Module names, ``state_dict`` keys and parameter identity are unchanged
(``nn.Module.compile``), so checkpoints, TP marks and the pipeline specs do not see it.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch._dynamo

from megatron_mtp.model.transformer import TransformerLayer




def apply_compile(model: torch.nn.Module, mode: Optional[str] = None, dynamic: Optional[bool] = False) -> int:
    """Compile every ``TransformerLayer`` of ``model`` in place; returns how many were compiled.

    One compiled graph serves all layers of one shape (dynamo treats the parameters as inputs), so the compile
    cost is paid once per distinct layer shape and dtype, not per layer. Tensor-parallel collectives inside a
    layer are graph breaks (the mappings in ``parallel/mappings.py`` are ``torch.compiler.disable``d: traced,
    they lost gradients over NCCL); the pieces between them are still fused.
    """
    # Trunk layers and heads share code objects: a generous cache keeps every variant (train / eval, grad on /
    # off, the heads' call inside the memory-efficient loss) compiled instead of falling back to eager.
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
    if hasattr(torch._dynamo.config, "accumulated_cache_size_limit"):
        torch._dynamo.config.accumulated_cache_size_limit = max(
            torch._dynamo.config.accumulated_cache_size_limit, 512)
    count = 0
    for module in model.modules():
        if isinstance(module, TransformerLayer) and not getattr(module, "_mtp_compiled", False):
            module.compile(mode=mode, dynamic=dynamic)
            module._mtp_compiled = True
            count += 1
    return count
