#!/usr/bin/env python3
"""Per-head loss / perplexity of a trained MTP model on a held-out indexed dataset (.bin/.idx prefix).

The same as ``mtp-eval-perplexity`` (megatron_mtp/cli/eval_perplexity.py); run ``mtp-eval-perplexity --help`` for its options.
"""
import sys

from megatron_mtp.cli.eval_perplexity import main

if __name__ == "__main__":
    sys.exit(main())
