"""Tokenise JSONL corpora into Megatron-compatible indexed datasets ({prefix}_{key}_document.bin/.idx).

    mtp-preprocess --input 'corpus/*.jsonl.gz' --output-prefix data/corpus \
        --tokenizer-type hf --tokenizer-model tokenizer.json --workers 8 --append-eod

The work happens in megatron_mtp.data.preprocess.preprocess; this file only parses flags.
"""
import argparse
import signal
import sys

from megatron_mtp.cli import HelpFormatter
from megatron_mtp.errors import InputError, UserError, report
from megatron_mtp.data.preprocess import preprocess
from megatron_mtp.data.tokenizers import TOKENIZER_TYPES


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    group = parser.add_argument_group("input")
    group.add_argument("--input", required=True, nargs="+", help="JSONL file(s) or glob(s); .jsonl or .jsonl.gz")
    group.add_argument("--json-keys", nargs="+", default=["text"], help="keys to tokenise, one output per key")
    group.add_argument("--strict", action="store_true", help="fail (and write nothing) on the first bad line")
    group = parser.add_argument_group("tokenizer")
    group.add_argument("--tokenizer-type", choices=TOKENIZER_TYPES, default=None,
                       help="inferred from --tokenizer-model when left out; give 'byte' for byte-level tokens")
    group.add_argument("--tokenizer-model", default=None,
                       help="tokenizer.json (hf), a .model (sentencepiece), or an HF tokenizer directory")
    group.add_argument("--append-eod", action="store_true", help="append the end-of-document token to every document")
    group = parser.add_argument_group("output")
    group.add_argument("--output-prefix", required=True, help="writes {prefix}_{key}_document.bin/.idx")
    group = parser.add_argument_group("runtime")
    group.add_argument("--workers", type=int, default=1, help="tokenising processes (1: in the main process)")
    group.add_argument("--log-interval", type=int, default=1000, help="refresh throughput every N documents")
    group.add_argument("--no-progress", action="store_true", help="no progress bar (e.g. in batch logs)")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.tokenizer_type is None and args.tokenizer_model is None:
        # As Megatron: never pick a tokenizer silently.
        return report(InputError("give --tokenizer-model PATH (its type is inferred) or --tokenizer-type byte."))
    # Turn SIGTERM (Slurm time limit, kill) into a normal exit so temporary outputs are removed.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    try:
        stats = preprocess(
            input=args.input,
            output_prefix=args.output_prefix,
            tokenizer_type=args.tokenizer_type,
            tokenizer_model=args.tokenizer_model,
            json_keys=args.json_keys,
            workers=args.workers,
            append_eod=args.append_eod,
            strict=args.strict,
            log_interval=args.log_interval,
            progress=not args.no_progress,
        )
    except UserError as exc:
        return report(exc)
    print(stats.summary())
    return 0


if __name__ == "__main__":
    sys.exit(main())
