"""The embedded default corpus: the Python standard library's own source files.

Every machine that runs this code has them, so the README's main job trains on real code without a
download. One ``.py`` file is one document ``{"text": ..., "path": ...}``; about 2% of the files,
chosen by a hash of their relative path (stable across machines and Python patch releases), are held
out for validation / perplexity.
"""
from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import sys
import sysconfig
from contextlib import contextmanager
from typing import Iterator, Optional

from megatron_mtp.data.errors import DataError

DEFAULT_HELDOUT_FRACTION = 0.02
CORPUS_FORMAT_VERSION = 2  # bump when the corpus contents or layout change, to rebuild caches (2: tokenizer records)
_SKIPPED_DIRS = {"site-packages", "dist-packages", "__pycache__"}
_TEST_DIRS = {"test", "tests", "idle_test"}


def stdlib_root() -> str:
    return sysconfig.get_paths()["stdlib"]


def iter_stdlib_files(root: Optional[str] = None, include_tests: bool = False) -> list[str]:
    """Relative paths of the standard library's .py files, sorted (the corpus order is reproducible)."""
    root = root or stdlib_root()
    found = []
    for directory, subdirs, files in os.walk(root):
        skipped = _SKIPPED_DIRS if include_tests else _SKIPPED_DIRS | _TEST_DIRS
        subdirs[:] = [d for d in subdirs if d not in skipped]
        for name in files:
            if name.endswith(".py"):
                found.append(os.path.relpath(os.path.join(directory, name), root))
    return sorted(found)


