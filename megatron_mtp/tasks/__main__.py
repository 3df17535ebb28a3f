"""``python -m megatron_mtp.tasks {polynomial,induction} --out DIR ...``: write a task's JSONL files."""
from __future__ import annotations

import argparse
import json
import sys

from megatron_mtp.tasks import induction, polynomial


def _ops_range(text: str) -> tuple:
    low, _, high = text.partition("-")
    try:
        low, high = int(low), int(high or low)
    except ValueError:
        raise argparse.ArgumentTypeError(f"a range looks like 1-3 or 4, got {text!r}") from None
    if not 0 <= low <= high:
        raise argparse.ArgumentTypeError(f"a range needs 0 <= low <= high, got {text!r}")
    return low, high


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m megatron_mtp.tasks",
                                     description="Write synthetic task data as JSONL (docs/reproduction.md).")
    sub = parser.add_subparsers(dest="task", required=True)
    poly = sub.add_parser("polynomial", help="arithmetic over F7[X]/(X^5): train, test_in, test_ood")
    poly.add_argument("--out", required=True, help="output directory")
    poly.add_argument("--train", type=int, default=100_000, help="training samples")
    poly.add_argument("--test", type=int, default=1000, help="samples per test split")
    poly.add_argument("--in-ops", type=_ops_range, default=(1, 5), help="in-domain operations, e.g. 1-5")
    poly.add_argument("--ood-ops", type=_ops_range, default=(6, 10), help="out-of-domain operations, e.g. 6-10")
    poly.add_argument("--seed", type=int, default=0)
    ind = sub.add_parser("induction", help="stories with recurring two-token names: train, test")
    ind.add_argument("--out", required=True, help="output directory")
    ind.add_argument("--train", type=int, default=50_000, help="training stories")
    ind.add_argument("--test", type=int, default=500, help="test stories")
    ind.add_argument("--sentences", type=_ops_range, default=(6, 12),
                     help="sentences per story, e.g. 3-6 (keep stories within the training context)")
    ind.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.task == "polynomial":
        info = polynomial.write_dataset(args.out, args.train, args.test, args.in_ops, args.ood_ops, args.seed)
    else:
        info = induction.write_dataset(args.out, args.train, args.test, args.sentences, args.seed)
    print(json.dumps(info, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
