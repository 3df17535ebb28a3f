"""Tokenizers behind one small interface: ``encode``, ``decode``, ``vocab_size``, ``eod``.

Three back-ends:

* ``byte``          UTF-8 bytes 0..255 plus two specials (EOD 256, pad 257); needs no files, so the
                    default corpus works on any machine (and matches the paper's byte-level models).
* ``hf``            a HuggingFace ``tokenizers`` ``tokenizer.json`` (e.g. from tools/train_tokenizer.py).
* ``sentencepiece`` a SentencePiece ``.model`` file (Llama-style).

``encode_batch_arrays`` is the hot path used by preprocessing: it returns numpy arrays already in the
on-disk dtype so workers ship compact buffers back instead of lists of Python ints.
"""
from __future__ import annotations

import os
from typing import Optional, Sequence

import numpy as np

from megatron_mtp.data.errors import DataError

TOKENIZER_TYPES = ("byte", "hf", "sentencepiece")

# Names under which tokenizer files commonly carry their end-of-document token, most specific first.
EOD_TOKEN_CANDIDATES = ("<|endoftext|>", "<|end_of_text|>", "</s>", "<eos>", "<|eot_id|>")


class Tokenizer:
    """Interface every back-end implements; ``eod`` separates documents in packed samples."""

    name: str = "base"
    vocab_size: int
    eod: int
    pad: Optional[int] = None

    def encode(self, text: str) -> list[int]:
        raise NotImplementedError

    def decode(self, ids: Sequence[int]) -> str:
        raise NotImplementedError

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [self.encode(text) for text in texts]

    def encode_batch_arrays(self, texts: Sequence[str], dtype: np.dtype) -> list[np.ndarray]:
        # np.array raises OverflowError (numpy >= 2) if an id does not fit dtype, so a wrong dtype
        # can never silently wrap token ids.
        return [np.array(ids, dtype=dtype) for ids in self.encode_batch(texts)]

    def __repr__(self) -> str:
        return f"{type(self).__name__}(vocab_size={self.vocab_size}, eod={self.eod})"


class ByteTokenizer(Tokenizer):
    """UTF-8 bytes as tokens; ids 256 (EOD) and 257 (pad) are the only specials."""

    name = "byte"
    vocab_size = 258
    eod = 256
    pad = 257

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: Sequence[int]) -> str:
        # Specials have no bytes; a byte sequence cut mid-character decodes with U+FFFD, not an error.
        return bytes(i for i in ids if 0 <= i < 256).decode("utf-8", errors="replace")

    def encode_batch_arrays(self, texts: Sequence[str], dtype: np.dtype) -> list[np.ndarray]:
        # Zero-copy view of the UTF-8 bytes, widened once to the on-disk dtype.
        return [np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(dtype) for text in texts]


class HFTokenizer(Tokenizer):
    """A HuggingFace ``tokenizers`` tokenizer.json; its EOD is the first known end-of-text token."""

    name = "hf"

    def __init__(self, path: str):
        from tokenizers import Tokenizer as _HFTokenizer

        try:
            self._tokenizer = _HFTokenizer.from_file(path)
        except Exception as exc:  # the library's message is a Rust error string; name the file instead
            raise DataError(f"could not load HuggingFace tokenizer {path!r} ({exc}); pass a tokenizer.json file") from exc
        self.path = path
        self.vocab_size = self._tokenizer.get_vocab_size(with_added_tokens=True)
        self.eod = _find_special(self._tokenizer.token_to_id, path)
        pad = self._tokenizer.token_to_id("<|pad|>")
        self.pad = pad if pad is not None else self._tokenizer.token_to_id("<pad>")

    def encode(self, text: str) -> list[int]:
        return self._tokenizer.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Sequence[int]) -> str:
        return self._tokenizer.decode(list(ids), skip_special_tokens=False)

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [e.ids for e in self._tokenizer.encode_batch(list(texts), add_special_tokens=False)]


class SentencePieceTokenizer(Tokenizer):
    """A SentencePiece model; EOD is its ``eos`` piece (or an ``<|endoftext|>`` piece if it has no eos)."""

    name = "sentencepiece"

    def __init__(self, path: str):
        import sentencepiece as spm

        try:
            self._processor = spm.SentencePieceProcessor(model_file=path)
        except Exception as exc:
            raise DataError(f"could not load SentencePiece model {path!r} ({exc}); pass a .model file") from exc
        self.path = path
        self.vocab_size = self._processor.get_piece_size()
        eos = self._processor.eos_id()
        if eos >= 0:
            self.eod = eos
        else:
            self.eod = _find_special(self._piece_id_or_none, path)
        pad = self._processor.pad_id()
        self.pad = pad if pad >= 0 else None

    def _piece_id_or_none(self, piece: str) -> Optional[int]:
        piece_id = self._processor.piece_to_id(piece)
        return None if piece_id == self._processor.unk_id() else piece_id

    def encode(self, text: str) -> list[int]:
        return self._processor.encode(text)

    def decode(self, ids: Sequence[int]) -> str:
        return self._processor.decode(list(int(i) for i in ids))

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return self._processor.encode(list(texts))


def _find_special(lookup, path: str) -> int:
    for token in EOD_TOKEN_CANDIDATES:
        token_id = lookup(token)
        if token_id is not None:
            return token_id
    raise DataError(
        f"tokenizer {path!r} has no end-of-document token (looked for {', '.join(EOD_TOKEN_CANDIDATES)}); "
        "add one as a special token, e.g. retrain with tools/train_tokenizer.py"
    )


def build_tokenizer(tokenizer_type: str, tokenizer_model: Optional[str] = None) -> Tokenizer:
    """Return the tokenizer of ``tokenizer_type`` ('byte', 'hf' or 'sentencepiece') loaded from ``tokenizer_model``."""
    if tokenizer_type == "byte":
        return ByteTokenizer()
    if tokenizer_type not in TOKENIZER_TYPES:
        raise DataError(f"unknown tokenizer type {tokenizer_type!r}; choose one of {', '.join(TOKENIZER_TYPES)}")
    if not tokenizer_model:
        raise DataError(f"tokenizer type {tokenizer_type!r} needs a model file: pass --tokenizer-model PATH")
    if not os.path.isfile(tokenizer_model):
        raise DataError(f"tokenizer model {tokenizer_model!r} does not exist; check --tokenizer-model")
    if tokenizer_type == "hf":
        return HFTokenizer(tokenizer_model)
    return SentencePieceTokenizer(tokenizer_model)


def optimal_token_dtype(vocab_size: int) -> np.dtype:
    """On-disk token dtype, as Megatron chooses it: uint16 below 65500 ids, else int32."""
    return np.dtype(np.uint16) if vocab_size < 65500 else np.dtype(np.int32)
