"""Megatron-compatible indexed dataset: a ``.bin`` of raw tokens plus an ``.idx`` describing it.

On-disk format of ``{prefix}.idx`` (little-endian, as Megatron-LM's ``indexed_dataset.py`` writes it):

    offset  size      field
    0       9         magic  b"MMIDIDX\\x00\\x00"
    9       8         version, uint64 == 1
    17      1         token dtype code, uint8 (1 uint8, 2 int8, 3 int16, 4 int32, 5 int64,
                      6 float64, 7 float32, 8 uint16)
    18      8         sequence count S, uint64
    26      8         document-index count D, uint64 (= number of documents + 1)
    34      4*S       sequence lengths, int32 (tokens)
    ...     8*S       sequence pointers, int64 (byte offset of each sequence in the .bin)
    ...     8*D       document indices, int64: document k spans sequences [doc[k], doc[k+1]);
                      doc[0] == 0 and doc[-1] == S
    ...     S         (optional, Megatron multimodal only) sequence modes, int8

``{prefix}.bin`` is the concatenation of all sequences' tokens in the stored dtype.
Preprocessing writes one sequence per document, so documents and sequences coincide.

The reader memory-maps both files and hands out zero-copy, read-only numpy views. It validates the
pair when opened, so a corrupt or mismatched file fails with one sentence instead of garbage samples.
The builder writes to temporary names and renames on ``finalize``, so a killed run leaves no
valid-looking partial dataset.
"""
from __future__ import annotations

import hashlib
import os
import struct
from typing import Optional, Sequence, Union

import numpy as np

from megatron_mtp.data.errors import DataError

INDEX_MAGIC = b"MMIDIDX\x00\x00"
INDEX_VERSION = 1
HEADER_SIZE = 34  # 9 magic + 8 version + 1 dtype code + 8 sequence count + 8 document count

DTYPE_CODES = {
    1: np.dtype(np.uint8),
    2: np.dtype(np.int8),
    3: np.dtype(np.int16),
    4: np.dtype(np.int32),
    5: np.dtype(np.int64),
    6: np.dtype(np.float64),
    7: np.dtype(np.float32),
    8: np.dtype(np.uint16),
}
CODE_OF_DTYPE = {dtype: code for code, dtype in DTYPE_CODES.items()}

_HEADER = struct.Struct("<9sQBQQ")
assert _HEADER.size == HEADER_SIZE

REBUILD_HINT = "re-run tools/preprocess_data.py to rebuild it"


def index_path(prefix: str) -> str:
    return prefix + ".idx"


def data_path(prefix: str) -> str:
    return prefix + ".bin"


def dataset_exists(prefix: str) -> bool:
    return os.path.isfile(index_path(prefix)) and os.path.isfile(data_path(prefix))


