#!/usr/bin/env python3
"""Tokenise JSONL corpora into Megatron-compatible indexed datasets ({prefix}_{key}_document.bin/.idx).

The same as ``mtp-preprocess`` (megatron_mtp/cli/preprocess.py); run ``mtp-preprocess --help`` for its options.
"""
import sys

from megatron_mtp.cli.preprocess import main

if __name__ == "__main__":
    sys.exit(main())
