#!/usr/bin/env python3
"""Per-GPU memory of a training config, and the parallel layouts that fit.

The same as ``mtp-estimate-memory`` (megatron_mtp/cli/estimate_memory.py); run ``mtp-estimate-memory --help`` for its options.
"""
import sys

from megatron_mtp.cli.estimate_memory import main

if __name__ == "__main__":
    sys.exit(main())
