"""On-disk cache for sampling indices: ``.npy`` files keyed by a hash of what they were built from.

Every rank may build the same index at the same time (it is deterministic and takes seconds), so
writes go to a unique temporary name and are renamed into place: readers see a complete file or none.
"""
from __future__ import annotations

import hashlib
import json
import os
from typing import Callable, Optional

import numpy as np

from megatron_mtp.io_utils import atomic_write, atomic_write_text


def description_hash(description: dict) -> str:
    """Stable short hash of a JSON-serialisable description (sorted keys, so order does not matter)."""
    return hashlib.sha256(json.dumps(description, sort_keys=True).encode()).hexdigest()[:20]


def save_npy_atomic(path: str, array: np.ndarray) -> None:
    atomic_write(path, lambda stream: np.save(stream, array))


def cached_arrays(
    cache_dir: Optional[str],
    stem: str,
    description: dict,
    names: tuple[str, ...],
    build: Callable[[], tuple[np.ndarray, ...]],
) -> tuple[np.ndarray, ...]:
    """Load arrays ``names`` for ``description`` from ``cache_dir``, or ``build`` them and save them.

    Without a ``cache_dir`` the arrays are built in memory every time. Cached arrays are memory-mapped
    read-only, so many ranks on one node share one copy through the page cache.
    """
    if cache_dir is None:
        return build()
    key = description_hash(description)
    paths = [os.path.join(cache_dir, f"{stem}-{key}-{name}.npy") for name in names]
    if all(os.path.isfile(path) for path in paths):
        try:
            return tuple(np.load(path, mmap_mode="r") for path in paths)
        except (ValueError, OSError):
            pass  # unreadable (e.g. disk filled while another process wrote it): rebuild below
    arrays = build()
    os.makedirs(cache_dir, exist_ok=True)
    atomic_write_text(os.path.join(cache_dir, f"{stem}-{key}.json"), json.dumps(description, indent=2, sort_keys=True))
    for path, array in zip(paths, arrays):
        save_npy_atomic(path, np.ascontiguousarray(array))
    return arrays
