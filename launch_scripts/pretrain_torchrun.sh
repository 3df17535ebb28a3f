#!/usr/bin/env bash
# Single-node pre-training with torchrun: one worker per GPU, rendezvous on this host.
#
# usage (from the repository root):
#   bash launch_scripts/pretrain_torchrun.sh [--section.key value ...]
#   CONFIG=configs/1b.yaml NPROC_PER_NODE=4 bash launch_scripts/pretrain_torchrun.sh --train.iters 1000
#   CPU: NPROC_PER_NODE=2 bash launch_scripts/pretrain_torchrun.sh --config configs/tiny.yaml --train.iters 20
#
# Environment (all optional): NPROC_PER_NODE (default: GPUs on this node, or 1 without GPUs),
# CONFIG (configs/7b.yaml), EXTRA_ARGS (more overrides, word-split), PYTHON (python3),
# NCCL_* as in pretrain.sbatch. Multi-node torchrun: use launch_scripts/pretrain.sbatch.
set -euo pipefail

CONFIG=${CONFIG:-configs/7b.yaml}
PYTHON=${PYTHON:-python3}
NPROC_PER_NODE=${NPROC_PER_NODE:-$( (nvidia-smi -L 2>/dev/null || true) | wc -l)}
[ "$NPROC_PER_NODE" -gt 0 ] || NPROC_PER_NODE=1

export NCCL_NVLS_ENABLE=${NCCL_NVLS_ENABLE:-0}
export TORCH_NCCL_ASYNC_ERROR_HANDLING=${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}

echo "pretrain_torchrun.sh: $NPROC_PER_NODE worker(s), config $CONFIG"
# torchrun is `python -m torch.distributed.run`; calling it through PYTHON keeps one interpreter.
# shellcheck disable=SC2086  # EXTRA_ARGS is a word list on purpose
exec "$PYTHON" -m torch.distributed.run --standalone --nproc_per_node "$NPROC_PER_NODE" \
    -m megatron_mtp.train --config "$CONFIG" ${EXTRA_ARGS:-} "$@"
