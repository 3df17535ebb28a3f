"""The multi-token-prediction model: a shared Llama trunk, n heads, one shared final norm and unembedding.

Compute-matched (paper section 3): ``model.num_layers`` counts every transformer layer, so with n
transformer heads the trunk has ``num_layers - n`` layers. n=1 is exactly a Llama of ``num_layers``
layers whose last layer is "head 1". Linear heads (a d x d map each) leave all layers in the trunk.

The pieces are separate modules so the pipeline engine can place them on stages:
``MTPEmbedding`` (first stage) -> ``TransformerLayer`` x trunk -> ``MTPOutput`` (all heads, the shared norm,
the unembedding and the loss, on the last stage).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from megatron_mtp.config import ModelConfig, MTPConfig
from megatron_mtp.model.mtp_loss import IGNORE, head_targets, mtp_loss
from megatron_mtp.model.transformer import LinearHead, TransformerLayer, rope_cos_sin
from megatron_mtp.parallel import mappings, state
from megatron_mtp.parallel.layers import RMSNorm, VocabParallelEmbedding, _mark
from megatron_mtp.parallel.random import checkpoint  # replays the TP dropout stream on recompute
from megatron_mtp.validation import trunk_layer_count  # noqa: F401  (also imported from here)


class MTPEmbedding(nn.Module):
    """Token embedding, vocab-parallel; under sequence parallelism it returns this rank's sequence shard."""

    def __init__(self, cfg: ModelConfig, sequence_parallel: bool = False, dtype=None):
        super().__init__()
        self.embed = VocabParallelEmbedding(cfg.padded_vocab_size(state.tp_size()), cfg.hidden_size,
                                            init_key="embedding", init_std=cfg.init_std,
                                            sequence_parallel=sequence_parallel, vocab_size=cfg.vocab_size,
                                            dtype=dtype)

    @property
    def weight(self) -> nn.Parameter:
        return self.embed.weight

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.embed(tokens)


