"""The MTP model as a DeepSpeed ``PipelineModule``: the embedding on the first stage, trunk layers spread over
the stages, and **all n heads, the shared final norm, the unembedding and the MTP loss on the last stage**.

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

import os
import re
from collections import OrderedDict
from contextlib import nullcontext
from typing import Optional

import torch
import torch.nn as nn

from deepspeed.pipe import LayerSpec, PipelineModule, TiedLayerSpec
from deepspeed.runtime import utils as ds_utils

from megatron_mtp.config import Config, ConfigError
from megatron_mtp.model.mtp_model import MTPEmbedding, MTPOutput, checkpoint_interval, trunk_layer_count
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


def _pass_through(module: nn.Module, inputs: tuple) -> tuple:
    """forward_fn of the tied embedding's copy on the last stage: it only holds the unembedding weight."""
    return inputs


def layer_specs(cfg: Config, dtype=None) -> list:
    m, mtp, sp = cfg.model, cfg.mtp, cfg.parallel.sequence_parallel
    specs = []
    if m.tie_embeddings:
        specs.append(TiedLayerSpec(TIED_EMBEDDING_KEY, EmbeddingPipe, m, sp, dtype=dtype,
                                   tied_weight_attr=["embed.weight"]))
    else:
        specs.append(LayerSpec(EmbeddingPipe, m, sp, dtype=dtype))
    specs += [LayerSpec(TransformerLayerPipe, m, i, sp, dtype=dtype) for i in range(trunk_layer_count(m, mtp))]
    if m.tie_embeddings:
        specs.append(TiedLayerSpec(TIED_EMBEDDING_KEY, EmbeddingPipe, m, sp, dtype=dtype,
                                   forward_fn=_pass_through, tied_weight_attr=["embed.weight"]))
    specs.append(LayerSpec(MTPOutputPipe, m, mtp, sp, dtype=dtype))
    return specs


def pipeline_pieces(cfg: Config) -> int:
    """Units the partitioner distributes: the embedding, each trunk layer, the output group."""
    return trunk_layer_count(cfg.model, cfg.mtp) + 2


def check_pipeline_layout(cfg: Config) -> None:
    """Errors a user can cause, before any process builds a stage."""
    pp, pieces = cfg.parallel.pp, pipeline_pieces(cfg)
    if pp > pieces:
        raise ConfigError(
            f"parallel.pp ({pp}) exceeds the {pieces} pipeline pieces of this model (the embedding, "
            f"{pieces - 2} trunk layers and the output with all heads); use fewer stages or more model.num_layers.")
    method = cfg.parallel.pipeline_partition
    if not (method in ("parameters", "uniform") or method.startswith("type:")):
        raise ConfigError(f"parallel.pipeline_partition must be parameters, uniform or type:<layer class regex>, "
                          f"got {method!r}.")