def heldout_score(relative_path: str) -> float:
    """A uniform number in [0, 1) fixed by the path alone; files scoring below the fraction are held out."""
    digest = hashlib.sha256(relative_path.replace(os.sep, "/").encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def write_code_corpus(
    output_dir: str,
    heldout_fraction: float = DEFAULT_HELDOUT_FRACTION,
    max_docs: Optional[int] = None,
    include_tests: bool = False,
    root: Optional[str] = None,
    progress: bool = False,
) -> dict:
    """Write ``stdlib_train.jsonl`` and ``stdlib_heldout.jsonl`` under ``output_dir``; return paths and counts.

    ``max_docs`` keeps the first N files (sorted order). At least one file is held out whenever
    there are two or more, so the held-out set is never empty.
    """
    from tqdm import tqdm

    root = root or stdlib_root()
    relative_paths = iter_stdlib_files(root, include_tests)[:max_docs]
    if not relative_paths:
        raise DataError(f"found no .py files under the standard library at {root}; pass data.paths explicitly")
    scores = {path: heldout_score(path) for path in relative_paths}
    heldout = {path for path in relative_paths if scores[path] < heldout_fraction}
    if not heldout and len(relative_paths) > 1 and heldout_fraction > 0:
        heldout = {min(relative_paths, key=scores.__getitem__)}

    os.makedirs(output_dir, exist_ok=True)
    outputs = {"train_jsonl": os.path.join(output_dir, "stdlib_train.jsonl"),
               "heldout_jsonl": os.path.join(output_dir, "stdlib_heldout.jsonl")}
    counts = {"train_docs": 0, "heldout_docs": 0, "skipped_empty": 0, "skipped_non_utf8": 0}
    with open(outputs["train_jsonl"], "w") as train, open(outputs["heldout_jsonl"], "w") as held:
        for relative in tqdm(relative_paths, desc="stdlib corpus", unit="file", disable=not progress):
            with open(os.path.join(root, relative), "rb") as stream:
                raw = stream.read()
            if not raw.strip():  # empty __init__.py files carry no code
                counts["skipped_empty"] += 1
                continue
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError:  # a few files declare other encodings; keep the corpus pure UTF-8
                counts["skipped_non_utf8"] += 1
                continue
            record = json.dumps({"text": text, "path": relative.replace(os.sep, "/")}, ensure_ascii=False)
            is_heldout = relative in heldout
            (held if is_heldout else train).write(record + "\n")
            counts["heldout_docs" if is_heldout else "train_docs"] += 1
    return {**outputs, **counts}


@contextmanager
def _exclusive_lock(path: str) -> Iterator[None]:
    """An advisory lock file: concurrent ranks wait for the first one's build instead of duplicating it."""
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _tokenizer_digest(tokenizer_type: Optional[str], tokenizer_model: Optional[str]) -> Optional[str]:
    if not tokenizer_model:
        return None
    from megatron_mtp.data.tokenizers import build_tokenizer

    return build_tokenizer(tokenizer_type, tokenizer_model).content_hash()[:16]


def ensure_stdlib_corpus(
    cache_dir: str,
    tokenizer_type: Optional[str] = None,
    max_docs: Optional[int] = None,
    tokenizer_model: Optional[str] = None,
    heldout_fraction: float = DEFAULT_HELDOUT_FRACTION,
    include_tests: bool = False,
    workers: int = 1,
    progress: bool = False,
) -> dict:
    """Build (once) the standard-library corpus and its .bin/.idx under ``cache_dir``; return its paths.

    Returns ``{"train_prefix", "heldout_prefix", "heldout_jsonl", "train_jsonl", "directory"}``; the
    prefixes go straight into ``data.paths``. The build happens in a temporary directory renamed into
    place when complete, under a lock file, so racing processes (several ranks) and killed runs are safe.
    """
    from megatron_mtp.data.preprocess import output_prefix_for, preprocess
    from megatron_mtp.data.tokenizers import resolve_tokenizer_spec

    tokenizer_type, tokenizer_model = resolve_tokenizer_spec(tokenizer_type, tokenizer_model)
    description = {
        "format": CORPUS_FORMAT_VERSION,
        "python": sys.version.split()[0],
        "stdlib": stdlib_root(),
        "tokenizer_type": tokenizer_type,
        "tokenizer_model": _tokenizer_digest(tokenizer_type, tokenizer_model),
        "max_docs": max_docs,
        "heldout_fraction": heldout_fraction,
        "include_tests": include_tests,
    }
    key = hashlib.sha256(json.dumps(description, sort_keys=True).encode()).hexdigest()[:12]
    name = f"stdlib-{tokenizer_type}-{key}"
    final_dir = os.path.join(cache_dir, name)
    result = {
        "directory": final_dir,
        "train_jsonl": os.path.join(final_dir, "stdlib_train.jsonl"),
        "heldout_jsonl": os.path.join(final_dir, "stdlib_heldout.jsonl"),
        "train_prefix": output_prefix_for(os.path.join(final_dir, "stdlib_train"), "text"),
        "heldout_prefix": output_prefix_for(os.path.join(final_dir, "stdlib_heldout"), "text"),
    }
    if os.path.isdir(final_dir):  # only ever created complete, by the rename below
        return result

    os.makedirs(cache_dir, exist_ok=True)
    with _exclusive_lock(os.path.join(cache_dir, f"{name}.lock")):
        if os.path.isdir(final_dir):  # another process finished it while we waited
            return result
        work_dir = f"{final_dir}.tmp-{os.getpid()}"
        shutil.rmtree(work_dir, ignore_errors=True)
        try:
            written = write_code_corpus(work_dir, heldout_fraction, max_docs, include_tests, progress=progress)
            for split in ("train", "heldout"):
                preprocess(written[f"{split}_jsonl"], os.path.join(work_dir, f"stdlib_{split}"),
                           tokenizer_type=tokenizer_type, tokenizer_model=tokenizer_model,
                           append_eod=True, workers=workers, progress=progress)
            with open(os.path.join(work_dir, "corpus.json"), "w") as stream:
                json.dump({**description, **{k: v for k, v in written.items() if k.endswith(("docs", "empty", "utf8"))}},
                          stream, indent=2)
            os.rename(work_dir, final_dir)
        except BaseException:
            shutil.rmtree(work_dir, ignore_errors=True)
            raise
    return result
