#!/usr/bin/env bash
# Issue 11's multi-GPU runs, one call per machine kind (2, 4 or 8 GPUs): correctness of every layout that
# fits against the single-GPU run, save/reshard/resume across layouts, weak scaling and the 7B layout.
# Results: $OUT/multi_gpu_<N>gpu.json (or benchmarks/ when OUT is unset) and a table on stdout.
#
#   bash ../shared/tools/gpu-wheels.sh            # here: fills .whl/ with deepspeed + its pure deps
#   device run (kind nvidia-h100-x2|x4|x8, carry .whl):  bash tools/multi_gpu_suite.sh
set -euo pipefail
cd "$(dirname "$0")/.."
if ls .whl/*.whl >/dev/null 2>&1 && ! python3 -c "import deepspeed" 2>/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
fi
export NCCL_NVLS_ENABLE=0 PYTHONUNBUFFERED=1 PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True
# The CUDA extension, built in place: `pip install -e .` would set up an isolated build environment, which an
# offline GPU machine cannot download. The runs import megatron_mtp from the checkout (PYTHONPATH).
MAX_JOBS=${MAX_JOBS:-16} python3 setup.py build_ext --inplace >/tmp/mtp_build_ext.log 2>&1 \
  || { tail -20 /tmp/mtp_build_ext.log; echo "multi_gpu_suite: building the extension failed (log above)" >&2; exit 1; }
export PYTHONPATH=$PWD:${PYTHONPATH:-}
exec python3 tools/multi_gpu_suite.py --output-dir "${OUT:-benchmarks}" "$@"
