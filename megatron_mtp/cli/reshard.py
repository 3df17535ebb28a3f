"""Convert a checkpoint to another tensor / pipeline / data-parallel layout.

    mtp-reshard --load runs/big --output runs/big-tp1pp4 --tp 1 --pp 4 [--dp 2]
    torchrun --nproc-per-node 8 -m megatron_mtp.train --config runs/big-tp1pp4/config.yaml

--load takes a run directory (its latest checkpoint) or one step_* directory. --output becomes a new run
directory (config.yaml at the new layout, checkpoints/, metrics.jsonl up to the step) from which training
continues exactly: same step, data position, LR schedule and Adam moments. See docs/checkpoints.md.
"""
import argparse
import os
import sys

from megatron_mtp.cli import HelpFormatter
from megatron_mtp.errors import UserError, report


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("--load", required=True, help="run directory or step_* checkpoint directory")
    parser.add_argument("--output", required=True, help="new run directory to write")
    parser.add_argument("--tp", type=int, required=True, help="tensor-parallel size of the new layout")
    parser.add_argument("--pp", type=int, required=True, help="pipeline stages of the new layout")
    parser.add_argument("--dp", type=int, default=None, help="data-parallel size; None = the checkpoint's")
    parser.add_argument("--zero-stage", type=int, default=None, choices=(0, 1, 2),
                        help="ZeRO stage of the new config; None = the checkpoint's")
    parser.add_argument("--weights-only", action="store_true", help="drop the optimizer state")
    args = parser.parse_args(argv)
    if min(args.tp, args.pp, args.dp or 1) < 1:
        print("checkpoint error: --tp, --pp and --dp must be at least 1.", file=sys.stderr)
        return 2
    from megatron_mtp.checkpoint.reshard import reshard

    try:
        out = reshard(args.load, args.output, args.tp, args.pp, args.dp, args.zero_stage, args.weights_only)
    except UserError as exc:
        return report(exc)
    world = args.tp * args.pp * (args.dp or 1)
    print(f"wrote {out}\ncontinue with: torchrun --nproc-per-node {world} -m megatron_mtp.train "
          f"--config {os.path.join(args.output, 'config.yaml')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
