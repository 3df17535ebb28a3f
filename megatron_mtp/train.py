"""Entry point: ``mtp-train --config FILE [--section.key value ...]`` (also ``python -m megatron_mtp.train``).

Launch it as it is for one process, or under torchrun / srun / mpirun for many: ranks are discovered from
the launcher's environment. Mistakes in the config, data, checkpoint or launch environment, and a run
directory another trainer holds, end the run with one sentence on stderr and the exit status of
``megatron_mtp.errors.EXIT_CODES`` (2); a run that diverges (``train.max_consecutive_skips`` non-finite steps in
a row) or whose rank stops answering (the heartbeat watchdog) ends with one sentence and exit status 3.
"""
from __future__ import annotations

import argparse
import os
import sys

from megatron_mtp.config import load_config
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


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="mtp-train",
        description="Train a multi-token-prediction language model.",
        epilog="Any config key can be overridden as --section.key value, e.g. --mtp.n_heads 4 --train.iters 100.",
    )
    parser.add_argument("--config", help="YAML config file (configs/tiny.yaml, configs/7b.yaml, ...)")
    args, overrides = parser.parse_known_args(argv)

    try:
        train(load_config(args.config, overrides))
    except UserError as exc:
        return report(exc, rank=_launch_rank())
    finally:
        destroy_distributed()
    return 0


if __name__ == "__main__":
    sys.exit(main())
