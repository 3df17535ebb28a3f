#!/usr/bin/env bash
# The decoding benchmarks of docs/benchmarks.md in one GPU session, inside DEADLINE_S seconds (default 400):
# tools/bench_decode_gpu.py trains the two code models (n = 4 and byte-level n = 8) side by side while it
# compiles the decoder's step programs once on random-weight models of every benchmarked shape, then benchmarks
# the n = 4 model against transformers, the n = 8 model at k = 1..8 and the 1.1B shape's bandwidth regime
# (the decoder variants VARIANTS_1B names; tools/bench_decode_gpu.py's docstring lists every part and knob). Everything lands in $OUT (default benchmarks/): decode_<TAG>*.json (written
# after every row), decode_<TAG>_run.json (phases, compilations, the CUDA test) and log.txt; plots are made
# from the JSON where matplotlib is (bench_decode.plot).
#
#   OUT=$OUT bash tools/bench_decode_gpu.sh                           # on the GPU machine, from the repository root
#   QUICK=1 DEVICE=cpu TRAIN_S=40 ITERS4=20 ITERS8=20 OUT=/tmp/dry bash tools/bench_decode_gpu.sh   # dry run
set -u
export OUT=${OUT:-benchmarks} DEADLINE_S=${DEADLINE_S:-400}
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
mkdir -p "$OUT"
{ nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv 2>&1 | head -3
  python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)" 2>&1
} | tee -a "$OUT/log.txt"
# The driver watches its own deadline; the KILL is the backstop (its JSON is written row by row).
timeout -s KILL $((${DEADLINE_S%.*} + 10)) python3 tools/bench_decode_gpu.py 2>&1 \
  | grep --line-buffered -v "Loading weights" | tee -a "$OUT/log.txt"
echo "exit ${PIPESTATUS[0]}" | tee -a "$OUT/log.txt"
