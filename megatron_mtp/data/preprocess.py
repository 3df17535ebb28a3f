"""Tokenise JSONL corpora into Megatron ``{prefix}_{key}_document.bin/.idx`` files, in parallel.

The main process reads raw line chunks and writes the outputs; a ``multiprocessing`` pool parses and
tokenises the chunks (``imap``, ordered, so the output order equals the input order whatever the
number of workers). Workers send back one compact numpy buffer per chunk and key, not lists of ints.

Outputs are written under temporary names and renamed only after every input line was processed, so
an interrupted or failed run never leaves a valid-looking dataset behind. Each output gets a
``{prefix}.tokenizer_info.json`` beside it recording the tokenizer (type, vocabulary size, content hash):
training refuses data whose record names another tokenizer than its own.
"""
from __future__ import annotations

import multiprocessing
import os
import sys
import threading
import time
from contextlib import closing
from dataclasses import dataclass, field
from typing import Iterator, Optional, Sequence, Union

import numpy as np

from megatron_mtp.data.errors import DataError
from megatron_mtp.data.indexed_dataset import IndexedDatasetBuilder
from megatron_mtp.data.jsonl import LineChunk, expand_inputs, iter_line_chunks, parse_lines
from megatron_mtp.data.tokenizers import (build_tokenizer, optimal_token_dtype, resolve_tokenizer_spec,
                                          tokenizer_info_path, write_tokenizer_info)

MAX_REPORTED_BAD_LINES = 5


@dataclass
class EncodedChunk:
    """What a worker returns for one LineChunk."""

    file_index: int
    num_bytes: int
    tokens: dict[str, np.ndarray]  # key -> all documents' tokens concatenated
    lengths: dict[str, np.ndarray]  # key -> tokens per document (int32)
    bad: list[tuple[int, str]]
    empty: int  # documents that tokenised to nothing and were skipped


@dataclass
class PreprocessStats:
    output_prefixes: dict[str, str]
    tokenizer: str = ""  # e.g. "hf tokenizer (vocab 8192, sha256 ...)"
    documents: int = 0
    tokens: int = 0
    input_bytes: int = 0
    empty_documents: int = 0
    bad_lines: int = 0
    bad_examples: list[str] = field(default_factory=list)  # "path:line: reason" for the first few
    seconds: float = 0.0
    dtype: str = ""

    @property
    def mb_per_s(self) -> float:
        return self.input_bytes / 1e6 / max(self.seconds, 1e-9)

    def summary(self) -> str:
        lines = [
            f"wrote {self.documents} documents, {self.tokens} tokens ({self.dtype}) from "
            f"{self.input_bytes / 1e6:.1f} MB in {self.seconds:.1f}s "
            f"({self.documents / max(self.seconds, 1e-9):.0f} docs/s, {self.mb_per_s:.2f} MB/s)"
        ]
        lines.append(f"tokenised with the {self.tokenizer}")
        lines += [f"  {key}: {prefix}.bin/.idx" for key, prefix in self.output_prefixes.items()]
        if self.empty_documents:
            lines.append(f"skipped {self.empty_documents} empty documents")
        if self.bad_lines:
            lines.append(f"skipped {self.bad_lines} bad lines, first ones:")
            lines += [f"  {example}" for example in self.bad_examples]
        return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# Worker side: one tokenizer per process, built by the pool initializer.

_worker: dict = {}


def _init_worker(tokenizer_type: str, tokenizer_model: Optional[str], keys: Sequence[str], append_eod: bool,
                 dtype: str, single_threaded: bool) -> None:
    if single_threaded:
        # N worker processes already use N cores; stop HF tokenizers from adding its own thread pool.
        os.environ["TOKENIZERS_PARALLELISM"] = "false"
    tokenizer = build_tokenizer(tokenizer_type, tokenizer_model)
    _worker.update(tokenizer=tokenizer, keys=list(keys), append_eod=append_eod, dtype=np.dtype(dtype))


