#!/usr/bin/env python3
"""Export a checkpoint (any layout) as a HuggingFace Llama directory or in Meta's MTP release layout.

The same as ``mtp-export`` (megatron_mtp/cli/export.py); run ``mtp-export --help`` for its options.
"""
import sys

from megatron_mtp.cli.export import main

if __name__ == "__main__":
    sys.exit(main())
