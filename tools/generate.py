#!/usr/bin/env python3
"""Generate text from a trained MTP model, with plain or self-speculative decoding.

The same as ``mtp-generate`` (megatron_mtp/cli/generate.py); run ``mtp-generate --help`` for its options.
"""
import sys

from megatron_mtp.cli.generate import main

if __name__ == "__main__":
    sys.exit(main())
