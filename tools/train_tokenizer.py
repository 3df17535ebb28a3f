#!/usr/bin/env python3
"""Train a byte-level BPE tokenizer on a JSONL corpus and write tokenizer.json (with <|endoftext|>).

The same as ``mtp-train-tokenizer`` (megatron_mtp/cli/train_tokenizer.py); run ``mtp-train-tokenizer --help`` for its options.
"""
import sys

from megatron_mtp.cli.train_tokenizer import main

if __name__ == "__main__":
    sys.exit(main())
