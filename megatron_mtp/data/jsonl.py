"""Reading JSONL corpora: input globs, plain or gzip files, line chunks, per-line parsing.

Lines are read as bytes and decoded in the worker that parses them, so a non-UTF-8 line is reported
with its line number instead of aborting the whole read.
"""
from __future__ import annotations

import glob
import gzip
import json
import os
from dataclasses import dataclass, field
from typing import IO, Iterator, Sequence, Union

from megatron_mtp.data.errors import DataError


def expand_inputs(inputs: Union[str, Sequence[str]]) -> list[str]:
    """Files matching ``inputs`` (paths or globs), sorted so the document order is reproducible."""
    patterns = [inputs] if isinstance(inputs, str) else list(inputs)
    paths: list[str] = []
    for pattern in patterns:
        matches = sorted(glob.glob(pattern)) if glob.has_magic(pattern) else [pattern]
        matches = [m for m in matches if os.path.isfile(m)]
        if not matches:
            raise DataError(f"input {pattern!r} matches no file; check --input (a .jsonl/.jsonl.gz path or glob)")
        paths.extend(matches)
    return paths


def open_binary(path: str) -> IO[bytes]:
    return gzip.open(path, "rb") if path.endswith(".gz") else open(path, "rb")


def iter_jsonl_texts(paths: Union[str, Sequence[str]], key: str = "text") -> Iterator[str]:
    """Every valid document's ``key`` field, in order; bad lines are skipped (for tokenizer training)."""
    for path in expand_inputs(paths):
        with open_binary(path) as stream:
            for raw in stream:
                try:
                    value = json.loads(raw).get(key)
                except (ValueError, AttributeError):
                    continue
                if isinstance(value, str):
                    yield value


@dataclass
class LineChunk:
    """A run of consecutive raw lines from one file: the unit of work sent to a worker."""

    file_index: int
    first_line: int  # 1-based number of lines[0] in its file
    lines: list[bytes]
    num_bytes: int


def iter_line_chunks(paths: Sequence[str], chunk_bytes: int = 1 << 19, max_lines: int = 4096) -> Iterator[LineChunk]:
    """Cut the inputs into chunks of about ``chunk_bytes`` (or ``max_lines``), never spanning two files."""
    for file_index, path in enumerate(paths):
        with open_binary(path) as stream:
            lines: list[bytes] = []
            size = 0
            first = 1
            for line_number, raw in enumerate(stream, start=1):
                lines.append(raw)
                size += len(raw)
                if size >= chunk_bytes or len(lines) >= max_lines:
                    yield LineChunk(file_index, first, lines, size)
                    lines, size, first = [], 0, line_number + 1
            if lines:
                yield LineChunk(file_index, first, lines, size)


@dataclass
class ParsedLines:
    texts: dict[str, list[str]]
    line_numbers: list[int]  # line number of each parsed document, for reporting tokenizer failures
    bad: list[tuple[int, str]] = field(default_factory=list)  # (line number, reason)


def parse_lines(chunk: LineChunk, keys: Sequence[str]) -> ParsedLines:
    """Decode and parse each line; a bad line is recorded with its reason and skipped. Blank lines are ignored."""
    parsed = ParsedLines({key: [] for key in keys}, [])
    for offset, raw in enumerate(chunk.lines):
        line_number = chunk.first_line + offset
        if not raw.strip():
            continue
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            parsed.bad.append((line_number, f"not valid UTF-8 (byte {exc.start})"))
            continue
        try:
            record = json.loads(text)
        except json.JSONDecodeError as exc:
            parsed.bad.append((line_number, f"invalid JSON ({exc.msg} at column {exc.colno})"))
            continue
        if not isinstance(record, dict):
            parsed.bad.append((line_number, f"a JSON {type(record).__name__}, not an object"))
            continue
        problem = _missing_or_wrong(record, keys)
        if problem:
            parsed.bad.append((line_number, problem))
            continue
        for key in keys:
            parsed.texts[key].append(record[key])
        parsed.line_numbers.append(line_number)
    return parsed


def _missing_or_wrong(record: dict, keys: Sequence[str]) -> str:
    for key in keys:
        if key not in record:
            return f"missing key {key!r}"
        if not isinstance(record[key], str):
            return f"key {key!r} must hold a string, not {type(record[key]).__name__}"
    return ""