def _encode_chunk(chunk: LineChunk) -> EncodedChunk:
    tokenizer, keys, dtype = _worker["tokenizer"], _worker["keys"], _worker["dtype"]
    parsed = parse_lines(chunk, keys)
    bad = list(parsed.bad)
    tokens: dict[str, np.ndarray] = {}
    lengths: dict[str, np.ndarray] = {}
    empty = 0
    for key in keys:
        documents = _encode_texts(tokenizer, parsed.texts[key], parsed.line_numbers, dtype, bad)
        if _worker["append_eod"]:
            eod = np.array([tokenizer.eod], dtype=dtype)
            documents = [np.concatenate([doc, eod]) if doc is not None and doc.size else doc for doc in documents]
        kept = [doc for doc in documents if doc is not None and doc.size]
        empty += sum(1 for doc in documents if doc is not None and not doc.size)
        tokens[key] = np.concatenate(kept) if kept else np.zeros(0, dtype=dtype)
        lengths[key] = np.array([doc.size for doc in kept], dtype=np.int32)
    bad.sort()
    return EncodedChunk(chunk.file_index, chunk.num_bytes, tokens, lengths, bad, empty)


def _encode_texts(tokenizer, texts, line_numbers, dtype, bad) -> list[Optional[np.ndarray]]:
    """Batch-encode; if the batch fails (e.g. a lone surrogate in the JSON), find and report the culprits."""
    try:
        return tokenizer.encode_batch_arrays(texts, dtype)
    except Exception:
        documents: list[Optional[np.ndarray]] = []
        for text, line_number in zip(texts, line_numbers):
            try:
                documents.append(tokenizer.encode_batch_arrays([text], dtype)[0])
            except Exception as exc:
                bad.append((line_number, f"text could not be tokenised ({type(exc).__name__}: {exc})"))
                documents.append(None)
        return documents


# ---------------------------------------------------------------------------------------------
# Main process.


def output_prefix_for(output_prefix: str, key: str) -> str:
    """Megatron's naming: one dataset per JSON key, at document level."""
    return f"{output_prefix}_{key}_document"


def preprocess(
    input: Union[str, Sequence[str]],
    output_prefix: str,
    tokenizer_type: Optional[str] = None,
    tokenizer_model: Optional[str] = None,
    json_keys: Sequence[str] = ("text",),
    workers: int = 1,
    append_eod: bool = False,
    strict: bool = False,
    log_interval: int = 1000,
    progress: bool = True,
    chunk_bytes: int = 1 << 19,
) -> PreprocessStats:
    """Tokenise ``input`` (.jsonl/.jsonl.gz paths or globs) into ``{output_prefix}_{key}_document.bin/.idx``.

    ``tokenizer_type`` None infers it from ``tokenizer_model`` (byte level when there is no model); a type
    that contradicts the model file is a ``DataError`` before anything is read.

    Bad lines (invalid UTF-8 or JSON, missing key) are skipped, counted and reported; with ``strict`` the
    first one raises ``DataError`` and no output file is written. ``workers <= 1`` tokenises in-process.
    """
    paths = expand_inputs(input)
    keys = list(json_keys)
    tokenizer_type, tokenizer_model = resolve_tokenizer_spec(tokenizer_type, tokenizer_model)
    tokenizer = build_tokenizer(tokenizer_type, tokenizer_model)  # fail early, in the parent, on a bad model
    dtype = optimal_token_dtype(tokenizer.vocab_size)
    prefixes = {key: output_prefix_for(output_prefix, key) for key in keys}
    stats = PreprocessStats(output_prefixes=prefixes, tokenizer=tokenizer.describe(), dtype=str(dtype))
    total_bytes = None if any(p.endswith(".gz") for p in paths) else sum(os.path.getsize(p) for p in paths)
    init_args = (tokenizer_type, tokenizer_model, keys, append_eod, dtype.str, workers > 1)

    start = time.perf_counter()
    for prefix in prefixes.values():
        # An old record must not outlive the data it described: it goes now, the new one comes after the data.
        if os.path.exists(tokenizer_info_path(prefix)):
            os.remove(tokenizer_info_path(prefix))
    builders = {key: IndexedDatasetBuilder(prefix, dtype) for key, prefix in prefixes.items()}
    bar = _progress_bar(total_bytes, progress)
    next_log = log_interval
    try:
        # closing(): on an error, shut the worker pool down now, not whenever the traceback is freed.
        with closing(_encoded_chunks(paths, init_args, workers, chunk_bytes)) as encoded_chunks:
            for encoded in encoded_chunks:
                _record_bad_lines(stats, encoded, paths, strict)
                for key, builder in builders.items():
                    builder.add_documents(encoded.tokens[key], encoded.lengths[key])
                stats.documents += len(encoded.lengths[keys[0]])
                stats.tokens += sum(int(encoded.lengths[key].sum(dtype=np.int64)) for key in keys)
                stats.input_bytes += encoded.num_bytes
                stats.empty_documents += encoded.empty
                bar.update(encoded.num_bytes)
                if stats.documents >= next_log:
                    next_log = stats.documents + log_interval
                    _show_rates(bar, stats, start)
        for builder in builders.values():
            builder.finalize()
        for prefix in prefixes.values():
            source = os.path.abspath(tokenizer_model) if tokenizer_model else None
            write_tokenizer_info(prefix, tokenizer, source=source)
        _show_rates(bar, stats, start)
    except BaseException:
        for builder in builders.values():
            builder.abort()
        raise
    finally:
        bar.close()
    stats.seconds = time.perf_counter() - start
    return stats


