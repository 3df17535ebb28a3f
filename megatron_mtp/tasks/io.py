"""Reading and writing task files; writes are whole or not at all (the data layer's atomic writer)."""
from __future__ import annotations

import json
import os

from megatron_mtp.data.index_cache import write_text_atomic


def write_jsonl(path: str, records: list) -> str:
    """One JSON object per line."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    write_text_atomic(path, "".join(json.dumps(r, separators=(",", ":")) + "\n" for r in records))
    return path


def write_json(path: str, record: dict) -> str:
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    write_text_atomic(path, json.dumps(record, indent=1) + "\n")
    return path


def read_jsonl(path: str) -> list:
    with open(path) as stream:
        return [json.loads(line) for line in stream if line.strip()]
