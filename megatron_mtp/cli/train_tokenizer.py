"""Train a byte-level BPE tokenizer on a JSONL corpus and write tokenizer.json (with <|endoftext|>).

    mtp-train-tokenizer --input data/stdlib/stdlib_train.jsonl --vocab-size 8192 \
        --output data/tokenizer.json

Use the result with --tokenizer-type hf --tokenizer-model data/tokenizer.json.
"""
import argparse
import itertools
import sys

from tqdm import tqdm

from megatron_mtp.cli import HelpFormatter
from megatron_mtp.errors import UserError, report
from megatron_mtp.data.jsonl import expand_inputs, iter_jsonl_texts
from megatron_mtp.data.tokenizer_training import train_bpe_tokenizer


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("--input", required=True, nargs="+", help="JSONL file(s) or glob(s); .jsonl or .jsonl.gz")
    parser.add_argument("--json-key", default="text", help="JSON key holding the text")
    parser.add_argument("--vocab-size", type=int, default=8192, help="vocabulary size, special tokens included")
    parser.add_argument("--min-frequency", type=int, default=2, help="least count of a merged pair")
    parser.add_argument("--max-docs", type=int, default=None, help="train on the first N documents only")
    parser.add_argument("--output", required=True, help="path of the tokenizer.json to write")
    args = parser.parse_args(argv)
    try:
        files = expand_inputs(args.input)  # a wrong --input is said before any progress bar starts
        texts = tqdm(itertools.islice(iter_jsonl_texts(files, args.json_key), args.max_docs),
                     desc="reading documents", unit="doc")
        path = train_bpe_tokenizer(texts, args.vocab_size, args.output, args.min_frequency)
    except UserError as exc:
        return report(exc)
    from megatron_mtp.data.tokenizers import build_tokenizer

    tokenizer = build_tokenizer("hf", path)
    print(f"wrote {path}: vocab_size={tokenizer.vocab_size}, eod={tokenizer.eod}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
