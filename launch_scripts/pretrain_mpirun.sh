#!/usr/bin/env bash
# Pre-training launched by OpenMPI's mpirun: one rank per GPU. Each process reads its rank, world size
# and local rank from OMPI_COMM_WORLD_*; rank 0 picks the rendezvous host and a free port and
# broadcasts them through mpi4py (megatron_mtp.parallel.distributed), unless MASTER_ADDR and
# MASTER_PORT are set, in which case every rank uses those.
#
# usage (from the repository root):
#   NP=8 bash launch_scripts/pretrain_mpirun.sh [--section.key value ...]
#   NP=16 HOSTFILE=hosts.txt CONFIG=configs/7b.yaml bash launch_scripts/pretrain_mpirun.sh
#   CPU smoke test: NP=2 OVERSUBSCRIBE=1 bash launch_scripts/pretrain_mpirun.sh \
#       --config configs/tiny.yaml --train.iters 20
#
# Environment (all optional):
#   NP            number of processes (default: GPUs on this node, or 1 without GPUs)
#   HOSTFILE      OpenMPI host file for multi-node runs ("node1 slots=8" per line)
#   OVERSUBSCRIBE 1 allows more ranks than cores (CI machines); off by default
#   CONFIG, EXTRA_ARGS, PYTHON   as in pretrain.sbatch
#   MPIRUN_ARGS   more mpirun flags, word-split (e.g. "--mca btl_tcp_if_include ib0")
#   MASTER_ADDR / MASTER_PORT    fixed rendezvous instead of the mpi4py broadcast
# Needs OpenMPI's mpirun and mpi4py built against it (Debian: openmpi-bin libopenmpi-dev; pip mpi4py).
set -euo pipefail

CONFIG=${CONFIG:-configs/7b.yaml}
PYTHON=${PYTHON:-python3}
NP=${NP:-$( (nvidia-smi -L 2>/dev/null || true) | wc -l)}
[ "$NP" -gt 0 ] || NP=1

# Ranks are placed in order over the host file's slots, so local rank i drives GPU i. No core binding:
# OpenMPI's default pins each rank to one core or socket, starving torch's threads and data loaders.
args=(-np "$NP" --map-by slot --bind-to none)
[ "$(id -u)" -eq 0 ] && args+=(--allow-run-as-root)
[ "${OVERSUBSCRIBE:-0}" = 1 ] && args+=(--oversubscribe)
[ -n "${HOSTFILE:-}" ] && args+=(--hostfile "$HOSTFILE")

# Same NCCL defaults as the Slurm scripts (see pretrain.sbatch for what they do).
export NCCL_NVLS_ENABLE=${NCCL_NVLS_ENABLE:-0}
export TORCH_NCCL_ASYNC_ERROR_HANDLING=${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}
export NCCL_ASYNC_ERROR_HANDLING=${NCCL_ASYNC_ERROR_HANDLING:-1}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}

# Ranks on other hosts get a fresh environment: pass on what the run depends on (-x copies the value).
for name in PATH LD_LIBRARY_PATH PYTHONPATH VIRTUAL_ENV CUDA_VISIBLE_DEVICES MASTER_ADDR MASTER_PORT \
            $(compgen -e | grep -E '^(NCCL_|TORCH_|GLOO_|OMP_|MTP_|HF_)' || true); do
    [ -n "${!name:-}" ] && args+=(-x "$name")
done

echo "pretrain_mpirun.sh: $NP rank(s), config $CONFIG"
# shellcheck disable=SC2086  # MPIRUN_ARGS and EXTRA_ARGS are word lists on purpose
exec mpirun "${args[@]}" ${MPIRUN_ARGS:-} \
    "$PYTHON" -m megatron_mtp.train --config "$CONFIG" ${EXTRA_ARGS:-} "$@"
