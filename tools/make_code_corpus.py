#!/usr/bin/env python3
"""Write the embedded default corpus: this machine's Python standard library as JSONL.

    python tools/make_code_corpus.py --output-dir data/stdlib               # JSONL only
    python tools/make_code_corpus.py --output-dir data/stdlib --preprocess  # JSONL + .bin/.idx (byte tokens)

Writes stdlib_train.jsonl and stdlib_heldout.jsonl (about 2% of files, chosen by a hash of the path),
one {"text", "path"} document per .py file, in sorted path order. With --preprocess it also writes
stdlib_{train,heldout}_text_document.bin/.idx, ready for data.paths.
"""
import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_mtp.data.code_corpus import DEFAULT_HELDOUT_FRACTION, write_code_corpus  # noqa: E402
from megatron_mtp.data.errors import DataError  # noqa: E402
from megatron_mtp.data.preprocess import preprocess  # noqa: E402
from megatron_mtp.data.tokenizers import TOKENIZER_TYPES  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output-dir", required=True)
    parser.add_argument("--heldout-fraction", type=float, default=DEFAULT_HELDOUT_FRACTION)
    parser.add_argument("--max-docs", type=int, default=None, help="keep only the first N files (sorted)")
    parser.add_argument("--include-tests", action="store_true", help="also include the stdlib's test packages")
    parser.add_argument("--preprocess", action="store_true", help="also tokenise into .bin/.idx")
    parser.add_argument("--tokenizer-type", choices=TOKENIZER_TYPES, default="byte")
    parser.add_argument("--tokenizer-model", default=None)
    parser.add_argument("--workers", type=int, default=1)
    args = parser.parse_args(argv)
    try:
        written = write_code_corpus(args.output_dir, args.heldout_fraction, args.max_docs, args.include_tests,
                                    progress=True)
        print(json.dumps(written, indent=2))
        if args.preprocess:
            for split in ("train", "heldout"):
                stats = preprocess(written[f"{split}_jsonl"], os.path.join(args.output_dir, f"stdlib_{split}"),
                                   tokenizer_type=args.tokenizer_type, tokenizer_model=args.tokenizer_model,
                                   append_eod=True, workers=args.workers)
                print(stats.summary())
    except DataError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
