"""Round trips through preprocessing for every tokenizer type and both on-disk dtypes."""
import json

import numpy as np
import pytest

from megatron_mtp.data.errors import DataError
from megatron_mtp.data.indexed_dataset import IndexedDataset
from megatron_mtp.data.preprocess import preprocess
from megatron_mtp.data.tokenizer_training import train_bpe_tokenizer
from megatron_mtp.data.tokenizers import build_tokenizer

DOCS = [
    "def add(a, b):\n    return a + b\n",
    "Multi-token prediction trains n heads on a shared trunk.",
    "unicode: héllo wörld — ∑ 日本語 🙂",
    "class Stack:\n    def __init__(self):\n        self.items = []\n",
    "x" * 300,
]


def write_jsonl(path, texts, key="text"):
    with open(path, "w") as stream:
        for text in texts:
            stream.write(json.dumps({key: text}) + "\n")
    return str(path)


def assert_round_trip(tmp_path, tokenizer_type, model, expected_dtype, docs=DOCS, decodes=True):
    corpus = write_jsonl(tmp_path / "corpus.jsonl", docs)
    stats = preprocess(corpus, str(tmp_path / "out"), tokenizer_type, model, append_eod=True, progress=False)
    tokenizer = build_tokenizer(tokenizer_type, model)
    dataset = IndexedDataset(stats.output_prefixes["text"])
    assert dataset.dtype == np.dtype(expected_dtype)
    assert len(dataset) == len(docs) and dataset.document_count == len(docs)
    for text, stored in zip(docs, (dataset[i] for i in range(len(dataset)))):
        assert stored.tolist() == tokenizer.encode(text) + [tokenizer.eod]
        if decodes:
            assert tokenizer.decode(stored[:-1].tolist()) == text
    return tokenizer, dataset


def test_byte_tokenizer_round_trip(tmp_path):
    tokenizer, _ = assert_round_trip(tmp_path, "byte", None, np.uint16)
    assert (tokenizer.vocab_size, tokenizer.eod, tokenizer.pad) == (258, 256, 257)


def test_hf_bpe_round_trip(tmp_path):
    model = train_bpe_tokenizer(DOCS * 20, vocab_size=300, output_path=str(tmp_path / "tokenizer.json"),
                                show_progress=False)
    tokenizer, _ = assert_round_trip(tmp_path, "hf", model, np.uint16)
    assert tokenizer.eod == 0 and tokenizer.vocab_size <= 300


def test_sentencepiece_round_trip(tmp_path):
    import sentencepiece as spm

    text_file = tmp_path / "spm.txt"
    text_file.write_text("\n".join(DOCS[:4] * 30) + "\nthe quick brown fox jumps over the lazy dog\n")
    spm.SentencePieceTrainer.train(input=str(text_file), model_prefix=str(tmp_path / "spm"), vocab_size=100,
                                   model_type="bpe", character_coverage=1.0, hard_vocab_limit=False,
                                   minloglevel=2)
    docs = ["the quick brown fox", "def add(a, b): return a + b", "héllo"]
    # SentencePiece normalises whitespace, so only the ids (not the decoded text) must round-trip exactly.
    tokenizer, _ = assert_round_trip(tmp_path, "sentencepiece", str(tmp_path / "spm.model"), np.uint16, docs,
                                     decodes=False)
    assert tokenizer.decode(tokenizer.encode("the quick brown fox")) == "the quick brown fox"


def test_large_vocab_writes_int32(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<|endoftext|>": 0, "[UNK]": 1, **{f"w{i}": i + 2 for i in range(70_000)}}
    hf = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    hf.pre_tokenizer = pre_tokenizers.Whitespace()
    model = str(tmp_path / "big.json")
    hf.save(model)
    docs = ["w69990 w3 w65534 w65535", "w0 w69999"]
    tokenizer, dataset = assert_round_trip(tmp_path, "hf", model, np.int32, docs, decodes=False)
    assert tokenizer.vocab_size == 70_002
    assert dataset[0].tolist()[:-1] == [69992, 5, 65536, 65537]  # ids above uint16 survive


def test_bad_tokenizer_settings_are_clear(tmp_path):
    with pytest.raises(DataError, match="needs a model file"):
        build_tokenizer("hf", None)
    with pytest.raises(DataError, match="does not exist"):
        build_tokenizer("sentencepiece", str(tmp_path / "missing.model"))
    with pytest.raises(DataError, match="unknown tokenizer type"):
        build_tokenizer("gpt9", None)
