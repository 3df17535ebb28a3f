"""A checkpoint on disk: its names, its ``meta.json``, finding one, and checking it before anything loads.

Layout under ``<run_dir>/checkpoints`` (what ``CheckpointManager`` writes; see ``manager.py``)::

    step_00000010/            one complete checkpoint
        meta.json             format version, engine format id, step, layout, config, and a manifest of
                              every file: its size (``files``) and SHA-256 (``sha256``); written last
        rank_00000.pt ...     per rank: RNG states, data position, the rank's place in the layout and
                              the partition marks of its parameters
        (engine files)        the engine's model and optimizer shards
    latest                    text file naming the newest complete checkpoint (the commit point)

Format ids are explicit strings with a version (``local-v1``, ``deepspeed-v1``, ``universal-v1``), not class
names, so renaming a class never orphans a checkpoint. Checkpoints of format 2 recorded the engine's class
name; ``LEGACY_FORMAT_IDS`` maps those, and they carry no checksums (sizes are still checked).

Loading never runs code: every ``.pt`` goes through ``io_utils.load_torch`` (weights-only unpickling). The
SHA-256 of every file is verified before a checkpoint is used; set ``MTP_SKIP_CHECKSUMS=1`` to skip hashing
(when saving and when loading) for huge checkpoints on trusted storage (a loud warning says so).
"""
from __future__ import annotations

import dataclasses
import json
import os
import sys
from typing import Optional

from megatron_mtp.config import ModelConfig
from megatron_mtp.data.tokenizers import locate_tokenizer_model
from megatron_mtp.errors import CheckpointError
from megatron_mtp.io_utils import TMP_MARK, UnsafeFileError, load_torch, sha256_file
from megatron_mtp.training.engine import DEEPSPEED_FORMAT, LOCAL_FORMAT

META = "meta.json"
POINTER = "latest"
# 2: engine class names, sizes only. 3: format ids with a version, SHA-256 per file.
FORMAT_VERSION = 3
UNIVERSAL_FORMAT = "universal-v1"  # layout-independent weights.pt + optimizer.pt (formats.py)
LEGACY_FORMAT_IDS = {"LocalEngine": LOCAL_FORMAT, "DeepSpeedEngine": DEEPSPEED_FORMAT, "Universal": UNIVERSAL_FORMAT}
SKIP_CHECKSUMS_ENV = "MTP_SKIP_CHECKSUMS"

# Model-shape keys a checkpoint must agree on with the config that loads it.
SHAPE_KEYS = (("vocab_size", "vocab_size"), ("hidden_size", "hidden_size"), ("num_layers", "num_layers"),
              ("num_attention_heads", "num_attention_heads"), ("num_kv_heads", "kv_heads"),
              ("ffn_hidden_size", "ffn_size"), ("tie_embeddings", "tie_embeddings"))


def engine_format(meta: dict) -> str:
    """The format id of a checkpoint's engine files (format-2 class names mapped to their ids)."""
    tag = meta.get("engine", "LocalEngine")
    return LEGACY_FORMAT_IDS.get(tag, tag)


