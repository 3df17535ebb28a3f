"""GPT pre-training samples: documents packed into fixed windows of ``seq_length + 1`` tokens.

As in Megatron, the documents of a split are laid end to end (in a fresh random order each epoch)
and cut every ``seq_length`` tokens; each sample takes one extra token, so sample i's last token is
sample i+1's first (inputs are ``sample[:-1]``, next-token targets ``sample[1:]``). Samples cross
document boundaries; the EOD tokens written by ``--append-eod`` mark them.

Three indices, built once with numpy and cached on disk:

* ``document_index`` [epochs * documents]   the shuffled document order, epoch after epoch;
* ``sample_index``   [num_samples + 1, 2]   (position in document_index, token offset) where each
                                            sample starts; sample i ends where sample i+1 starts;
* ``shuffle_index``  [num_samples]           the order samples are served in: shuffled within each
                                            epoch, epochs in order, so a run that stops after one
                                            epoch has seen every token once.
"""
from __future__ import annotations

import zlib
from typing import Optional

import numpy as np

from megatron_mtp.data.errors import DataError
from megatron_mtp.data.index_cache import cached_arrays
from megatron_mtp.data.indexed_dataset import IndexedDataset

INDEX_FORMAT_VERSION = 1  # bump when the index construction changes, to invalidate old caches


def _rng(seed: int, name: str) -> np.random.Generator:
    # Independent streams per split, reproducible across runs and machines.
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence([seed, zlib.crc32(name.encode())])))


def num_epochs_needed(tokens_per_epoch: int, num_samples: int, seq_length: int) -> int:
    """Smallest number of epochs whose tokens cover ``num_samples`` windows (plus the shared last token)."""
    return max(1, -(-(num_samples * seq_length + 1) // tokens_per_epoch))


def build_sample_indices(
    document_lengths: np.ndarray, num_samples: int, seq_length: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Return ``(document_index, sample_index, shuffle_index)`` for documents of ``document_lengths``.

    Fully vectorised: one searchsorted over the cumulative token count finds every sample's start.
    """
    lengths = np.asarray(document_lengths, dtype=np.int64)
    tokens_per_epoch = int(lengths.sum())
    if tokens_per_epoch == 0:
        raise DataError("the documents of this split hold no tokens; check the data prefix and the split ratios")
    num_epochs = num_epochs_needed(tokens_per_epoch, num_samples, seq_length)

    # Each row is one epoch's independent permutation of the documents.
    document_index = rng.permuted(np.tile(np.arange(len(lengths), dtype=np.int64), (num_epochs, 1)), axis=1).ravel()

    stream_starts = np.zeros(len(document_index) + 1, dtype=np.int64)
    np.cumsum(lengths[document_index], out=stream_starts[1:])
    sample_starts = np.arange(num_samples + 1, dtype=np.int64) * seq_length
    # side="right" - 1 picks the last document starting at or before the position, which skips
    # zero-length documents (they share their start with the next one).
    position = np.searchsorted(stream_starts, sample_starts, side="right") - 1
    sample_index = np.stack([position, sample_starts - stream_starts[position]], axis=1)

    epoch_of_sample = sample_starts[:-1] // tokens_per_epoch
    shuffle_index = np.lexsort((rng.random(num_samples), epoch_of_sample)).astype(np.int64)
    return document_index, sample_index, shuffle_index


class GPTDataset:
    """``num_samples`` packed samples (int64 arrays of ``seq_length + 1`` tokens) from some documents.

    ``documents`` is the ``[begin, end)`` range of documents of ``indexed_dataset`` this split uses.
    """

    def __init__(
        self,
        indexed_dataset: IndexedDataset,
        documents: tuple[int, int],
        num_samples: int,
        seq_length: int,
        seed: int,
        name: str = "train",
        cache_dir: Optional[str] = None,
    ):
        if num_samples < 1 or seq_length < 1:
            raise DataError(f"need num_samples >= 1 and seq_length >= 1, got {num_samples} and {seq_length}")
        self.indexed_dataset = indexed_dataset
        self.num_samples = num_samples
        self.seq_length = seq_length
        self.name = name
        begin, end = documents
        # Packing works on sequences; with preprocess_data.py output there is one sequence per document.
        doc_bounds = indexed_dataset.document_indices
        self.first_sequence = int(doc_bounds[begin])
        last_sequence = int(doc_bounds[end])
        lengths = indexed_dataset.sequence_lengths[self.first_sequence : last_sequence]
        if int(lengths.sum(dtype=np.int64)) == 0:
            raise DataError(
                f"split {name!r} of {indexed_dataset.path_prefix} has no tokens (documents {begin}..{end}); "
                "give it a larger corpus or change the split ratios"
            )
        description = {
            "class": "GPTDataset",
            "format": INDEX_FORMAT_VERSION,
            "prefix": indexed_dataset.path_prefix,
            "fingerprint": indexed_dataset.fingerprint(),
            "documents": [begin, end],
            "num_samples": num_samples,
            "seq_length": seq_length,
            "seed": seed,
            "name": name,
        }
        self.description = description
        self.document_index, self.sample_index, self.shuffle_index = cached_arrays(
            cache_dir,
            f"gpt-{name}",
            description,
            ("document_index", "sample_index", "shuffle_index"),
            lambda: build_sample_indices(lengths, num_samples, seq_length, _rng(seed, name)),
        )

    def __len__(self) -> int:
        return self.num_samples

    def __getitem__(self, idx: int) -> np.ndarray:
        if not 0 <= idx < self.num_samples:
            raise IndexError(f"sample {idx} out of range for {self.name} dataset of {self.num_samples} samples")
        i = int(self.shuffle_index[idx])
        (doc_begin, offset_begin), (doc_end, offset_end) = self.sample_index[i], self.sample_index[i + 1]
        doc_begin, offset_begin, doc_end, offset_end = int(doc_begin), int(offset_begin), int(doc_end), int(offset_end)
        if doc_begin == doc_end:
            tokens = self._document(doc_begin)[offset_begin : offset_end + 1]
        else:
            parts = [self._document(doc_begin)[offset_begin:]]
            parts += [self._document(d) for d in range(doc_begin + 1, doc_end)]
            parts.append(self._document(doc_end)[: offset_end + 1])
            tokens = np.concatenate(parts)
        return tokens.astype(np.int64)

    def _document(self, position: int) -> np.ndarray:
        return self.indexed_dataset[self.first_sequence + int(self.document_index[position])]

    def __repr__(self) -> str:
        return (f"GPTDataset({self.name}, {self.indexed_dataset.path_prefix}, samples={self.num_samples}, "
                f"seq_length={self.seq_length})")
