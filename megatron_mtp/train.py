"""Entry point: ``mtp-train --config FILE [--section.key value ...]`` (also ``python -m megatron_mtp.train``).

Launch it as it is for one process, or under torchrun / srun / mpirun for many: ranks are discovered from
the launcher's environment. Mistakes in the config, data, checkpoint or launch environment, and a run
directory another trainer holds, end the run with one sentence on stderr and the exit status of
``megatron_mtp.errors.EXIT_CODES`` (2); a run that diverges (``train.max_consecutive_skips`` non-finite steps in
a row) or whose rank stops answering (the heartbeat watchdog) ends with one sentence and exit status 3.
``--help`` lists every config key (type, default, meaning), generated from the config dataclasses;
``--print-config`` prints the resolved config and exits.
"""
from __future__ import annotations

import argparse
import os
import sys

from megatron_mtp.config import config_reference, load_config, to_yaml
from megatron_mtp.data.pipeline import prepare_data_config
from megatron_mtp.errors import UserError, report
from megatron_mtp.parallel.distributed import destroy_distributed
from megatron_mtp.training.loop import train


def _launch_rank() -> int:
    for name in ("RANK", "OMPI_COMM_WORLD_RANK", "PMI_RANK"):
        if os.environ.get(name, "").isdigit():
            return int(os.environ[name])
    if os.environ.get("SLURM_STEP_ID") is not None and os.environ.get("SLURM_PROCID", "").isdigit():
        return int(os.environ["SLURM_PROCID"])
    return 0


def build_parser() -> argparse.ArgumentParser:
    """--config, --print-config, and one option per config key, grouped by section."""
    parser = argparse.ArgumentParser(
        prog="mtp-train",
        usage="%(prog)s [-h] [--config FILE] [--print-config] [--section.key VALUE ...]",
        description="Train a multi-token-prediction language model. Values come from the defaults, then "
                    "--config, then --section.key overrides (also written --section.key=value).",
        epilog="Lists are written YAML-style: --mtp.loss_weights '[1, 0.5, 0.5, 0.5]'; null unsets a key. "
               "See docs/training.md.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        allow_abbrev=False,  # a mistyped key must be an error, never a guessed other key
    )
    parser.add_argument("--config", default=None, help="YAML config file (configs/tiny.yaml, configs/7b.yaml, ...)")
    parser.add_argument("--print-config", action="store_true",
                        help="print the resolved config as YAML (tokenizer and vocabulary settled) and exit")
    groups = {}
    for section, key, type_name, default, meaning in config_reference():
        if section not in groups:
            groups[section] = parser.add_argument_group(f"{section} keys")
        shown = "null" if default is None else str(default).lower() if isinstance(default, bool) else default
        groups[section].add_argument(
            f"--{section}.{key}", dest=f"{section}.{key}", metavar=type_name.split()[0].upper(),
            default=argparse.SUPPRESS,  # only keys given on the command line override the config file
            help=f"{meaning} [{type_name}, default: {shown}]".replace("%", "%%"))
    return parser


def main(argv=None) -> int:
    args, unknown = build_parser().parse_known_args(argv)
    overrides = []
    for dotted, value in vars(args).items():
        if "." in dotted:
            overrides += [f"--{dotted}", value]
    overrides += unknown  # unknown keys reach load_config, which names the section's real keys

    try:
        cfg = load_config(args.config, overrides)
        if args.print_config:
            prepare_data_config(cfg)
            sys.stdout.write(to_yaml(cfg))
            return 0
        train(cfg)
    except UserError as exc:
        return report(exc, rank=_launch_rank())
    finally:
        destroy_distributed()
    return 0


if __name__ == "__main__":
    sys.exit(main())