def warn(msg: str) -> None:
    print(f"WARNING: {msg}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------------------
# Finding checkpoints


def step_dir_name(step: int) -> str:
    return f"step_{step:08d}"


def step_of(name: str) -> Optional[int]:
    if not name.startswith("step_"):
        return None
    digits = name[5:]
    return int(digits) if digits.isdigit() else None


def complete_checkpoints(root: str) -> list:
    """(step, path) of every published-looking ``step_*`` directory under ``root``, by step."""
    out = []
    if not os.path.isdir(root):
        return out
    for name in os.listdir(root):
        step = step_of(name)
        if step is not None and os.path.isfile(os.path.join(root, name, META)):
            out.append((step, os.path.join(root, name)))
    return sorted(out)


def _recover_replaced(root: str, name: str) -> None:
    """A crash while re-saving the step ``latest`` names can leave it moved aside as ``<name>.old``:
    put it back (the new copy never got published)."""
    path, old = os.path.join(root, name), os.path.join(root, name + ".old")
    if not os.path.exists(path) and os.path.isfile(os.path.join(old, META)):
        os.replace(old, path)


def latest_checkpoint(root: str) -> Optional[str]:
    """The newest complete checkpoint under ``root`` (a run's ``checkpoints/``), or None if it holds none.

    ``latest`` is authoritative. Without it, the newest complete ``step_*`` directory is used (a crash
    between publishing a directory and writing the first pointer, or a pointer deleted by hand)."""
    pointer = os.path.join(root, POINTER)
    if not os.path.isfile(pointer):
        found = complete_checkpoints(root)
        return found[-1][1] if found else None
    with open(pointer) as f:
        name = f.read().strip()
    try:
        _recover_replaced(root, name)
    except OSError:
        pass
    path = os.path.join(root, name)
    if not name or not os.path.isfile(os.path.join(path, META)):
        raise CheckpointError(
            f"{pointer} names {name or '(nothing)'!r}, which is missing or incomplete; restore that directory, "
            f"or delete the pointer to resume from the newest complete step_* directory.")
    return path


def locate_run_tokenizer(cfg, ckpt_dir: str) -> None:
    """Point ``cfg.data.tokenizer_model`` at the tokenizer of the run holding ``ckpt_dir``
    (``RUN/checkpoints/step_X``), so a run loads from any working directory and after being moved."""
    run_dir = os.path.dirname(os.path.dirname(os.path.abspath(ckpt_dir)))
    cfg.data.tokenizer_model = locate_tokenizer_model(cfg.data.tokenizer_model, run_dir)


def resolve_checkpoint(path: str) -> str:
    """A run directory, a ``checkpoints`` directory or one checkpoint -> that checkpoint's directory."""
    if not os.path.exists(path):
        raise CheckpointError(f"checkpoint path {path!r} does not exist; pass a run directory, its checkpoints/ "
                              f"directory or a step_* directory.")
    if os.path.isfile(os.path.join(path, META)):
        return path
    if os.path.basename(os.path.normpath(path)).endswith(".partial"):
        raise CheckpointError(f"{path} is an unfinished save (a .partial directory); resume from a complete "
                              f"step_* directory instead.")
    if step_of(os.path.basename(os.path.normpath(path))) is not None:
        raise CheckpointError(f"checkpoint {path} has no {META}, so it was never completed; resume from another "
                              f"step_* directory or the run directory.")
    for root in (os.path.join(path, "checkpoints"), path):
        if os.path.isdir(root):
            found = latest_checkpoint(root)
            if found:
                return found
    raise CheckpointError(f"no complete checkpoint found at {path!r}; pass a run directory or a step_* directory "
                          f"that contains {META}.")


# ---------------------------------------------------------------------------------------------------------
# meta.json, manifest and checksums


def read_meta(ckpt_dir: str) -> dict:
    path = os.path.join(ckpt_dir, META)
    try:
        with open(path) as f:
            meta = json.load(f)
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint {ckpt_dir} has no {META}, so it was never completed; use another "
                              f"step_* directory.") from None
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise CheckpointError(f"checkpoint {ckpt_dir} has a corrupt {META}; use another step_* directory.") from None
    if not isinstance(meta, dict):
        raise CheckpointError(f"checkpoint {ckpt_dir} has a corrupt {META}; use another step_* directory.")
    version = meta.get("format", 2)
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise CheckpointError(f"checkpoint {ckpt_dir} has format {version!r}, newer than this megatron_mtp reads "
                              f"(up to {FORMAT_VERSION}); load it with the version that wrote it.")
    return meta


def manifest(ckpt_dir: str) -> dict:
    """relative path -> size in bytes of every file under a checkpoint directory (meta.json excluded)."""
    files = {}
    for root, _, names in os.walk(ckpt_dir):
        for name in names:
            full = os.path.join(root, name)
            rel = os.path.relpath(full, ckpt_dir)
            if rel == META or TMP_MARK in name:
                continue
            files[rel] = os.path.getsize(full)
    return dict(sorted(files.items()))


def digests(ckpt_dir: str, rel_paths) -> dict:
    """relative path -> SHA-256 hex digest, for the given files of a checkpoint directory."""
    return {rel: sha256_file(os.path.join(ckpt_dir, rel)) for rel in rel_paths}


def checksums_skipped() -> bool:
    return os.environ.get(SKIP_CHECKSUMS_ENV, "").strip().lower() not in ("", "0", "false", "no")


