"""The MTP pipeline as a DeepSpeed ``PipelineModule``: layer specs of the stage layers in ``model/pipeline.py``
(see its docstring for the placement and why every head sits on the last stage), partitioned so that the
embedding stays on the first stage and the output group (tied copy + heads) whole on the last.

Partitioning balances the pieces in between by ``parallel.pipeline_partition``: ``parameters`` (by parameter
count, DeepSpeed's default), ``uniform`` (by count of pieces) or ``type:<regex>`` (only pieces whose class
name matches count, e.g. ``type:TransformerLayer`` balances trunk layers alone). DeepSpeed's private
members this needs come through ``ds_compat``.
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

from megatron_mtp.config import Config, ConfigError
from megatron_mtp.model.mtp_model import checkpoint_interval, trunk_layer_count
from megatron_mtp.model.pipeline import TIED_EMBEDDING_KEY, EmbeddingPipe, MTPOutputPipe, TransformerLayerPipe
from megatron_mtp.parallel.random import checkpoint
from megatron_mtp.training import ds_compat
from megatron_mtp.validation import check_partition_method, check_pipeline_layout


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


class MTPPipelineModule(PipelineModule):
    """This rank's stage of the MTP pipeline; see the module docstring. Parameters are left as built:
    call ``initialize_parameters(module, seed)`` on it, as for the single-process model."""

    def __init__(self, cfg: Config, topology, dtype=None, autocast=None):
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
    def _partition_layers(self, method: str = "parameters") -> None:  # DeepSpeed's hook (ds_compat)
        """DeepSpeed's partitioners over pieces, the output group (tied copy + heads) counted as one piece so
        that it always lands, whole, on the last stage."""
        specs = ds_compat.layer_specs(self)
        tail = 2 if isinstance(specs[-2], TiedLayerSpec) else 1
        n_pieces = len(specs) - tail + 1
        method = method.lower()
        check_partition_method(method)
        if method == "uniform":
            pieces = ds_compat.partition_uniform(num_items=n_pieces, num_parts=self.num_stages)
        else:
            if method == "parameters":
                weights = ds_compat.count_layer_params(self)
            else:  # type:<regex>
                pattern = re.compile(method.split(":", 1)[1], re.IGNORECASE)
                weights = [1 if pattern.search(s.typename.__name__) else 0 for s in specs]
                if not any(weights):
                    raise ConfigError(f"parallel.pipeline_partition {method!r} matches no layer class; the "
                                      f"classes are EmbeddingPipe, TransformerLayerPipe and MTPOutputPipe.")
            weights = list(weights[: n_pieces - 1]) + [sum(weights[n_pieces - 1:])]
            pieces = ds_compat.partition_balanced(weights=weights, num_parts=self.num_stages)
        parts = [int(p) for p in pieces[:-1]] + [len(specs)]
        if any(parts[s + 1] <= parts[s] for s in range(self.num_stages)):
            raise ConfigError(f"parallel.pp ({self.num_stages}) leaves a pipeline stage without layers "
                              f"(partition {parts}); use fewer stages or more model.num_layers.")
        self.parts = parts
        ds_compat.set_stage_bounds(self, parts)

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