class IndexedDataset:
    """Memory-mapped reader for a ``{prefix}.bin`` / ``{prefix}.idx`` pair.

    ``ds[i]`` is sequence i as a read-only numpy view of the ``.bin`` (no copy);
    ``ds.get(i, offset, length)`` is a window of it.
    """

    def __init__(self, path_prefix: str):
        self.path_prefix = path_prefix
        self._open()

    # Pickle by path so DataLoader workers re-map the files instead of copying them.
    def __getstate__(self):
        return {"path_prefix": self.path_prefix}

    def __setstate__(self, state):
        self.path_prefix = state["path_prefix"]
        self._open()

    def _open(self) -> None:
        idx_file, bin_file = index_path(self.path_prefix), data_path(self.path_prefix)
        self._fingerprint = None
        for path in (idx_file, bin_file):
            if not os.path.isfile(path):
                raise DataError(
                    f"dataset file {path} does not exist; check the data path prefix "
                    "(it excludes .bin/.idx) or create it with tools/preprocess_data.py"
                )
        header = _read_header(idx_file)
        self.dtype: np.dtype = header["dtype"]
        self.sequence_count: int = header["sequence_count"]
        self.document_count: int = header["document_count"] - 1

        index = np.memmap(idx_file, dtype=np.uint8, mode="r")
        offset = HEADER_SIZE
        count = self.sequence_count
        self.sequence_lengths = np.frombuffer(index, dtype=np.int32, count=count, offset=offset)
        offset += self.sequence_lengths.nbytes
        self.sequence_pointers = np.frombuffer(index, dtype=np.int64, count=count, offset=offset)
        offset += self.sequence_pointers.nbytes
        self.document_indices = np.frombuffer(index, dtype=np.int64, count=header["document_count"], offset=offset)
        _validate_index(idx_file, self.sequence_lengths, self.sequence_pointers, self.document_indices, self.dtype)

        # Token view of the whole .bin; an empty file cannot be memory-mapped, so special-case it.
        bin_size = os.path.getsize(bin_file)
        expected = int(self.sequence_lengths.sum(dtype=np.int64)) * self.dtype.itemsize
        if bin_size != expected:
            raise DataError(
                f"{bin_file} has {bin_size} bytes but {idx_file} describes {expected}: the .bin is truncated "
                f"or the two files come from different runs; {REBUILD_HINT}"
            )
        self._tokens = np.memmap(bin_file, dtype=self.dtype, mode="r") if bin_size else np.empty(0, self.dtype)

    @property
    def num_tokens(self) -> int:
        return int(self._tokens.shape[0])

    def __len__(self) -> int:
        return self.sequence_count

    def _start(self, i: int) -> int:
        return int(self.sequence_pointers[i]) // self.dtype.itemsize

    def __getitem__(self, idx: Union[int, np.integer, slice]) -> Union[np.ndarray, list[np.ndarray]]:
        if isinstance(idx, slice):
            start, stop, step = idx.indices(len(self))
            if step != 1:
                raise ValueError("IndexedDataset slices must be contiguous (step 1)")
            if stop <= start:
                return []
            lengths = self.sequence_lengths[start:stop]
            first = self._start(start)
            flat = self._tokens[first : first + int(lengths.sum(dtype=np.int64))]
            return np.split(flat, np.cumsum(lengths[:-1], dtype=np.int64))
        i = int(idx)
        if i < 0:
            i += len(self)
        if not 0 <= i < len(self):
            raise IndexError(f"sequence {idx} out of range for {len(self)} sequences in {self.path_prefix}")
        start = self._start(i)
        return self._tokens[start : start + int(self.sequence_lengths[i])]

    def get(self, idx: int, offset: int = 0, length: Optional[int] = None) -> np.ndarray:
        """Tokens ``[offset, offset + length)`` of sequence ``idx`` (to its end when ``length`` is None)."""
        sequence = self[idx]
        end = len(sequence) if length is None else offset + length
        return sequence[offset:end]

    def max_token(self, chunk_tokens: int = 1 << 26) -> int:
        """Largest token id in the .bin (-1 when empty); scanned in chunks to bound memory."""
        best = -1
        for start in range(0, self.num_tokens, chunk_tokens):
            best = max(best, int(self._tokens[start : start + chunk_tokens].max()))
        return best

    def fingerprint(self) -> str:
        """Content hash of the index (dtype, lengths, document boundaries): keys on-disk caches."""
        if self._fingerprint is None:  # hashing a large index takes a moment; do it once
            digest = hashlib.sha256()
            digest.update(str(self.dtype).encode())
            digest.update(self.sequence_lengths.tobytes())
            digest.update(self.document_indices.tobytes())
            self._fingerprint = digest.hexdigest()[:16]
        return self._fingerprint

    def __repr__(self) -> str:
        return (
            f"IndexedDataset({self.path_prefix!r}, documents={self.document_count}, "
            f"tokens={self.num_tokens}, dtype={self.dtype})"
        )


