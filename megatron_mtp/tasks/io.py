"""Writing task files whole or not at all (the data layer's atomic writer)."""
from __future__ import annotations

import json
import os

from megatron_mtp.data.index_cache import write_text_atomic


def write_jsonl(path: str, records: list, as_lines: bool = True) -> str:
    """One JSON object per line (or, with ``as_lines=False``, the single record as indented JSON)."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    if as_lines:
        text = "".join(json.dumps(r, separators=(",", ":")) + "\n" for r in records)
    else:
        text = json.dumps(records[0], indent=1) + "\n"
    write_text_atomic(path, text)
    return path
