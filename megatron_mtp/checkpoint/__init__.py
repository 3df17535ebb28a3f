"""Checkpoints: the save/resume protocol (``manager``), the directory layout, meta.json and its checks
(``store``), readers and writers of each on-disk format (``reader``, ``formats``, ``deepspeed_format``), the
layout-independent form (``universal``), resharding (``reshard``), one-process loading of any checkpoint
(``merge.load_merged_model``), HF / Meta export (``export``) and HF import (``import_hf``). See
docs/checkpoints.md and docs/architecture.md."""
