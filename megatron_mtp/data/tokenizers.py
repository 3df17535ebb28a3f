"""Tokenizers behind one small interface: ``encode``, ``decode``, ``vocab_size``, ``eod``.

Three back-ends:

* ``byte``          UTF-8 bytes 0..255 plus two specials (EOD 256, pad 257); needs no files, so the
                    default corpus works on any machine (and matches the paper's byte-level models).
* ``hf``            a HuggingFace ``tokenizers`` ``tokenizer.json`` (e.g. from tools/train_tokenizer.py), or a
                    directory holding one (what ``save_pretrained`` writes).
* ``sentencepiece`` a SentencePiece ``.model`` file (Llama-style), or a directory holding ``tokenizer.model``.

The type may be left out: ``resolve_tokenizer_spec`` infers it from the model path (``*.json`` or a
directory with ``tokenizer.json`` -> hf, ``*.model`` or a directory with ``tokenizer.model`` -> sentencepiece,
no model -> byte), and refuses a type that contradicts the file. Every tokenizer has a ``fingerprint``
(type, vocabulary size, EOD and a hash of its content); preprocessing stores it beside the ``.bin/.idx``
(``{prefix}.tokenizer_info.json``) so training can refuse data made with another tokenizer.

``encode_batch_arrays`` is the hot path used by preprocessing: it returns numpy arrays already in the
on-disk dtype so workers ship compact buffers back instead of lists of Python ints.
"""
from __future__ import annotations

import hashlib
import json
import os
from typing import Optional, Sequence

import numpy as np

# Neither megatron_mtp.config nor io_utils: both import torch, which preprocessing workers (they import this
# module) must not pay for. Hence index_cache's writer, and the byte vocabulary restated below.
from megatron_mtp.io_utils import atomic_write_text
from megatron_mtp.errors import ConfigError, DataError

TOKENIZER_TYPES = ("byte", "hf", "sentencepiece")

# Names under which tokenizer files commonly carry their end-of-document token, most specific first.
EOD_TOKEN_CANDIDATES = ("<|endoftext|>", "<|end_of_text|>", "</s>", "<eos>", "<|eot_id|>")
# The file a tokenizer directory holds for each type (HuggingFace save_pretrained names).
MODEL_FILE_NAMES = {"hf": "tokenizer.json", "sentencepiece": "tokenizer.model"}
# Files of an HF tokenizer directory worth carrying along (copied into run directories and exports).
HF_SIDE_FILES = ("tokenizer_config.json", "special_tokens_map.json")
# A run directory's own copy of its tokenizer; its config.yaml names it by this relative path.
RUN_TOKENIZER_DIR = "tokenizer"
TOKENIZER_INFO_SUFFIX = ".tokenizer_info.json"
TOKENIZER_INFO_FORMAT = "megatron_mtp.tokenizer_info/1"


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

    def content_hash(self) -> str:
        raise NotImplementedError

    def fingerprint(self) -> dict:
        """What identifies this tokenizer's ids: two tokenizers with equal fingerprints tokenise alike."""
        return {"type": self.name, "vocab_size": int(self.vocab_size), "eod": int(self.eod),
                "sha256": self.content_hash()}

    def describe(self) -> str:
        return f"{self.name} tokenizer (vocab {self.vocab_size}, sha256 {self.content_hash()[:12]})"

    def __repr__(self) -> str:
        return f"{type(self).__name__}(vocab_size={self.vocab_size}, eod={self.eod})"


class ByteTokenizer(Tokenizer):
    """UTF-8 bytes as tokens; ids 256 (EOD) and 257 (pad) are the only specials."""

    name = "byte"
    vocab_size = 258  # = config.BYTE_VOCAB_SIZE (tests/test_user_data.py checks they agree)
    eod = 256
    pad = 257

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: Sequence[int]) -> str:
        # Specials have no bytes; a byte sequence cut mid-character decodes with U+FFFD, not an error.
        return bytes(i for i in ids if 0 <= i < 256).decode("utf-8", errors="replace")

    def content_hash(self) -> str:
        return hashlib.sha256(b"megatron_mtp byte tokenizer: bytes 0-255, eod 256, pad 257").hexdigest()

    def encode_batch_arrays(self, texts: Sequence[str], dtype: np.dtype) -> list[np.ndarray]:
        # Zero-copy view of the UTF-8 bytes, widened once to the on-disk dtype.
        return [np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(dtype) for text in texts]


