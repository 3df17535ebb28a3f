#!/usr/bin/env bash
# The decoding benchmarks of docs/benchmarks.md in one GPU session (about 10 minutes on one H100; the run of
# 2026-12-07 16:49 UTC had 400 s and was cut short: each new (batch, k) shape compiles for ~35 s at first use):
#   1. the CUDA-only decoder tests (graph and compiled paths against the eager path, sampling with graphs),
#      run while the two code models train;
#   2. configs/code_100m.yaml (n = 4, ITERS4 steps) and configs/code_100m_n8.yaml (n = 8, ITERS8 steps)
#      trained side by side on the one GPU (both are small enough that two runs share the GPU well; the
#      n = 8 model gets more steps: its bytes/forward is the number training buys; a SIGTERM at TRAIN_S
#      seconds makes a run checkpoint and stop early);
#   3. bench_decode.py on the n = 4 model: ours k = 1..4 at batch 1 and 16, transformers' default, prompt-
#      lookup and static-cache compiled generate -> decode_cuda.json;
#   4. the n = 8 byte model at batch 1, k = 1..8 -> decode_cuda_n8.json;
#   5. the bandwidth regime on the 1.1B shape (random weights) with kernel profiles, the default decoder and
#      the --gemv one (one-row matmuls as fused Triton reductions) -> decode_cuda_1b.json.
# Everything lands in $OUT (default benchmarks/): three JSON files and log.txt (plots: made where matplotlib
# is, from the JSON; see docs/benchmarks.md).
#
#   bash tools/bench_decode_gpu.sh                     # on the GPU machine, from the repository root
#   ITERS4=20 ITERS8=20 TRAIN_S=60 QUICK=1 DEVICE=cpu bash tools/bench_decode_gpu.sh   # a dry run at tiny size
set -u
OUT=${OUT:-benchmarks}
ITERS4=${ITERS4:-700}
ITERS8=${ITERS8:-1600}
TRAIN_S=${TRAIN_S:-200}
TESTS_S=${TESTS_S:-240}
DEADLINE_S=${DEADLINE_S:-590}   # the whole script's budget: later phases get what is left
QUICK=${QUICK:-0}
DEVICE=${DEVICE:-cuda}
mkdir -p "$OUT"
WORK=$(mktemp -d)  # per-process logs; their tails go into log.txt (the GPU machine returns few files)
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
LOG=$OUT/log.txt
T0=$(date +%s)
left() { echo $((DEADLINE_S - ($(date +%s) - T0))); }
say() { echo "[$(($(date +%s) - T0))s] $*" | tee -a "$LOG"; }

say "start $(date -u +%FT%TZ) device=$DEVICE iters n=4 $ITERS4, n=8 $ITERS8"
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv 2>&1 | tee -a "$LOG"
python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)" 2>&1 | tee -a "$LOG"

TRAIN_EXTRA=()
BENCH_EXTRA=()
if [ "$QUICK" = 1 ]; then
  # tiny shapes for a dry run: a 4-layer model, short prompts
  TRAIN_EXTRA=(--model.hidden_size 64 --model.num_attention_heads 4 --model.ffn_hidden_size 128
               --train.micro_batch_size 4 --data.seq_length 128 --train.device "$DEVICE" --logging.interval 10
               --train.dtype float32)
  BENCH_EXTRA=(--prompt-tokens 64 --max-new-tokens 16 --prompts-batch1 2)
fi

# 1 + 2: tests and both trainings at once
(timeout -s KILL "$TESTS_S" python3 -m pytest -q -k cuda tests/test_generation.py tests/test_speculative.py \
   > "$WORK/tests.txt" 2>&1; echo "pytest rc=$?" >> "$WORK/tests.txt") &
TESTS=$!
train() {  # config run_dir iters
  timeout -s TERM "$TRAIN_S" python3 -m megatron_mtp.train --config "$1" --train.iters "$3" \
    --train.run_dir "$2" "${TRAIN_EXTRA[@]}" > "$WORK/train_$(basename "$2").txt" 2>&1
  echo "train $2 rc=$? at $(($(date +%s) - T0))s" >> "$LOG"
}
train configs/code_100m.yaml runs/code_100m "$ITERS4" &
P4=$!
sleep 5  # the corpus build takes a lock; the second run waits on it and reuses it
train configs/code_100m_n8.yaml runs/code_100m_n8 "$ITERS8" &
P8=$!
wait $P4 $P8
wait $TESTS
say "trained; tests:"
tail -n 40 "$WORK/tests.txt" | tee -a "$LOG"
for f in "$WORK"/train_*.txt; do echo "== $f"; grep -v "^step" "$f" | tail -n 5; grep "^step" "$f" | tail -n 2; done | tee -a "$LOG"

# 3: the n = 4 model against transformers
cap=$(( $(left) - 120 )); [ $cap -lt 60 ] && cap=60
say "bench n=4 (cap ${cap}s)"
timeout -s KILL $cap python3 tools/bench_decode.py --load runs/code_100m --device "$DEVICE" --output-dir "$OUT" \
  --tag "${DEVICE}" "${BENCH_EXTRA[@]}" 2>&1 | grep -v "Loading weights" | tee -a "$LOG"

# 4: the n = 8 byte model, k = 1..8 at batch 1
cap=$(( $(left) - 75 )); [ $cap -lt 20 ] && cap=20
say "bench n=8 (cap ${cap}s)"
timeout -s KILL $cap python3 tools/bench_decode.py --load runs/code_100m_n8 --device "$DEVICE" --output-dir "$OUT" \
  --tag "${DEVICE}_n8" --batch-sizes 1 --peers none "${BENCH_EXTRA[@]}" 2>&1 | tee -a "$LOG"

# 5: bandwidth regime on the 1.1B shape with the kernel profiles: the default decoder (every row), then the
#    --gemv one (one-row matmuls as fused Triton reductions; plain and k = 4 rows) in the same process; the
#    JSON is rewritten after each, so a cut-short run keeps the first
if [ "$QUICK" = 1 ]; then BW=configs/tiny.yaml; else BW=configs/1b.yaml; fi
cap=$(left); [ $cap -lt 30 ] && cap=30
say "bandwidth 1.1B (cap ${cap}s)"
timeout -s KILL $cap python3 tools/bench_decode.py --bandwidth $BW --device "$DEVICE" --output-dir "$OUT" \
  --tag "${DEVICE}_1b" --profile --variants default,gemv "${BENCH_EXTRA[@]}" 2>&1 | tee -a "$LOG"
say "done"
