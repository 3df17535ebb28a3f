"""The MTP model's pipeline stage layers: the embedding on the first stage, trunk layers spread over the
stages, and **all n heads, the shared final norm, the unembedding and the MTP loss on the last stage**.
The DeepSpeed ``PipelineModule`` that arranges them is ``training/pipeline_module.py`` (the model does not
depend on a training backend).

Why every head sits on the last stage: the heads all read the same trunk output z, share one norm and one
unembedding, and the memory-efficient loss (paper Fig. 2, ``MemoryEfficientHeads``) runs them one after the
other against that single z. Splitting heads over stages would send z to several stages, duplicate the
unembedding (or tie it across stages) and lose the one-head-at-a-time memory bound. The cost is a heavier
last stage; ``parallel.pipeline_partition`` balances the trunk layers around it.

Layer specs, in order (activations are the pair ``(hidden, tokens)``)::

    EmbeddingPipe                      tokens [b, S+1] -> (x [b, S, h], tokens)          (first stage)
    TransformerLayerPipe x trunk       (x, tokens) -> (layer(x), tokens); RoPE tables rebuilt from the
                                       sequence length
    [TiedLayerSpec("embedding")]       only with model.tie_embeddings: the unembedding's copy of the
                                       embedding weight on the last stage (DeepSpeed keeps the copies equal
                                       and all-reduces their gradients); passes the pair through
    MTPOutputPipe                      (z, tokens) -> the weighted MTP loss: every head, the shared norm,
                                       the unembedding and the memory-efficient loss        (last stage)

The whole sample travels with the hidden state (an int64 tensor [b, S+1], a few bytes per token next to
h x 2 or 4 bytes of activation; it needs no gradient) so that the **last stage's module computes the loss
in its own forward** and the pipe's ``loss_fn`` just returns it. This placement matters: DeepSpeed hooks the
stage module's output to start its backward bookkeeping (e.g. the bf16 optimizer clears low-precision
gradients there); were the heads run in ``loss_fn``, after the module, their gradients would reach the
parameters before that hook and be wiped. So ``MemoryEfficientHeads`` runs inside the module's forward,
inside the 1F1B schedule, and looks to DeepSpeed like any autograd node. Per-head losses travel as DeepSpeed
"additional losses": averaged over micro-batches and data-parallel ranks, then broadcast to every stage.

Partitioning keeps the embedding on the first stage and the output group (tied copy + heads) together on
the last; the pieces in between are balanced by ``parallel.pipeline_partition``: ``parameters`` (by
parameter count, DeepSpeed's default), ``uniform`` (by count of pieces) or ``type:<regex>`` (only pieces
whose class name matches count, e.g. ``type:TransformerLayer`` balances trunk layers alone).
Initialisation is the single-process one: ``initialize_parameters`` is called on each stage's module, and
every parameter's init key (``trunk.3.attn.qkv``, ``heads.0.mlp.down``, ``embedding``...) does not depend on
the stage it landed on.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn

from megatron_mtp.model.mtp_model import MTPEmbedding, MTPOutput
from megatron_mtp.model.transformer import TransformerLayer, rope_cos_sin
from megatron_mtp.parallel import state

TIED_EMBEDDING_KEY = "embedding"


class EmbeddingPipe(MTPEmbedding):
    """First stage: the sample [b, S+1] -> (embeddings of its first S tokens [b, S, h], the sample). Under
    sequence parallelism the embeddings are this rank's sequence shard."""

    def forward(self, tokens: torch.Tensor) -> tuple:
        return self.embed(tokens[:, :-1]), tokens


class RopeTables:
    """RoPE cos/sin tables for a stage, rebuilt only when the sequence length, device or dtype changes, so
    that nothing but the (activations, tokens) pair has to cross stage boundaries."""

    def __init__(self, head_dim: int, theta: float):
        self.head_dim, self.theta = head_dim, theta
        self._cache: Optional[tuple] = None

    def __call__(self, seq: int, device, dtype) -> tuple:
        key = (seq, device, dtype)
        if self._cache is None or self._cache[0] != key:
            cos, sin = rope_cos_sin(torch.arange(seq, device=device), self.head_dim, self.theta, dtype)
            self._cache = (key, cos, sin)
        return self._cache[1], self._cache[2]


class TransformerLayerPipe(TransformerLayer):
    """A trunk layer on (x, tokens); its RoPE tables come from ``RopeTables``."""

    def __init__(self, cfg, index: int, sequence_parallel: bool = False, dtype=None):
        super().__init__(cfg, f"trunk.{index}", sequence_parallel, dtype=dtype)
        self.index = index
        self._sp = sequence_parallel and state.tp_size() > 1
        self.rope = RopeTables(cfg.head_dim, cfg.rope_theta)

    def hidden_forward(self, x: torch.Tensor) -> torch.Tensor:
        seq = x.size(1) * (state.tp_size() if self._sp else 1)
        cos, sin = self.rope(seq, x.device, self.attn_norm.weight.dtype)
        return TransformerLayer.forward(self, x, cos, sin)

    def forward(self, inputs: tuple) -> tuple:  # the pipeline signature
        x, tokens = inputs
        return self.hidden_forward(x), tokens


class MTPOutputPipe(nn.Module):
    """Last stage: all heads, the shared final norm and the unembedding (``MTPOutput``) and the MTP loss,
    (z, tokens) -> the weighted loss. Per-head losses are kept: the latest micro-batch's in training
    (``head_losses``), every micro-batch's in evaluation (``eval_head_losses``)."""

    def __init__(self, cfg, mtp, sequence_parallel: bool = False, dtype=None):
        super().__init__()
        self.output = MTPOutput(cfg, mtp, sequence_parallel, dtype=dtype)
        self.rope = RopeTables(cfg.head_dim, cfg.rope_theta)
        self.tied_weight_fn = None  # set by MTPPipelineModule with tied embeddings: the unembedding weight
        self.head_losses: Optional[torch.Tensor] = None
        self.eval_head_losses: list = []

    def forward(self, inputs: tuple) -> torch.Tensor:
        z, tokens = inputs
        seq = tokens.size(1) - 1
        cos, sin = self.rope(seq, z.device, self.output.final_norm.weight.dtype)
        tied = self.tied_weight_fn() if self.tied_weight_fn is not None else None
        total, per_head = self.output.loss(z, tokens, cos, sin, tied)
        per_head = per_head.detach().float()
        if self.training:
            self.head_losses = per_head
        else:
            self.eval_head_losses.append(per_head)
        return total
