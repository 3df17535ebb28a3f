"""Reading and writing task files; writes are whole or not at all (``megatron_mtp.io_utils``)."""
from __future__ import annotations

import json
import os

from megatron_mtp.io_utils import atomic_write_json, atomic_write_text


def write_jsonl(path: str, records: list) -> str:
    """One JSON object per line."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    atomic_write_text(path, "".join(json.dumps(r, separators=(",", ":")) + "\n" for r in records))
    return path


def write_json(path: str, record: dict) -> str:
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    atomic_write_json(path, record)
    return path


def read_jsonl(path: str) -> list:
    with open(path) as stream:
        return [json.loads(line) for line in stream if line.strip()]