def verify_checkpoint(ckpt_dir: str, meta: Optional[dict] = None, checksums: bool = True,
                      share: tuple = (0, 1), defer_hashing: bool = False) -> dict:
    """Check every file the manifest lists is there with its size and (format 3) its SHA-256; return the
    meta. ``share`` = (rank, world) hashes only every world-th file from ``rank`` (ranks split the work).
    ``defer_hashing``: the caller reads only some files through a reader, which hashes each as it loads it
    (``load_file(..., sha256=)``), so a model loaded for inference does not hash the optimizer's files."""
    meta = meta if meta is not None else read_meta(ckpt_dir)
    files = meta.get("files") or {}
    for rel, size in files.items():
        path = os.path.join(ckpt_dir, rel)
        if not os.path.isfile(path):
            raise CheckpointError(f"checkpoint {ckpt_dir} is missing {rel}; it is incomplete, so resume from an "
                                  f"earlier step_* directory (or restore the file).")
        actual = os.path.getsize(path)
        if actual != size:
            raise CheckpointError(f"checkpoint {ckpt_dir} has a torn file {rel} ({actual} bytes, {size} expected); "
                                  f"resume from an earlier step_* directory (or restore the file).")
    sums = meta.get("sha256")
    if not checksums:
        return meta
    if not sums:
        if meta.get("format", 2) >= 3 and share[0] == 0:  # format 2 had none; a newer one skipped them
            warn(f"checkpoint {ckpt_dir} was saved without SHA-256 checksums ({SKIP_CHECKSUMS_ENV} was set), so "
                 f"corruption of its files cannot be detected.")
        return meta
    if checksums_skipped():
        if share[0] == 0:
            warn(f"{SKIP_CHECKSUMS_ENV} is set: the SHA-256 checksums of checkpoint {ckpt_dir} are NOT verified, "
                 f"so corrupted tensors would load silently.")
        return meta
    if defer_hashing:
        return meta
    rank, world = share
    for rel in sorted(sums)[rank::world]:
        check_digest(ckpt_dir, rel, sums[rel])
    return meta


def check_digest(ckpt_dir: str, rel: str, expected: Optional[str]) -> None:
    """The file's SHA-256 must be ``expected`` (nothing to check without one, or with MTP_SKIP_CHECKSUMS)."""
    if expected and not checksums_skipped() and sha256_file(os.path.join(ckpt_dir, rel)) != expected:
        raise CheckpointError(f"checkpoint {ckpt_dir} has a corrupted file {rel} (its SHA-256 differs from the one "
                              f"recorded in {META}); resume from an earlier step_* directory (or restore the file).")


def unsafe_file_error(ckpt_dir: str, exc: UnsafeFileError) -> CheckpointError:
    rel = os.path.relpath(exc.path, ckpt_dir)
    what = f" ({exc.global_name})" if exc.global_name else ""
    return CheckpointError(f"checkpoint {ckpt_dir} file {rel} holds Python objects other than tensors and plain "
                           f"data{what}, which could run code when loaded, so it is refused; use a checkpoint "
                           f"written by megatron_mtp.")


def load_file(path: str, ckpt_dir: str, mmap: bool = False, sha256: Optional[str] = None):
    """A ``.pt`` of a checkpoint, weights only (nothing in it can run code), checked against its ``sha256``
    when given, with a one-sentence error for missing, corrupted, damaged or hostile files."""
    rel = os.path.relpath(path, ckpt_dir)
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint {ckpt_dir} is missing {rel}; it is incomplete, so use an earlier "
                              f"step_* directory (or restore the file).")
    check_digest(ckpt_dir, rel, sha256)
    try:
        return load_torch(path, mmap=mmap)
    except UnsafeFileError as exc:
        raise unsafe_file_error(ckpt_dir, exc) from None
    except Exception as exc:  # zip/pickle errors of a truncated or corrupt file
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise CheckpointError(f"checkpoint {ckpt_dir} has a damaged file {rel} ({first}); use an earlier step_* "
                              f"directory.") from None


def check_model_shape(ckpt_dir: str, meta: dict, cfg) -> None:
    """The saved model shape must be the configured one; name the first key that differs."""
    saved = (meta.get("config") or {}).get("model") or {}
    known = {f.name for f in dataclasses.fields(ModelConfig)}
    try:
        theirs = ModelConfig(**{k: v for k, v in saved.items() if k in known})
    except TypeError:
        return
    ours = cfg.model
    for key, attr in SHAPE_KEYS:
        a, b = getattr(theirs, attr), getattr(ours, attr)
        if a != b:
            raise CheckpointError(
                f"checkpoint {ckpt_dir} holds a model with model.{key}={a} but the config has {b}; use the config "
                f"the checkpoint was saved with (its meta.json or config.yaml).")
    saved_mtp = (meta.get("config") or {}).get("mtp") or {}
    for key in ("n_heads", "head_type"):
        if key in saved_mtp and saved_mtp[key] != getattr(cfg.mtp, key):
            raise CheckpointError(
                f"checkpoint {ckpt_dir} holds a model with mtp.{key}={saved_mtp[key]} but the config has "
                f"{getattr(cfg.mtp, key)}; use the config the checkpoint was saved with (its meta.json).")