class HFTokenizer(Tokenizer):
    """A HuggingFace ``tokenizers`` tokenizer.json (or a directory holding one); its EOD is the directory's
    ``tokenizer_config.json`` ``eos_token`` when there is one, else the first known end-of-text token."""

    name = "hf"

    def __init__(self, path: str):
        from tokenizers import Tokenizer as _HFTokenizer

        self.path = path
        self.directory = path if os.path.isdir(path) else None
        self.file = os.path.join(path, MODEL_FILE_NAMES["hf"]) if self.directory else path
        try:
            self._tokenizer = _HFTokenizer.from_file(self.file)
        except Exception as exc:  # the library's message is a Rust error string; name the file instead
            raise DataError(f"could not load HuggingFace tokenizer {self.file!r} ({exc}); pass a tokenizer.json "
                            f"file or a directory holding one") from exc
        self.vocab_size = self._tokenizer.get_vocab_size(with_added_tokens=True)
        configured = _configured_special(self.directory, "eos_token")
        eod = self._tokenizer.token_to_id(configured) if configured else None
        self.eod = eod if eod is not None else _find_special(self._tokenizer.token_to_id, path)
        configured_pad = _configured_special(self.directory, "pad_token")
        pad = self._tokenizer.token_to_id(configured_pad) if configured_pad else None
        for name in ("<|pad|>", "<pad>"):
            pad = pad if pad is not None else self._tokenizer.token_to_id(name)
        self.pad = pad

    def content_hash(self) -> str:
        # Hash the parsed JSON parts that decide the ids we store (encode without special tokens), not the
        # bytes: the same tokenizer saved pretty-printed or compact, or re-saved by transformers' save_pretrained
        # (which adds a post-processor for add_special_tokens=True), keeps its fingerprint.
        with open(self.file, "rb") as stream:
            content = json.loads(stream.read())
        content = {key: content.get(key) for key in ("added_tokens", "normalizer", "pre_tokenizer", "model")}
        canonical = json.dumps(content, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
        extra = f"|eod={self.eod}|pad={self.pad}"
        return hashlib.sha256((canonical + extra).encode("utf-8")).hexdigest()

    def token_name(self, token_id: Optional[int]) -> Optional[str]:
        return None if token_id is None else self._tokenizer.id_to_token(token_id)

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

        self.path = path
        self.directory = path if os.path.isdir(path) else None
        self.file = os.path.join(path, MODEL_FILE_NAMES["sentencepiece"]) if self.directory else path
        try:
            self._processor = spm.SentencePieceProcessor(model_file=self.file)
        except Exception as exc:
            raise DataError(f"could not load SentencePiece model {self.file!r} ({exc}); pass a .model file or a "
                            f"directory holding tokenizer.model") from exc
        self.vocab_size = self._processor.get_piece_size()
        eos = self._processor.eos_id()
        if eos >= 0:
            self.eod = eos
        else:
            self.eod = _find_special(self._piece_id_or_none, path)
        pad = self._processor.pad_id()
        self.pad = pad if pad >= 0 else None

    def content_hash(self) -> str:
        with open(self.file, "rb") as stream:
            return hashlib.sha256(stream.read()).hexdigest()

    def token_name(self, token_id: Optional[int]) -> Optional[str]:
        return None if token_id is None else self._processor.id_to_piece(int(token_id))

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
        "add one as a special token, e.g. retrain with mtp-train-tokenizer"
    )


def _configured_special(directory: Optional[str], key: str) -> Optional[str]:
    """The special token an HF directory's tokenizer_config.json names under ``key`` (a string or an
    AddedToken dict), or None. A hostile file can only make this return None: it is parsed as JSON."""
    if directory is None:
        return None
    path = os.path.join(directory, "tokenizer_config.json")
    try:
        with open(path, encoding="utf-8") as stream:
            value = json.load(stream).get(key)
    except (OSError, ValueError, AttributeError):
        return None
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def infer_tokenizer_type(tokenizer_model: str) -> str:
    """'hf' or 'sentencepiece' from a model path: a directory by the file it holds, a file by its name."""
    if os.path.isdir(tokenizer_model):
        for tokenizer_type, name in MODEL_FILE_NAMES.items():
            if os.path.isfile(os.path.join(tokenizer_model, name)):
                return tokenizer_type
        raise DataError(f"tokenizer directory {tokenizer_model!r} holds neither tokenizer.json (hf) nor "
                        f"tokenizer.model (sentencepiece); pass the tokenizer file itself")
    if not os.path.isfile(tokenizer_model):
        raise DataError(f"tokenizer model {tokenizer_model!r} does not exist; check the tokenizer model path")
    name = os.path.basename(tokenizer_model).lower()
    if name.endswith(".json"):
        return "hf"
    if name.endswith(".model"):
        return "sentencepiece"
    raise DataError(f"cannot tell the type of tokenizer {tokenizer_model!r} from its name (expected a .json or "
                    f".model file); give the tokenizer type explicitly (hf or sentencepiece)")