def _read_header(idx_file: str) -> dict:
    size = os.path.getsize(idx_file)
    with open(idx_file, "rb") as stream:
        raw = stream.read(HEADER_SIZE)
    # A file cut inside the magic is "truncated"; any other mismatch means it is not an index at all.
    magic_ok = raw[: len(INDEX_MAGIC)] == INDEX_MAGIC or (len(raw) < len(INDEX_MAGIC) and INDEX_MAGIC.startswith(raw))
    if not magic_ok:
        raise DataError(
            f"{idx_file} is not a Megatron indexed-dataset index (its first bytes are {raw[:9]!r}, "
            f"expected {INDEX_MAGIC!r}); point data.paths at a prefix written by tools/preprocess_data.py"
        )
    if len(raw) < HEADER_SIZE:
        raise DataError(f"{idx_file} is truncated ({size} bytes, shorter than the {HEADER_SIZE}-byte header); {REBUILD_HINT}")
    _, version, code, sequence_count, document_count = _HEADER.unpack(raw)
    if version != INDEX_VERSION:
        raise DataError(f"{idx_file} has index version {version}, but only version {INDEX_VERSION} is supported; {REBUILD_HINT}")
    if code not in DTYPE_CODES:
        raise DataError(
            f"{idx_file} declares unknown token dtype code {code} (known: {sorted(DTYPE_CODES)}); "
            f"the file is corrupt, {REBUILD_HINT}"
        )
    if document_count < 1:
        raise DataError(f"{idx_file} declares no document indices (Megatron writes documents + 1); {REBUILD_HINT}")
    body = 4 * sequence_count + 8 * sequence_count + 8 * document_count
    # Megatron's multimodal variant appends one int8 mode per sequence; accept it and ignore the modes.
    if size not in (HEADER_SIZE + body, HEADER_SIZE + body + sequence_count):
        problem = "is truncated" if size < HEADER_SIZE + body else "has trailing bytes"
        raise DataError(
            f"{idx_file} {problem}: {size} bytes for {sequence_count} sequences and {document_count} document "
            f"indices, expected {HEADER_SIZE + body}; {REBUILD_HINT}"
        )
    return {
        "dtype": DTYPE_CODES[code],
        "sequence_count": sequence_count,
        "document_count": document_count,
    }


def _validate_index(idx_file, lengths, pointers, documents, dtype) -> None:
    """Cheap vectorised consistency checks; they catch bit rot and hand-edited indices."""
    if len(lengths) and lengths.min() < 0:
        raise DataError(f"{idx_file} has negative sequence lengths; the file is corrupt, {REBUILD_HINT}")
    expected_pointers = np.zeros(len(lengths), dtype=np.int64)
    np.cumsum(lengths[:-1], dtype=np.int64, out=expected_pointers[1:])
    if not np.array_equal(pointers, expected_pointers * dtype.itemsize):
        raise DataError(
            f"{idx_file} has sequence pointers that do not match its sequence lengths; the file is corrupt, {REBUILD_HINT}"
        )
    if documents[0] != 0 or documents[-1] != len(lengths) or np.any(np.diff(documents) < 0):
        raise DataError(
            f"{idx_file} has document indices that do not run from 0 to its {len(lengths)} sequences in order; "
            f"the file is corrupt, {REBUILD_HINT}"
        )


def write_index(idx_file: str, dtype: np.dtype, sequence_lengths: np.ndarray, document_indices: np.ndarray) -> None:
    """Write a complete ``.idx`` to ``idx_file`` (callers pass a temporary name and rename it)."""
    dtype = np.dtype(dtype)
    lengths = np.asarray(sequence_lengths, dtype=np.int32)
    documents = np.asarray(document_indices, dtype=np.int64)
    pointers = np.zeros(len(lengths), dtype=np.int64)
    np.cumsum(lengths[:-1], dtype=np.int64, out=pointers[1:])
    pointers *= dtype.itemsize
    with open(idx_file, "wb") as stream:
        stream.write(_HEADER.pack(INDEX_MAGIC, INDEX_VERSION, CODE_OF_DTYPE[dtype], len(lengths), len(documents)))
        stream.write(lengths.tobytes())
        stream.write(pointers.tobytes())
        stream.write(documents.tobytes())


