"""The multi-token-prediction loss and its memory-efficient evaluation (paper Fig. 2).

Head i (1-based) at position t predicts token t+i. With a sample of S+1 tokens the inputs are its first S
tokens and head i's targets are tokens i..S, padded with ``IGNORE`` for the i-1 positions whose target lies
past the sample. Each head's cross-entropy is averaged over its own valid targets, and the loss is the
(weighted) sum over heads.

``MemoryEfficientHeads`` runs inside the outer autograd graph as one node: in forward it runs, head by head,
that head's forward, loss and backward (``torch.autograd.grad``) and keeps only the gradients — with
respect to the trunk output z and to the head/norm/unembedding parameters. Nothing of a head (activations,
chunked logits) outlives its turn. In backward it hands those gradients on, scaled by the incoming
gradient, so gradient accumulation, loss scaling and outer engines (DeepSpeed ZeRO hooks, the pipeline
schedule) see an ordinary autograd node.
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch

from megatron_mtp.ops.linear_cross_entropy import scale_unless_one_

IGNORE = -100


def head_targets(tokens: torch.Tensor, n_heads: int) -> list:
    """[b, S+1] token ids -> n tensors [b, S]: head i's targets, IGNORE past the end of the sample."""
    seq = tokens.size(1) - 1
    targets = []
    for i in range(1, n_heads + 1):
        t = tokens[:, i:]
        if t.size(1) < seq:
            pad = t.new_full((t.size(0), seq - t.size(1)), IGNORE)
            t = torch.cat([t, pad], dim=1)
        targets.append(t)
    return targets


class MemoryEfficientHeads(torch.autograd.Function):
    """forward(z, head_loss_fn, n, weights, *params) -> (weighted total loss, per-head losses).

    ``head_loss_fn(i, z)`` returns head i's mean loss (a scalar built from z and ``params``).
    """

    @staticmethod
    def forward(ctx, z: torch.Tensor, head_loss_fn: Callable, n: int, weights: Sequence[float], *params):
        z_leaf = z.detach().requires_grad_(True)
        trainable = [p for p in params if p.requires_grad]
        grad_z = torch.zeros_like(z)
        grad_params = [None] * len(trainable)
        losses = []
        with torch.enable_grad():
            for i in range(n):
                loss_i = head_loss_fn(i, z_leaf)
                grads = torch.autograd.grad(weights[i] * loss_i, [z_leaf] + trainable, allow_unused=True)
                grad_z.add_(grads[0])
                for j, g in enumerate(grads[1:]):
                    if g is not None:
                        grad_params[j] = g if grad_params[j] is None else grad_params[j].add_(g)
                losses.append(loss_i.detach())
                del loss_i, grads  # the head's graph (and its logits chunks) is freed here
        ctx.grad_z = grad_z
        ctx.grad_params = grad_params
        ctx.trainable_mask = [p.requires_grad for p in params]
        per_head = torch.stack(losses).to(torch.float32)
        # Python-float weights: no host-to-device copy (and so no sync) per micro-batch.
        total = torch.stack([w * loss for w, loss in zip(weights, per_head)]).sum()
        ctx.mark_non_differentiable(per_head)
        return total, per_head

    @staticmethod
    def backward(ctx, grad_total, grad_per_head):
        # grad_total is 1 for a plain backward(); scale_unless_one_ then touches nothing (checked on the device,
        # no host sync), which saves a read and a write of every head/unembedding gradient per micro-batch.
        grad_z = ctx.grad_z
        scale_unless_one_(grad_z, grad_total)
        trainable_grads = iter(ctx.grad_params)
        out_params = []
        for is_trainable in ctx.trainable_mask:
            g = next(trainable_grads) if is_trainable else None
            if g is not None:
                scale_unless_one_(g, grad_total)
            out_params.append(g)
        ctx.grad_z = ctx.grad_params = None
        return (grad_z, None, None, None, *out_params)


def mtp_loss(z: torch.Tensor, head_loss_fn: Callable, n: int, weights: Sequence[float], params: Sequence,
             memory_efficient: bool = True) -> tuple:
    """Weighted sum of the n heads' losses and the detached per-head losses."""
    if memory_efficient and torch.is_grad_enabled() and z.requires_grad:
        return MemoryEfficientHeads.apply(z, head_loss_fn, n, tuple(weights), *params)
    losses = [head_loss_fn(i, z) for i in range(n)]
    total = sum(w * l for w, l in zip(weights, losses))
    return total, torch.stack([l.detach().float() for l in losses])
