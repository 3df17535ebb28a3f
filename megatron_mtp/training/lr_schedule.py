"""Learning-rate schedule: linear warm-up, then cosine decay to ``min_lr`` (Llama / Megatron)."""
from __future__ import annotations

import math


def learning_rate(step: int, lr: float, min_lr: float, warmup_iters: int, decay_iters: int) -> float:
    """LR for optimizer step ``step`` (0-based)."""
    if warmup_iters > 0 and step < warmup_iters:
        return lr * (step + 1) / warmup_iters
    if step >= decay_iters:
        return min_lr
    progress = (step - warmup_iters) / max(1, decay_iters - warmup_iters)
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (lr - min_lr)