class IndexedDatasetBuilder:
    """Writes ``{prefix}.bin`` / ``{prefix}.idx``; nothing appears under the final names before ``finalize``.

    Use as a context manager: leaving the block with an exception (or calling ``abort``) deletes the
    temporary files. A process killed outright leaves only ``*.tmp-<pid>`` files behind, which no reader
    mistakes for a dataset.
    """

    def __init__(self, path_prefix: str, dtype: Union[np.dtype, type] = np.int32):
        self.path_prefix = path_prefix
        self.dtype = np.dtype(dtype)
        if self.dtype not in CODE_OF_DTYPE:
            raise DataError(f"token dtype {self.dtype} has no Megatron dtype code; use uint16 or int32")
        suffix = f".tmp-{os.getpid()}"
        self._tmp_bin = data_path(path_prefix) + suffix
        self._tmp_idx = index_path(path_prefix) + suffix
        os.makedirs(os.path.dirname(os.path.abspath(path_prefix)), exist_ok=True)
        self._data_file = open(self._tmp_bin, "wb")
        self._lengths: list[np.ndarray] = []  # one int32 array per add call, concatenated at the end
        self._num_sequences = 0
        self._document_indices = [0]
        self.num_tokens = 0

    def add_item(self, tokens: Union[np.ndarray, Sequence[int]]) -> None:
        """Append one sequence; call ``end_document`` to close the document it belongs to."""
        array = self._as_tokens(tokens)
        self._data_file.write(array.tobytes())
        self._lengths.append(np.array([array.size], dtype=np.int32))
        self._num_sequences += 1
        self.num_tokens += array.size

    def end_document(self) -> None:
        self._document_indices.append(self._num_sequences)

    def add_document(self, tokens: Union[np.ndarray, Sequence[int]], lengths: Optional[Sequence[int]] = None) -> None:
        """Append one document made of sequences of ``lengths`` (default: the whole document is one sequence)."""
        array = self._as_tokens(tokens)
        lengths = np.array([array.size] if lengths is None else lengths, dtype=np.int32)
        self._write_sequences(array, lengths)
        self._document_indices.append(self._num_sequences)

    def add_documents(self, tokens: np.ndarray, lengths: np.ndarray) -> None:
        """Append many one-sequence documents at once: ``tokens`` is their concatenation (preprocessing's fast path)."""
        array = self._as_tokens(tokens)
        lengths = np.asarray(lengths, dtype=np.int32)
        first = self._num_sequences
        self._write_sequences(array, lengths)
        self._document_indices.extend(range(first + 1, first + len(lengths) + 1))

    def _write_sequences(self, array: np.ndarray, lengths: np.ndarray) -> None:
        if int(lengths.sum(dtype=np.int64)) != array.size:
            raise ValueError(f"sequence lengths sum to {int(lengths.sum())} but {array.size} tokens were given")
        self._data_file.write(array.tobytes())
        self._lengths.append(lengths)
        self._num_sequences += len(lengths)
        self.num_tokens += array.size

    def _as_tokens(self, tokens) -> np.ndarray:
        if isinstance(tokens, np.ndarray) and tokens.dtype == self.dtype:
            return np.ascontiguousarray(tokens)
        array = np.asarray(tokens)
        integer = np.issubdtype(self.dtype, np.integer)
        if integer and array.size and (array.min() < np.iinfo(self.dtype).min or array.max() > np.iinfo(self.dtype).max):
            raise DataError(f"token ids {int(array.min())}..{int(array.max())} do not fit the dataset dtype {self.dtype}")
        return array.astype(self.dtype)

    def finalize(self) -> None:
        """Write the index and move both files to their final names (.bin first, then .idx)."""
        self._data_file.close()
        lengths = np.concatenate(self._lengths) if self._lengths else np.zeros(0, dtype=np.int32)
        write_index(self._tmp_idx, self.dtype, lengths, np.array(self._document_indices, dtype=np.int64))
        # Drop any old .idx first: between the two renames the new .bin then has no index at all,
        # rather than a stale one that might be mistaken for its own.
        final_idx = index_path(self.path_prefix)
        if os.path.exists(final_idx):
            os.remove(final_idx)
        os.replace(self._tmp_bin, data_path(self.path_prefix))
        os.replace(self._tmp_idx, final_idx)

    def abort(self) -> None:
        """Close and delete the temporary files; the final names are left untouched."""
        self._data_file.close()
        for path in (self._tmp_bin, self._tmp_idx):
            if os.path.exists(path):
                os.remove(path)

    def __enter__(self) -> "IndexedDatasetBuilder":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self.abort()
