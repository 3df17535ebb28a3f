#!/usr/bin/env python3
"""Write the embedded default corpus: this machine's Python standard library as JSONL.

The same as ``mtp-make-corpus`` (megatron_mtp/cli/make_code_corpus.py); run ``mtp-make-corpus --help`` for its options.
"""
import sys

from megatron_mtp.cli.make_code_corpus import main

if __name__ == "__main__":
    sys.exit(main())