class MTPOutput(nn.Module):
    """All n heads, the shared final norm, the (vocab-parallel) unembedding and the MTP loss.

    With ``tie_embeddings`` the unembedding is the input embedding's weight, passed to the calls.
    """

    def __init__(self, cfg: ModelConfig, mtp: MTPConfig, sequence_parallel: bool = False, dtype=None):
        super().__init__()
        self.cfg, self.mtp = cfg, mtp
        self.sequence_parallel = sequence_parallel and state.tp_size() > 1
        head_cls = TransformerLayer if mtp.head_type == "transformer" else LinearHead
        self.heads = nn.ModuleList(
            head_cls(cfg, f"heads.{i}", sequence_parallel=sequence_parallel, dtype=dtype) for i in range(mtp.n_heads)
        )
        self.final_norm = RMSNorm(cfg.hidden_size, cfg.norm_eps, init_key="final_norm",
                                  sequence_parallel=sequence_parallel, dtype=dtype)
        self.output_weight = None
        if not cfg.tie_embeddings:
            tp = state.tp_size()
            self.output_weight = nn.Parameter(torch.empty(cfg.padded_vocab_size(tp) // tp, cfg.hidden_size, dtype=dtype))
            _mark(self.output_weight, init_key="output", std=cfg.init_std, partition_dim=0, tensor_parallel=tp > 1,
                  logical_size=cfg.vocab_size)
        self.loss_weights = list(mtp.loss_weights) if mtp.loss_weights is not None else [1.0] * mtp.n_heads

    def _unembedding(self, tied_weight: Optional[torch.Tensor]) -> torch.Tensor:
        weight = self.output_weight if self.output_weight is not None else tied_weight
        if weight is None:
            raise ValueError("MTPOutput with tied embeddings needs the embedding weight passed in.")
        return weight

    def head_hidden(self, i: int, z: torch.Tensor, cos, sin, kv_cache=None, attn_mask=None) -> torch.Tensor:
        """Head i (0-based) applied to the trunk output, through the shared final norm."""
        return self.final_norm(self.heads[i](z, cos, sin, kv_cache, attn_mask))

    def logits(self, hidden: torch.Tensor, tied_weight: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Full-vocabulary logits [.., vocab_size] (gathered over TP, padding removed). Inference only."""
        if self.sequence_parallel:
            hidden = mappings.gather_from_sequence_region(hidden)
        local = F.linear(mappings.copy_to_tp_region(hidden), self._unembedding(tied_weight))
        return mappings.gather_from_tp_region(local)[..., : self.cfg.vocab_size]

    def head_loss(self, i: int, z: torch.Tensor, targets: torch.Tensor, cos, sin,
                  tied_weight: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Mean cross-entropy of head i over its valid targets; logits are never materialised."""
        from megatron_mtp.ops.linear_cross_entropy import linear_cross_entropy, loss_memory_chunking

        h = self.head_hidden(i, z, cos, sin)
        if self.sequence_parallel:
            # The loss kernel gathers sequence shards rank by rank: order the targets the same way.
            b, s = targets.shape
            tp = state.tp_size()
            targets = targets.view(b, tp, s // tp).transpose(0, 1)
        flat_targets = targets.reshape(-1)
        weight = self._unembedding(tied_weight)
        if torch.is_autocast_enabled(h.device.type):
            # The fused kernel's GEMMs are not autocast ops: hand them the autocast dtype (bf16), or they
            # would run in fp32 on fp32 master parameters.
            dtype = torch.get_autocast_dtype(h.device.type)
            h, weight = h.to(dtype), weight.to(dtype)
        h = h.reshape(-1, h.size(-1))
        rows = h.size(0) * (state.tp_size() if self.sequence_parallel else 1)  # the kernel's (gathered) T
        chunk, fp32_weight_grad = loss_memory_chunking(self.mtp.loss_memory, rows, weight.size(0), weight.size(1),
                                                       weight.element_size(), weight.device)
        total = linear_cross_entropy(
            h, weight, flat_targets,
            tp_group=state.tp_group(), ignore_index=IGNORE, reduction="sum",
            sequence_parallel=self.sequence_parallel, vocab_size=self.cfg.vocab_size,
            chunk_size=chunk, fp32_weight_grad=fp32_weight_grad,
        )
        count = (flat_targets != IGNORE).sum()
        return total / count.clamp(min=1).to(total.dtype)

    def loss(self, z: torch.Tensor, tokens: torch.Tensor, cos, sin,
             tied_weight: Optional[torch.Tensor] = None) -> tuple:
        """(weighted total loss, per-head mean losses [n]) for samples ``tokens`` [b, S+1]."""
        targets = head_targets(tokens, self.mtp.n_heads)
        params = list(self.parameters())
        if tied_weight is not None and self.output_weight is None:
            params.append(tied_weight)

        def head_loss_fn(i, z_):
            return self.head_loss(i, z_, targets[i], cos, sin, tied_weight)

        return mtp_loss(z, head_loss_fn, self.mtp.n_heads, self.loss_weights, params,
                        memory_efficient=self.mtp.memory_efficient)


class MTPModel(nn.Module):
    """Embedding -> trunk -> MTPOutput, for one process or one tensor-parallel group (no pipeline)."""

    def __init__(self, cfg: ModelConfig, mtp: MTPConfig, sequence_parallel: bool = False,
                 activation_checkpointing: str = "none", dtype=None):
        super().__init__()
        self.cfg, self.mtp = cfg, mtp
        self.sequence_parallel = sequence_parallel and state.tp_size() > 1
        self.embedding = MTPEmbedding(cfg, sequence_parallel, dtype=dtype)
        self.trunk = nn.ModuleList(
            TransformerLayer(cfg, f"trunk.{i}", sequence_parallel, dtype=dtype)
            for i in range(trunk_layer_count(cfg, mtp))
        )
        self.output = MTPOutput(cfg, mtp, sequence_parallel, dtype=dtype)
        self.checkpoint_every = checkpoint_interval(activation_checkpointing)

    @property
    def tied_weight(self) -> Optional[torch.Tensor]:
        return self.embedding.weight if self.cfg.tie_embeddings else None

    def rope(self, positions: torch.Tensor, dtype) -> tuple:
        return rope_cos_sin(positions, self.cfg.head_dim, self.cfg.rope_theta, dtype)

    def trunk_forward(self, tokens: torch.Tensor, cos, sin, kv_cache=None, attn_mask=None) -> torch.Tensor:
        x = self.embedding(tokens)
        for i, layer in enumerate(self.trunk):
            if self.checkpoint_every and i % self.checkpoint_every == 0 and torch.is_grad_enabled():
                x = checkpoint(layer, x, cos, sin, kv_cache, attn_mask)
            else:
                x = layer(x, cos, sin, kv_cache, attn_mask)
        return x

    def forward(self, tokens: torch.Tensor) -> tuple:
        """Training: ``tokens`` [b, S+1] -> (weighted total loss, per-head losses)."""
        inputs = tokens[:, :-1]
        seq = inputs.size(1)
        if self.sequence_parallel and seq % state.tp_size():
            raise ValueError(f"sequence length {seq} must be divisible by parallel.tp under sequence parallelism.")
        cos, sin = self.rope(torch.arange(seq, device=tokens.device), self.embedding.weight.dtype)
        z = self.trunk_forward(inputs, cos, sin)
        return self.output.loss(z, tokens, cos, sin, self.tied_weight)

    @torch.no_grad()
    def logits(self, tokens: torch.Tensor, heads: str = "first", positions=None, kv_cache=None,
               attn_mask=None) -> list:
        """Inference: logits of head 1 (``heads="first"``) or of every head (``"all"``), each [b, s, vocab]."""
        if positions is None:
            positions = torch.arange(tokens.size(1), device=tokens.device)
        cos, sin = self.rope(positions, self.embedding.weight.dtype)
        z = self.trunk_forward(tokens, cos, sin, kv_cache, attn_mask)
        wanted = 1 if heads == "first" else self.mtp.n_heads
        return [self.output.logits(self.output.head_hidden(i, z, cos, sin, kv_cache, attn_mask), self.tied_weight)
                for i in range(wanted)]

    # ---- inference helpers (megatron_mtp/inference): a trunk-only forward, and one head's logits at chosen
    # positions, so self-speculative decoding unembeds only the rows it needs.

    @torch.no_grad()
    def trunk_hidden(self, tokens: torch.Tensor, positions: Optional[torch.Tensor] = None, kv_cache=None,
                     attn_mask=None) -> tuple:
        """Inference: (z [b, s, hidden], cos, sin) — the trunk output and the RoPE tables of ``positions``."""
        if positions is None:
            positions = torch.arange(tokens.size(1), device=tokens.device)
        cos, sin = self.rope(positions, self.embedding.weight.dtype)
        return self.trunk_forward(tokens, cos, sin, kv_cache, attn_mask), cos, sin

    @torch.no_grad()
    def head_states(self, i: int, z: torch.Tensor, cos, sin, kv_cache=None, attn_mask=None,
                    index: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Inference: head ``i`` (0-based) run over every position of ``z`` (so its KV cache sees them all),
        then the shared final norm on the selected rows only: ``index`` None -> all [b, s, hidden]; ``index``
        [b] -> [b, hidden] (one position per sequence); ``index`` [b, m] -> [b, m, hidden]."""
        return self.select_states(self.output.heads[i](z, cos, sin, kv_cache, attn_mask), index)

    @torch.no_grad()
    def select_states(self, h: torch.Tensor, index: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Inference: the rows ``index`` picks (see head_states) of head outputs ``h`` [b, s, hidden] — or
        of several heads' stacked outputs [b, m, s, hidden], one position per sequence -> [b, m, hidden] —
        through the shared final norm."""
        if index is not None:
            if h.dim() == 4:
                h = h.gather(2, index[:, None, None, None].expand(-1, h.size(1), 1, h.size(-1)))[:, :, 0]
            else:
                idx = index if index.dim() == 2 else index[:, None]
                h = h.gather(1, idx[..., None].expand(-1, -1, h.size(-1)))
                if index.dim() == 1:
                    h = h[:, 0]
        return self.output.final_norm(h)

    @torch.no_grad()
    def unembed(self, h: torch.Tensor) -> torch.Tensor:
        """Inference: full-vocabulary logits [..., vocab_size] of final-normed hidden states [..., hidden]."""
        return self.output.logits(h, self.tied_weight)

    @torch.no_grad()
    def head_logits(self, i: int, z: torch.Tensor, cos, sin, kv_cache=None, attn_mask=None,
                    index: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Inference: ``unembed(head_states(...))`` — head ``i``'s logits at the selected rows (see head_states)."""
        return self.unembed(self.head_states(i, z, cos, sin, kv_cache, attn_mask, index))


def checkpoint_interval(setting: str) -> int:
    """'none' -> 0, 'full' -> every layer (1), 'every_k' -> every k-th layer."""
    if setting == "none":
        return 0
    if setting == "full":
        return 1
    return int(setting.split("_", 1)[1])


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