class MTPPipelineModule(PipelineModule):
    """This rank's stage of the MTP pipeline; see the module docstring. Parameters are left as built:
    call ``initialize_parameters(module, seed)`` on it, as for the single-process model."""

    def __init__(self, cfg: Config, topology, dtype=None, autocast=None):
        from megatron_mtp.parallel.random import checkpoint

        check_pipeline_layout(cfg)
        super().__init__(
            layers=layer_specs(cfg, dtype),
            topology=topology,
            loss_fn=None,
            partition_method=cfg.parallel.pipeline_partition,
            activation_checkpoint_interval=checkpoint_interval(cfg.train.activation_checkpointing),
            # non-reentrant torch checkpoint that also replays the TP dropout stream (parallel/random.py)
            activation_checkpoint_func=checkpoint,
            checkpointable_layers=[TransformerLayerPipe.__name__],
        )
        self.mtp_cfg = cfg
        self.loss_fn = _loss_is_the_output
        self.n_heads = cfg.mtp.n_heads
        self._autocast = autocast or nullcontext
        output = self.output_module(required=False)
        if output is not None and cfg.model.tie_embeddings:
            tied = self.tied_modules[TIED_EMBEDDING_KEY]
            output.tied_weight_fn = lambda: tied.weight

    # ---- placement ---------------------------------------------------------------------------------------
    def _partition_layers(self, method: str = "parameters") -> None:
        """DeepSpeed's partitioners over pieces, the output group (tied copy + heads) counted as one piece so
        that it always lands, whole, on the last stage."""
        specs = self._layer_specs
        tail = 2 if isinstance(specs[-2], TiedLayerSpec) else 1
        n_pieces = len(specs) - tail + 1
        method = method.lower()
        if method == "uniform":
            pieces = ds_utils.partition_uniform(num_items=n_pieces, num_parts=self.num_stages)
        else:
            if method == "parameters":
                weights = self._count_layer_params()
            elif method.startswith("type:"):
                pattern = re.compile(method.split(":", 1)[1], re.IGNORECASE)
                weights = [1 if pattern.search(s.typename.__name__) else 0 for s in specs]
                if not any(weights):
                    raise ConfigError(f"parallel.pipeline_partition {method!r} matches no layer class; the "
                                      f"classes are EmbeddingPipe, TransformerLayerPipe and MTPOutputPipe.")
            else:
                raise ConfigError(f"parallel.pipeline_partition must be parameters, uniform or type:<regex>, "
                                  f"got {method!r}.")
            weights = list(weights[: n_pieces - 1]) + [sum(weights[n_pieces - 1:])]
            pieces = ds_utils.partition_balanced(weights=weights, num_parts=self.num_stages)
        parts = [int(p) for p in pieces[:-1]] + [len(specs)]
        if any(parts[s + 1] <= parts[s] for s in range(self.num_stages)):
            raise ConfigError(f"parallel.pp ({self.num_stages}) leaves a pipeline stage without layers "
                              f"(partition {parts}); use fewer stages or more model.num_layers.")
        self.parts = parts
        stage = self._topo.get_coord(self.global_rank).pipe
        self._set_bounds(start=parts[stage], stop=parts[stage + 1])

    def stage_layer_names(self) -> list:
        return [type(f).__name__ if isinstance(f, nn.Module) else getattr(f, "func", f).__class__.__name__
                for f in self.forward_funcs]

    # ---- the last stage's loss -----------------------------------------------------------------------------
    def output_module(self, required: bool = True) -> Optional[MTPOutputPipe]:
        for f in self.forward_funcs:
            if isinstance(f, MTPOutputPipe):
                return f
        if required:
            raise RuntimeError("the MTP output (heads) is not on this pipeline stage.")
        return None

    def forward(self, inputs):
        """The stage's layers in order. Activation checkpointing follows ``MTPModel``: with interval k
        (``full`` = 1, ``every_<k>`` = k) trunk layer i is recomputed in backward when i % k == 0, by its
        global index, so a setting keeps the same activations whatever the pipeline split. (DeepSpeed's own
        chunking counts blocks of k from the stage's first layer, which the embedding shifts on stage 0.)"""
        k = self.activation_checkpoint_interval
        with self._autocast():
            for layer in self.forward_funcs:
                if (k > 0 and torch.is_grad_enabled() and isinstance(layer, TransformerLayerPipe)
                        and layer.index % k == 0):
                    x, tokens = inputs
                    inputs = (self.activation_checkpoint_func(layer.hidden_forward, x), tokens)
                else:
                    inputs = layer(inputs)
        return inputs

    def take_eval_head_losses(self) -> list:
        """Per-head losses [n] of each micro-batch evaluated since the last call (last stage; else [])."""
        output = self.output_module(required=False)
        if output is None:
            return []
        losses, output.eval_head_losses = output.eval_head_losses, []
        return losses

    def get_additional_losses(self):
        """Per-head losses of the micro-batch just run (last stage): DeepSpeed sums them over micro-batches,
        averages them over DP and broadcasts them over the pipeline. Other stages only say how many."""
        output = self.output_module(required=False)
        values = output.head_losses if output is not None else None
        if values is None:
            param = next(iter(self.parameters()), None)
            values = torch.zeros(self.n_heads, device=param.device if param is not None else "cpu")
        return OrderedDict((f"loss_head_{i + 1}", values[i]) for i in range(self.n_heads))


def _loss_is_the_output(outputs: torch.Tensor, labels) -> torch.Tensor:
    """The pipe's loss_fn: the last stage's module already returned the loss."""
    return outputs


def build_pipeline_module(cfg: Config, topology, dtype=None, autocast=None) -> MTPPipelineModule:
    """This rank's stage of the MTP pipeline, not yet initialised."""
    # DeepSpeed's PipelineModule reads LOCAL_RANK (the launcher's; init_distributed exports it)
    os.environ.setdefault("LOCAL_RANK", "0")
    return MTPPipelineModule(cfg, topology, dtype=dtype, autocast=autocast)


