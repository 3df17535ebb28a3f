"""Per-head loss and perplexity on a held-out indexed dataset.

Head i (1-based) at position t is scored on token t+i, exactly as in training (``head_targets``: targets
past the window are ignored, each head averages over its own valid targets). Windows of ``seq_length + 1``
tokens come from a ``GPTDataset`` over all documents of the ``.bin/.idx`` prefix, at most one epoch, so no
token is scored twice by the same head position. Cross-entropy is accumulated in float64 as sums and
counts, so the result does not depend on the batch size.
"""
from __future__ import annotations

import math
import sys
from typing import Optional

import torch
import torch.nn.functional as F

from megatron_mtp.model.mtp_loss import IGNORE, head_targets


def perplexity_windows(prefix: str, seq_length: int, max_samples: Optional[int] = None, seed: int = 1234,
                       cache_dir: Optional[str] = None):
    """A GPTDataset of up to ``max_samples`` windows (one epoch at most) over every document of ``prefix``."""
    from megatron_mtp.data.errors import DataError
    from megatron_mtp.data.gpt_dataset import GPTDataset
    from megatron_mtp.data.indexed_dataset import IndexedDataset

    indexed = IndexedDataset(prefix)
    available = (indexed.num_tokens - 1) // seq_length
    if available < 1:
        raise DataError(f"{prefix} holds {indexed.num_tokens} tokens, too few for one window of {seq_length + 1}; "
                        f"lower --seq-length.")
    n = min(available, max_samples) if max_samples else available
    return GPTDataset(indexed, (0, indexed.document_count), n, seq_length, seed, name="perplexity",
                      cache_dir=cache_dir)


@torch.no_grad()
def evaluate_perplexity(model, dataset, batch_size: int = 4, heads: Optional[int] = None,
                        progress: bool = False) -> dict:
    """{"heads": [{"head", "loss", "perplexity", "bits_per_token", "tokens"}], "samples", "seq_length"}."""
    from tqdm import tqdm

    was_training = model.training
    model.eval()
    n_heads = heads or model.mtp.n_heads
    device = model.embedding.weight.device
    sums = torch.zeros(n_heads, dtype=torch.float64, device=device)
    counts = torch.zeros(n_heads, dtype=torch.float64, device=device)
    bar = tqdm(total=len(dataset), desc="perplexity", unit="sample", file=sys.stderr, disable=not progress)
    try:
        for start in range(0, len(dataset), batch_size):
            rows = [torch.as_tensor(dataset[i]) for i in range(start, min(start + batch_size, len(dataset)))]
            tokens = torch.stack(rows).to(device)
            z, cos, sin = model.trunk_hidden(tokens[:, :-1])
            for i, target in enumerate(head_targets(tokens, n_heads)):
                logits = model.head_logits(i, z, cos, sin)
                if logits.dtype in (torch.bfloat16, torch.float16):
                    logits = logits.float()
                sums[i] += F.cross_entropy(logits.reshape(-1, logits.size(-1)), target.reshape(-1),
                                           ignore_index=IGNORE, reduction="sum").double()
                counts[i] += (target != IGNORE).sum()
                del logits
            bar.update(len(rows))
    finally:
        bar.close()
        model.train(was_training)
    out = []
    for i, (s, c) in enumerate(zip(sums.tolist(), counts.tolist())):
        loss = s / c if c else float("nan")
        out.append({"head": i + 1, "loss": loss, "perplexity": math.exp(loss) if c else float("nan"),
                    "bits_per_token": loss / math.log(2) if c else float("nan"), "tokens": int(c)})
    return {"heads": out, "samples": len(dataset), "seq_length": int(dataset.seq_length)}
