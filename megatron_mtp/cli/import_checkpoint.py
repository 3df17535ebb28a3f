"""Start MTP training from a HuggingFace Llama checkpoint.

    mtp-import --hf path/to/llama --output runs/llama-mtp4 --n-heads 4 [--init-heads copy|trunk]
    mtp-train --config runs/llama-mtp4/config.yaml --data.paths '[1.0, data/corpus_text_document]'

An L-layer model becomes num_layers = L - 1 + n: its first L-1 layers are the trunk, its last layer is head 1,
and heads 2..n start as copies of head 1 (--init-heads copy) or of the last trunk layer (--init-heads trunk).
Importing therefore ADDS n-1 layers. The output run directory holds config.yaml (checkpoint.load = the import,
checkpoint.finetune = true, train.run_dir = OUTPUT/train) and checkpoints/step_00000000 (weights only, TP=1;
any parallel layout can start from it).
"""
import argparse
import sys

from megatron_mtp.cli import HelpFormatter
from megatron_mtp.errors import UserError, report


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("--hf", required=True, help="HuggingFace Llama model directory")
    parser.add_argument("--output", required=True, help="run directory to write")
    parser.add_argument("--n-heads", type=int, required=True, help="number of MTP heads n")
    parser.add_argument("--init-heads", choices=("copy", "trunk"), default="copy",
                        help="initialise heads 2..n from head 1 (copy) or from the last trunk layer (trunk)")
    args = parser.parse_args(argv)
    from megatron_mtp.checkpoint.import_hf import import_checkpoint

    try:
        config = import_checkpoint(args.hf, args.output, args.n_heads, args.init_heads)
    except UserError as exc:
        return report(exc)
    print(f"wrote {args.output} (config {config})\ntrain with: mtp-train --config {config} --data.paths ...")
    return 0


if __name__ == "__main__":
    sys.exit(main())
