"""Micro-batches for data-parallel training, resumable from a sample count.

The dataset is one long, already shuffled sequence of samples. At every micro-step the data-parallel
group consumes the next ``micro_batch_size * dp_size`` samples and rank r takes its contiguous slice
of them, as Megatron's pretraining sampler does. The only state is ``consumed_samples``; saving it in
the checkpoint and passing it back on restart replays exactly the stream the uninterrupted run saw.
"""
from __future__ import annotations

import numpy as np
import torch

from megatron_mtp.data.errors import DataError


class MicroBatchIterator:
    """Yields ``torch.LongTensor [micro_batch_size, seq_length + 1]`` for data-parallel rank ``dp_rank``."""

    def __init__(self, dataset, micro_batch_size: int, dp_rank: int, dp_size: int, consumed_samples: int = 0):
        if micro_batch_size < 1 or dp_size < 1 or not 0 <= dp_rank < dp_size:
            raise DataError(
                f"invalid data-parallel batch layout: micro_batch_size={micro_batch_size}, "
                f"dp_rank={dp_rank}, dp_size={dp_size}"
            )
        if consumed_samples < 0 or consumed_samples % (micro_batch_size * dp_size):
            raise DataError(
                f"consumed_samples={consumed_samples} is not a multiple of micro_batch_size * dp_size = "
                f"{micro_batch_size * dp_size}; resume with the batch layout the checkpoint was saved with"
            )
        self.dataset = dataset
        self.micro_batch_size = micro_batch_size
        self.dp_rank = dp_rank
        self.dp_size = dp_size
        self.consumed_samples = consumed_samples

    @property
    def global_micro_batch(self) -> int:
        """Samples the whole data-parallel group consumes per micro-step."""
        return self.micro_batch_size * self.dp_size

    def sample_ids(self) -> range:
        """Global sample indices this rank reads at the current micro-step."""
        first = self.consumed_samples + self.dp_rank * self.micro_batch_size
        return range(first, first + self.micro_batch_size)

    def __iter__(self) -> "MicroBatchIterator":
        return self

    def __next__(self) -> torch.Tensor:
        end = self.consumed_samples + self.global_micro_batch
        if end > len(self.dataset):
            raise DataError(
                f"the training dataset is exhausted: it holds {len(self.dataset)} samples and "
                f"{self.consumed_samples} were consumed; build it with more samples (train iterations x "
                "global batch size) or stop training earlier"
            )
        batch = np.stack([self.dataset[i] for i in self.sample_ids()])
        self.consumed_samples = end
        return torch.from_numpy(batch.astype(np.int64, copy=False))

    def state_dict(self) -> dict:
        return {"consumed_samples": self.consumed_samples}

    def load_state_dict(self, state: dict) -> None:
        self.consumed_samples = int(state["consumed_samples"])
