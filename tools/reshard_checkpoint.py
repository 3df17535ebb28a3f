#!/usr/bin/env python3
"""Convert a checkpoint to another tensor / pipeline / data-parallel layout.

The same as ``mtp-reshard`` (megatron_mtp/cli/reshard.py); run ``mtp-reshard --help`` for its options.
"""
import sys

from megatron_mtp.cli.reshard import main

if __name__ == "__main__":
    sys.exit(main())