def _encoded_chunks(paths, init_args, workers: int, chunk_bytes: int) -> Iterator[EncodedChunk]:
    chunks = iter_line_chunks(paths, chunk_bytes=chunk_bytes)
    if workers <= 1:
        _init_worker(*init_args)
        yield from map(_encode_chunk, chunks)
        return
    # Pool.imap drains its input from a helper thread as fast as it can; without this bound a large
    # corpus would be read into memory ahead of the workers. The semaphore keeps a few chunks in flight.
    in_flight = threading.BoundedSemaphore(4 * workers)
    stopping = threading.Event()

    def throttled():
        for chunk in chunks:
            # Poll so that the pool's feeder thread can exit (and the pool shut down) after an error.
            while not in_flight.acquire(timeout=0.1):
                if stopping.is_set():
                    return
            yield chunk

    # "spawn": workers start clean instead of inheriting the parent's threads and locks (HF tokenizers'
    # thread pool is not fork-safe); the start-up cost is well under a second.
    context = multiprocessing.get_context("spawn")
    with context.Pool(workers, initializer=_init_worker, initargs=init_args) as pool:
        try:
            for encoded in pool.imap(_encode_chunk, throttled(), chunksize=1):
                in_flight.release()
                yield encoded
        finally:
            stopping.set()


def _record_bad_lines(stats: PreprocessStats, encoded: EncodedChunk, paths, strict: bool) -> None:
    for line_number, reason in encoded.bad:
        where = f"{paths[encoded.file_index]}:{line_number}"
        if strict:
            raise DataError(f"{where}: {reason} (--strict stops at the first bad line; fix it or drop --strict to skip bad lines)")
        stats.bad_lines += 1
        if len(stats.bad_examples) < MAX_REPORTED_BAD_LINES:
            stats.bad_examples.append(f"{where}: {reason}")


def _show_rates(bar, stats: PreprocessStats, start: float) -> None:
    elapsed = max(time.perf_counter() - start, 1e-9)
    bar.set_postfix(docs=stats.documents, docs_s=f"{stats.documents / elapsed:.0f}",
                    MB_s=f"{stats.input_bytes / 1e6 / elapsed:.2f}", bad=stats.bad_lines)


def _progress_bar(total_bytes: Optional[int], enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total_bytes, unit="B", unit_scale=True, desc="tokenising", disable=not enabled,
                file=sys.stderr, dynamic_ncols=True)
