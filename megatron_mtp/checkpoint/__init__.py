"""Checkpoints: crash-safe save and exact resume (``manager``), the layout-independent form (``universal``),
resharding (``reshard``), one-process loading of any checkpoint (``merge.load_merged_model``), HF / Meta
export (``export``) and HF import (``import_hf``). See docs/checkpoints.md."""
