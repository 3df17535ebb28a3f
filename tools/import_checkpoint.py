#!/usr/bin/env python3
"""Start MTP training from a HuggingFace Llama checkpoint.

The same as ``mtp-import`` (megatron_mtp/cli/import_checkpoint.py); run ``mtp-import --help`` for its options.
"""
import sys

from megatron_mtp.cli.import_checkpoint import main

if __name__ == "__main__":
    sys.exit(main())
