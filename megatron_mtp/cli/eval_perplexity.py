"""Per-head loss / perplexity of a trained MTP model on a held-out indexed dataset (.bin/.idx prefix).

    mtp-eval-perplexity --load runs/7b                        # the run's own validation split
    mtp-eval-perplexity --load runs/7b --data /data/valid_text_document --seq-length 2048

Head i is scored on token t+i, as in training. Without --data the run's validation split is used: the valid
share (data.split) of its data.paths, blended as in training, or the held-out files of the embedded stdlib
corpus (tokenised with the run's tokenizer) for runs on it. Prints JSON (per head: loss, perplexity, bits per
token, tokens); --output also writes it to a file.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

from megatron_mtp.cli import HelpFormatter


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=HelpFormatter)
    p.add_argument("--load", required=True, help="run directory, step_* checkpoint or exported HF directory")
    p.add_argument("--data", default=None, help=".bin/.idx prefix; None = the run's validation split")
    p.add_argument("--seq-length", type=int, default=None, help="window length; None = the run's data.seq_length")
    p.add_argument("--max-samples", type=int, default=256, help="windows scored (at most one epoch)")
    p.add_argument("--batch-size", type=int, default=4, help="windows per forward")
    p.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float64"], default="float32", help="weights dtype")
    p.add_argument("--output", default=None, help="also write the JSON here")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = p.parse_args(argv)

    import torch

    from megatron_mtp.errors import InputError, UserError, report
    from megatron_mtp.eval.perplexity import evaluate_perplexity, perplexity_windows
    from megatron_mtp.inference import load_model

    try:
        if args.device.startswith("cuda") and not torch.cuda.is_available():
            raise InputError("--device cuda was asked for but no CUDA device is visible; use --device cpu.")
        cfg, model, _ = load_model(args.load, device=args.device, dtype=getattr(torch, args.dtype))
        seq_length = args.seq_length or cfg.data.seq_length
        if args.data is None:
            from megatron_mtp.data.pipeline import validation_split

            dataset, source = validation_split(cfg, seq_length, args.max_samples)
        else:
            dataset, source = perplexity_windows(args.data, seq_length, args.max_samples), args.data
    except UserError as exc:
        return report(exc)
    result = {"load": args.load, "data": source, **evaluate_perplexity(model, dataset, args.batch_size,
                                                                        progress=not args.no_progress)}
    text = json.dumps(result, indent=1)
    print(text)
    if args.output:
        os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
        with open(args.output, "w") as f:
            f.write(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
