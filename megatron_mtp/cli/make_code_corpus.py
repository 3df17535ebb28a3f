"""Write the embedded default corpus: this machine's Python standard library as JSONL.

    mtp-make-corpus --output-dir data/stdlib               # JSONL only
    mtp-make-corpus --output-dir data/stdlib --preprocess  # JSONL + .bin/.idx (byte tokens)

Writes stdlib_train.jsonl and stdlib_heldout.jsonl (about 2% of files, chosen by a hash of the path),
one {"text", "path"} document per .py file, in sorted path order. With --preprocess it also writes
stdlib_{train,heldout}_text_document.bin/.idx, ready for data.paths.
"""
import argparse
import json
import os
import sys

from megatron_mtp.cli import HelpFormatter
from megatron_mtp.data.code_corpus import DEFAULT_HELDOUT_FRACTION, write_code_corpus
from megatron_mtp.errors import UserError, report
from megatron_mtp.data.preprocess import preprocess
from megatron_mtp.data.tokenizers import TOKENIZER_TYPES


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("--output-dir", required=True, help="directory to write the JSONL (and .bin/.idx) into")
    parser.add_argument("--heldout-fraction", type=float, default=DEFAULT_HELDOUT_FRACTION,
                        help="share of files held out")
    parser.add_argument("--max-docs", type=int, default=None, help="keep only the first N files (sorted)")
    parser.add_argument("--include-tests", action="store_true", help="also include the stdlib's test packages")
    parser.add_argument("--preprocess", action="store_true", help="also tokenise into .bin/.idx")
    parser.add_argument("--tokenizer-type", choices=TOKENIZER_TYPES, default=None,
                        help="with --preprocess; inferred from --tokenizer-model, byte without one")
    parser.add_argument("--tokenizer-model", default=None, help="tokenizer.json, a .model or an HF tokenizer directory")
    parser.add_argument("--workers", type=int, default=1, help="tokenising processes")
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
    except UserError as exc:
        return report(exc)
    return 0


if __name__ == "__main__":
    sys.exit(main())