def resolve_tokenizer_spec(tokenizer_type: Optional[str], tokenizer_model: Optional[str]) -> tuple:
    """``(type, model)`` with the type inferred when missing and checked against the model when given.

    No type and no model means byte level; a type that contradicts the model file (e.g. ``hf`` with a
    SentencePiece ``.model``), ``byte`` with a model, or ``hf``/``sentencepiece`` without one are errors.
    """
    if tokenizer_type is not None and tokenizer_type not in TOKENIZER_TYPES:
        raise DataError(f"unknown tokenizer type {tokenizer_type!r}; choose one of {', '.join(TOKENIZER_TYPES)}")
    if not tokenizer_model:
        if tokenizer_type in (None, "byte"):
            return "byte", None
        raise DataError(f"tokenizer type {tokenizer_type!r} needs a model file: pass --tokenizer-model PATH "
                        f"(data.tokenizer_model in a config)")
    if tokenizer_type == "byte":
        raise DataError(f"the byte tokenizer takes no model file, but {tokenizer_model!r} was given: drop the "
                        f"tokenizer type to use that file (its type is inferred), or drop the model file")
    inferred = infer_tokenizer_type(tokenizer_model)
    if tokenizer_type is not None and tokenizer_type != inferred:
        raise DataError(f"tokenizer type {tokenizer_type!r} does not match {tokenizer_model!r}, which is a "
                        f"{inferred} tokenizer; fix the type or leave it out to infer it")
    return inferred, tokenizer_model


def build_tokenizer(tokenizer_type: Optional[str], tokenizer_model: Optional[str] = None) -> Tokenizer:
    """The tokenizer of ``tokenizer_type`` ('byte', 'hf', 'sentencepiece' or None = inferred from the model
    path) loaded from ``tokenizer_model`` (a file or a directory)."""
    tokenizer_type, tokenizer_model = resolve_tokenizer_spec(tokenizer_type, tokenizer_model)
    if tokenizer_type == "byte":
        return ByteTokenizer()
    if tokenizer_type == "hf":
        return HFTokenizer(tokenizer_model)
    return SentencePieceTokenizer(tokenizer_model)


def resolve_config_tokenizer(cfg) -> Tokenizer:
    """Load the config's tokenizer and make the config agree with it, before a run writes anything:
    ``data.tokenizer_type`` becomes explicit and ``model.vocab_size`` is the tokenizer's when unset (None)
    or checked to be at least the tokenizer's when set (larger is allowed: the extra rows are padding).

    With no tokenizer configured at all (neither type nor model: byte level by default), a smaller vocab_size
    is taken as given: the data was tokenised elsewhere, and its largest token id is checked against it.
    """
    configured = cfg.data.tokenizer_type is not None or bool(cfg.data.tokenizer_model)
    tokenizer = build_tokenizer(cfg.data.tokenizer_type, cfg.data.tokenizer_model)
    cfg.data.tokenizer_type = tokenizer.name
    if cfg.model.vocab_size is None:
        cfg.model.vocab_size = int(tokenizer.vocab_size)
    elif cfg.model.vocab_size < tokenizer.vocab_size and configured:
        raise ConfigError(f"model.vocab_size ({cfg.model.vocab_size}) is smaller than the vocabulary of the "
                          f"{tokenizer.describe()}: leave model.vocab_size out to take the tokenizer's, or set it "
                          f"to at least {tokenizer.vocab_size}.")
    return tokenizer


def tokenizer_files(tokenizer: Tokenizer) -> dict:
    """{name in a copy: source path} of everything that makes up ``tokenizer`` on disk, under the names a
    HuggingFace tokenizer directory uses (tokenizer.json / tokenizer.model, plus an HF directory's configs)."""
    if tokenizer.name == "byte":
        return {}
    files = {MODEL_FILE_NAMES[tokenizer.name]: tokenizer.file}
    if tokenizer.directory:
        for name in HF_SIDE_FILES:
            if os.path.isfile(os.path.join(tokenizer.directory, name)):
                files[name] = os.path.join(tokenizer.directory, name)
    return files


# ---------------------------------------------------------------------------------------------
# A run directory's own copy of the tokenizer


