"""Entry point: ``mtp-train --config FILE [--section.key value ...]`` (also ``python -m megatron_mtp.train``).

Launch it as it is for one process, or under torchrun / srun / mpirun for many: ranks are discovered from
the launcher's environment. Mistakes in the config, data, checkpoint or launch environment, and a run
directory another trainer holds, end the run with one sentence on stderr and exit status 2; a run that
diverges (``train.max_consecutive_skips`` non-finite steps in a row) or whose rank stops answering (the
heartbeat watchdog) ends with one sentence and exit status 3.
"""
from __future__ import annotations

import argparse
import os
import sys


def _user_errors() -> tuple:
    from megatron_mtp.checkpoint.manager import CheckpointError
    from megatron_mtp.config import ConfigError
    from megatron_mtp.data.errors import DataError
    from megatron_mtp.parallel.distributed import LaunchError
    from megatron_mtp.parallel.state import LayoutError
    from megatron_mtp.training.guard import TrainingError
    from megatron_mtp.training.run_lock import RunLockError

    return ConfigError, DataError, LaunchError, LayoutError, CheckpointError, RunLockError, TrainingError


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

    from megatron_mtp.config import load_config

    errors = _user_errors()
    try:
        cfg = load_config(args.config, overrides)
        from megatron_mtp.training.loop import train

        train(cfg)
    except errors as exc:
        kind = {"ConfigError": "config", "LayoutError": "config", "DataError": "data",
                "LaunchError": "launch", "CheckpointError": "checkpoint", "RunLockError": "run directory",
                "TrainingError": "training"}.get(type(exc).__name__, "input")
        # Config, layout, lock and divergence errors are decided alike on every rank: say them once (rank 0 holds
        # the lock's details). Others may be rank-specific.
        if kind not in ("config", "run directory", "training") or _launch_rank() == 0:
            print(f"{kind} error: {exc}", file=sys.stderr, flush=True)
        # 3: the run stopped on a fault of its own (it diverged), not on a mistake in its inputs.
        return 3 if kind == "training" else 2
    finally:
        from megatron_mtp.parallel.distributed import destroy_distributed

        destroy_distributed()
    return 0


if __name__ == "__main__":
    sys.exit(main())
