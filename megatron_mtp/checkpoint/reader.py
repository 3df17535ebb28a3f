"""The base of every checkpoint reader: meta, the config it was saved with, the per-rank payloads.

Concrete readers (``formats.LocalReader``, ``formats.UniversalReader``, ``deepspeed_format.DeepSpeedReader``)
hand out canonical tensors by ``init_key``; ``formats.open_checkpoint`` picks one by the format id.
"""
from __future__ import annotations

import os
from typing import Optional

import torch

from megatron_mtp.checkpoint.store import META, load_file, read_meta
from megatron_mtp.checkpoint.universal import param_infos
from megatron_mtp.config import Config, ConfigError, set_value, validate
from megatron_mtp.errors import CheckpointError

ADAM_STATES = ("exp_avg", "exp_avg_sq")


def config_of(meta: dict, ckpt_dir: str = "?"):
    """The Config a checkpoint was saved with. Keys this version does not know (a checkpoint from a newer or
    older megatron_mtp) are skipped with a warning rather than refused."""
    data = meta.get("config")
    if not isinstance(data, dict):
        raise CheckpointError(f"checkpoint {ckpt_dir} has no config in its {META}; it was not written by "
                              f"megatron_mtp.")
    cfg, skipped = Config(), []
    try:
        for section, values in data.items():
            for key, value in (values or {}).items():
                try:
                    set_value(cfg, f"{section}.{key}", value)
                except ConfigError as exc:
                    if "unknown config" not in str(exc):
                        raise
                    skipped.append(f"{section}.{key}")
        validate(cfg)
    except (ConfigError, AttributeError) as exc:
        raise CheckpointError(f"checkpoint {ckpt_dir} has an unusable config in its {META} ({exc}); it was not "
                              f"written by this version of megatron_mtp.") from None
    if skipped:
        print(f"WARNING: checkpoint {ckpt_dir} sets config keys this version does not know, ignored: "
              f"{', '.join(skipped)}", flush=True)
    return cfg


class Reader:
    """Base: meta, config, per-rank payloads."""

    def __init__(self, ckpt_dir: str, meta: Optional[dict] = None, hash_files: bool = True):
        self.dir = ckpt_dir
        self.meta = meta if meta is not None else read_meta(ckpt_dir)
        # Each file is checked against meta.json's SHA-256 as it is loaded (unless the caller verified all).
        self.digests = (self.meta.get("sha256") or {}) if hash_files else {}
        self.cfg = config_of(self.meta, ckpt_dir)
        self.tp, self.pp = int(self.meta.get("tp", 1)), int(self.meta.get("pp", 1))
        self.dp = int(self.meta.get("dp", 1))
        self.world = int(self.meta.get("world_size", self.tp * self.pp * self.dp))
        self.infos = param_infos(self.cfg)
        self._payloads = None

    @property
    def step(self) -> int:
        return int(self.meta.get("step", 0))

    @property
    def payloads(self) -> dict:
        if self._payloads is None:
            self._payloads = {}
            for r in range(self.world):
                path = os.path.join(self.dir, f"rank_{r:05d}.pt")
                if os.path.isfile(path):
                    self._payloads[r] = self.load(path)
        return self._payloads

    def consumed_samples(self) -> int:
        for p in self.payloads.values():
            return int(p.get("consumed_samples", 0))
        return 0

    def load(self, path: str, mmap: bool = False):
        """One file of this checkpoint (``store.load_file``), checked against its recorded SHA-256."""
        return load_file(path, self.dir, mmap=mmap, sha256=self.digests.get(os.path.relpath(path, self.dir)))

    def weight(self, key: str) -> torch.Tensor:
        raise NotImplementedError

    def weights(self) -> dict:
        return {key: self.weight(key) for key in self.infos}

    def optimizer_state(self) -> Optional[dict]:
        return None