def locate_tokenizer_model(tokenizer_model: Optional[str], run_dir: Optional[str]) -> Optional[str]:
    """Where a run's ``data.tokenizer_model`` is, seen from the current directory.

    A relative path is looked up in the run directory first (a run's config.yaml names its own copy,
    ``tokenizer``), then in the current directory (a user's config, as Megatron reads paths). An absolute
    path that no longer exists (the run was moved or copied to another machine) falls back to the run's
    own copy when it has one.
    """
    if not tokenizer_model or not run_dir:
        return tokenizer_model
    if not os.path.isabs(tokenizer_model):
        in_run = os.path.join(run_dir, tokenizer_model)
        return in_run if os.path.exists(in_run) else tokenizer_model
    own = os.path.join(run_dir, RUN_TOKENIZER_DIR)
    if not os.path.exists(tokenizer_model) and os.path.isdir(own):
        return own
    return tokenizer_model


def install_run_tokenizer(tokenizer: Tokenizer, run_dir: str) -> Optional[str]:
    """Copy ``tokenizer``'s files into ``run_dir/tokenizer/`` (once, atomically: built under a temporary name
    and renamed) and return the path a config names it by, relative to the run directory; None at byte level.

    A run directory that already holds another tokenizer is refused: its checkpoints were trained with that one.
    """
    if tokenizer.name == "byte":
        return None
    destination = os.path.join(run_dir, RUN_TOKENIZER_DIR)
    if os.path.isdir(destination):
        present = build_tokenizer(None, destination)
        if present.content_hash() != tokenizer.content_hash():
            raise DataError(f"{destination} holds the {present.describe()}, but this run was given the "
                            f"{tokenizer.describe()}; the run directory's checkpoints were trained with its own: "
                            f"drop data.tokenizer_model to keep it, or train in a new train.run_dir")
        return RUN_TOKENIZER_DIR
    import shutil

    work = f"{destination}.tmp-{os.getpid()}"
    shutil.rmtree(work, ignore_errors=True)
    os.makedirs(work)
    try:
        for name, source in tokenizer_files(tokenizer).items():
            shutil.copyfile(source, os.path.join(work, name))
            os.chmod(os.path.join(work, name), 0o644)
        os.rename(work, destination)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    return RUN_TOKENIZER_DIR


# ---------------------------------------------------------------------------------------------
# The record of which tokenizer made a dataset, beside its .bin/.idx


def tokenizer_info_path(prefix: str) -> str:
    return prefix + TOKENIZER_INFO_SUFFIX


def write_tokenizer_info(prefix: str, tokenizer: Tokenizer, source: Optional[str] = None) -> str:
    path = tokenizer_info_path(prefix)
    record = {"format": TOKENIZER_INFO_FORMAT, **tokenizer.fingerprint(), "source": source}
    atomic_write_text(path, json.dumps(record, indent=1) + "\n")
    return path


def read_tokenizer_info(prefix: str) -> Optional[dict]:
    """The fingerprint stored beside ``prefix``'s .bin/.idx, or None when there is none (data made by
    Megatron-LM or an older megatron_mtp)."""
    path = tokenizer_info_path(prefix)
    if not os.path.isfile(path):
        return None
    try:
        with open(path, encoding="utf-8") as stream:
            record = json.load(stream)
    except (OSError, ValueError) as exc:
        raise DataError(f"{path} is not readable JSON ({exc}); delete it, or preprocess {prefix} again") from None
    if not isinstance(record, dict) or record.get("format") != TOKENIZER_INFO_FORMAT or "sha256" not in record:
        raise DataError(f"{path} is not a megatron_mtp tokenizer record; delete it, or preprocess {prefix} again")
    return record


def check_data_tokenizer(prefix: str, tokenizer: Tokenizer) -> bool:
    """Raise if ``prefix`` was tokenised by another tokenizer than ``tokenizer``; False if it has no record."""
    record = read_tokenizer_info(prefix)
    if record is None:
        return False
    if record["sha256"] != tokenizer.content_hash():
        source = f" {record['source']}" if record.get("source") else ""
        made_by = (f"the {record.get('type')} tokenizer{source} (vocab {record.get('vocab_size')}, "
                   f"sha256 {str(record['sha256'])[:12]})")
        raise DataError(f"{prefix} was tokenised with {made_by}, but training uses the {tokenizer.describe()}: "
                        f"preprocess it again with the training tokenizer, or set data.tokenizer_model to the one "
                        f"that made it")
    return True


def optimal_token_dtype(vocab_size: int) -> np.dtype:
    """On-disk token dtype, as Megatron chooses it: uint16 below 65500 ids, else int32."""
    return np.dtype(np.uint16) if vocab_size < 65500 else np.dtype(np.int32)
