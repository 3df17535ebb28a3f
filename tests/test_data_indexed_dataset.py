"""The .bin/.idx format against the spec: our writer's bytes, a hand-built file, and corrupt files."""
import os
import struct

import numpy as np
import pytest

from megatron_mtp.data.errors import DataError
from megatron_mtp.data.indexed_dataset import IndexedDataset, IndexedDatasetBuilder

MAGIC = b"MMIDIDX\x00\x00"
MEGATRON_DTYPE_CODES = {1: np.uint8, 2: np.int8, 3: np.int16, 4: np.int32, 5: np.int64, 6: np.float64,
                        7: np.float32, 8: np.uint16}
DOCS = [[5, 6, 7], [1000, 1], [42], list(range(300, 310))]


def write_docs(prefix, docs, dtype):
    with IndexedDatasetBuilder(str(prefix), dtype) as builder:
        for doc in docs:
            builder.add_document(doc)
        builder.finalize()
    return str(prefix)


@pytest.mark.parametrize("dtype,code", [(np.uint16, 8), (np.int32, 4)])
def test_writer_header_matches_spec_field_by_field(tmp_path, dtype, code):
    prefix = write_docs(tmp_path / "ds", DOCS, dtype)
    raw = open(prefix + ".idx", "rb").read()
    assert raw[0:9] == MAGIC
    assert struct.unpack("<Q", raw[9:17])[0] == 1  # version
    assert struct.unpack("<B", raw[17:18])[0] == code  # dtype code
    sequence_count, document_count = struct.unpack("<QQ", raw[18:34])
    assert sequence_count == len(DOCS)
    assert document_count == len(DOCS) + 1  # Megatron stores len(document_indices), which starts with 0
    offset = 34
    lengths = np.frombuffer(raw, np.int32, sequence_count, offset)
    offset += 4 * sequence_count
    pointers = np.frombuffer(raw, np.int64, sequence_count, offset)
    offset += 8 * sequence_count
    documents = np.frombuffer(raw, np.int64, document_count, offset)
    offset += 8 * document_count
    assert offset == len(raw)  # nothing after the document indices
    assert lengths.tolist() == [len(d) for d in DOCS]
    itemsize = np.dtype(dtype).itemsize
    assert pointers.tolist() == (np.concatenate([[0], np.cumsum(lengths)[:-1]]) * itemsize).tolist()
    assert documents.tolist() == list(range(len(DOCS) + 1))
    tokens = np.fromfile(prefix + ".bin", dtype=MEGATRON_DTYPE_CODES[code])
    assert tokens.tolist() == [t for doc in DOCS for t in doc]


def test_reader_reads_hand_built_file(tmp_path):
    # Two documents; the first has two sequences (Megatron's sentence-split layout), the second one.
    sequences = [np.array([1, 2, 3], np.int32), np.array([4, 5], np.int32), np.array([70000, 9], np.int32)]
    documents = [0, 2, 3]
    lengths = np.array([len(s) for s in sequences], np.int32)
    pointers = np.array([0, 12, 20], np.int64)
    idx = MAGIC + struct.pack("<Q", 1) + struct.pack("<B", 4) + struct.pack("<QQ", 3, len(documents))
    idx += lengths.tobytes() + pointers.tobytes() + np.array(documents, np.int64).tobytes()
    (tmp_path / "hand.idx").write_bytes(idx)
    (tmp_path / "hand.bin").write_bytes(b"".join(s.tobytes() for s in sequences))

    dataset = IndexedDataset(str(tmp_path / "hand"))
    assert dataset.dtype == np.int32 and len(dataset) == 3 and dataset.document_count == 2
    assert dataset.document_indices.tolist() == documents
    assert dataset.sequence_lengths.tolist() == [3, 2, 2]
    for i, sequence in enumerate(sequences):
        assert dataset[i].tolist() == sequence.tolist()
    assert dataset.get(0, offset=1, length=2).tolist() == [2, 3]
    assert dataset.get(2, offset=1).tolist() == [9]
    assert [s.tolist() for s in dataset[0:2]] == [[1, 2, 3], [4, 5]]
    assert dataset.max_token() == 70000 and dataset.num_tokens == 7


def test_reads_are_zero_copy_views(tmp_path):
    dataset = IndexedDataset(write_docs(tmp_path / "ds", DOCS, np.uint16))
    view = dataset[3]
    assert not view.flags.owndata and not view.flags.writeable


def test_builder_leaves_no_files_when_aborted(tmp_path):
    with pytest.raises(RuntimeError):
        with IndexedDatasetBuilder(str(tmp_path / "ds"), np.uint16) as builder:
            builder.add_document([1, 2, 3])
            raise RuntimeError("killed")
    assert os.listdir(tmp_path) == []


def test_builder_refuses_ids_that_do_not_fit(tmp_path):
    with IndexedDatasetBuilder(str(tmp_path / "ds"), np.uint16) as builder:
        with pytest.raises(DataError, match="do not fit"):
            builder.add_document([70000])
        builder.abort()


def corrupt(tmp_path, edit):
    prefix = write_docs(tmp_path / "ds", DOCS, np.uint16)
    edit(prefix)
    with pytest.raises(DataError) as info:
        IndexedDataset(prefix)
    return str(info.value)


def patch(path, offset, data):
    raw = bytearray(open(path, "rb").read())
    raw[offset : offset + len(data)] = data
    open(path, "wb").write(bytes(raw))


def truncate(path, size):
    with open(path, "r+b") as stream:
        stream.truncate(size)


def test_wrong_magic(tmp_path):
    message = corrupt(tmp_path, lambda p: patch(p + ".idx", 0, b"NOTANIDX!"))
    assert "ds.idx is not a Megatron indexed-dataset index" in message


def test_wrong_version(tmp_path):
    message = corrupt(tmp_path, lambda p: patch(p + ".idx", 9, struct.pack("<Q", 2)))
    assert "index version 2" in message and "ds.idx" in message


def test_unknown_dtype_code(tmp_path):
    message = corrupt(tmp_path, lambda p: patch(p + ".idx", 17, b"\x09"))
    assert "unknown token dtype code 9" in message


@pytest.mark.parametrize("size", [5, 20, 60])
def test_truncated_index(tmp_path, size):
    message = corrupt(tmp_path, lambda p: truncate(p + ".idx", size))
    assert "ds.idx is truncated" in message and "preprocess_data.py" in message


def test_truncated_bin(tmp_path):
    message = corrupt(tmp_path, lambda p: truncate(p + ".bin", 10))
    assert "ds.bin has 10 bytes but" in message


def test_bin_from_another_run(tmp_path):
    other = write_docs(tmp_path / "other", DOCS + [[1, 2]], np.uint16)
    message = corrupt(tmp_path, lambda p: os.replace(other + ".bin", p + ".bin"))
    assert "different runs" in message


def test_corrupt_pointers(tmp_path):
    message = corrupt(tmp_path, lambda p: patch(p + ".idx", 34 + 4 * len(DOCS) + 8, struct.pack("<q", 3)))
    assert "sequence pointers" in message


def test_missing_files(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        IndexedDataset(str(tmp_path / "nothing"))
