#!/usr/bin/env bash
# The four reproduction experiments (docs/reproduction.md) on one GPU in one go: many small models train
# concurrently (one process each), sized to the time available.
#
#   OUT=results/ bash tools/run_experiments_gpu.sh            # on a machine with one GPU
#   SIZE=smoke DEVICE=cpu RUN_BUDGET=60 OUT=/tmp/o bash tools/run_experiments_gpu.sh   # dry run on a CPU
#
# 1. calibrate: 16 concurrent runs of the polynomial 6M model (8 layers, n = 4) measure the step time under
#    the contention the real runs will see;
# 2. every experiment's schedule is scaled by one factor (--iters-scale, the same for every n and seed) so
#    the longest experiment fits RUN_BUDGET seconds; jobs not started by three quarters of the budget are cut (and reported);
# 3. results.json / results.md / plots of each experiment, the logs and an nvidia-smi trace go into
#    $OUT/repro_results.tar.gz; a short log into $OUT/log.txt.
set -u
OUT=${OUT:-runs/experiments-gpu}
WORK=${WORK:-/tmp/repro_work}
SIZE=${SIZE:-small}
DEVICE=${DEVICE:-cuda}
RUN_BUDGET=${RUN_BUDGET:-240}   # seconds for the training runs after calibration
HARD=${HARD:-$((RUN_BUDGET + 60))}  # seconds after launch: runs still going are stopped (finished jobs are kept)
CAL_JOBS=${CAL_JOBS:-16}
CAL_STEPS=${CAL_STEPS:-45}
mkdir -p "$OUT" "$WORK"
export PYTHONUNBUFFERED=1 OMP_NUM_THREADS=1 PYTHONPATH=$PWD
T0=$(date +%s)
log() { echo "[$(( $(date +%s) - T0 ))s] $*" | tee -a "$OUT/log.txt"; }

if command -v nvidia-smi >/dev/null; then
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee -a "$OUT/log.txt"
  nvidia-smi --query-gpu=timestamp,utilization.gpu,memory.used --format=csv -l 5 > "$WORK/nvidia_smi.csv" 2>&1 &
  SMI_PID=$!
fi
python -c "import torch, sys; print('python', sys.version.split()[0], 'torch', torch.__version__)" | tee -a "$OUT/log.txt"

log "calibrating: $CAL_JOBS concurrent runs x $CAL_STEPS steps"
python -m megatron_mtp.experiments calibrate --device "$DEVICE" --jobs "$CAL_JOBS" --steps "$CAL_STEPS" \
  --out "$WORK/calibrate" > "$WORK/calibrate.log" 2>&1
tail -n 1 "$WORK/calibrate.log" | tee -a "$OUT/log.txt"
# The longest experiment at scale 1 is the polynomial one: 18 runs on 6 workers = 3 waves of ~1050 steps
# of the calibrated model's cost (its 6- and 8-layer models average 7/8 of it): ~3300 calibrated steps.
SCALE=$(python - "$WORK/calibrate/calibration.json" "$RUN_BUDGET" "$SIZE" <<'PY'
import json, sys
cal, budget, size = json.load(open(sys.argv[1])), float(sys.argv[2]), sys.argv[3]
t = cal["step_time_s"]
print(1.0 if size != "small" or not t else round(min(1.0, budget / (3300 * t)), 3))
PY
)
log "iters scale $SCALE (run budget ${RUN_BUDGET}s)"

START_BUDGET=$((RUN_BUDGET * 3 / 4))
RUN_T0=$(date +%s)
declare -A PGID
launch() {  # experiment, workers, seeds...
  local exp=$1 jobs=$2; shift 2
  setsid python -m megatron_mtp.experiments run "$exp" --size "$SIZE" --device "$DEVICE" --seeds "$@" \
    --jobs "$jobs" --out "$WORK/$exp" --iters-scale "$SCALE" --time-budget-s "$START_BUDGET" \
    > "$WORK/$exp.log" 2>&1 &
  PGID[$exp]=$!
  log "started $exp (pid ${PGID[$exp]}, $jobs workers, seeds $*)"
}
launch polynomial 6 0 1 2
launch induction 4 0 1 2
launch bytes 4 0 1
launch finetune 4 0 1

while :; do
  running=0
  for exp in "${!PGID[@]}"; do kill -0 "${PGID[$exp]}" 2>/dev/null && running=1; done
  [ $running = 0 ] && break
  if [ $(( $(date +%s) - RUN_T0 )) -gt "$HARD" ]; then
    for exp in "${!PGID[@]}"; do
      if kill -0 "${PGID[$exp]}" 2>/dev/null; then
        log "stopping $exp: past the hard limit (its finished runs are in its results.json)"
        kill -TERM -- "-${PGID[$exp]}" 2>/dev/null
      fi
    done
    sleep 3
    for exp in "${!PGID[@]}"; do kill -KILL -- "-${PGID[$exp]}" 2>/dev/null; done
    break
  fi
  sleep 2
done
log "runs done"
[ -n "${SMI_PID:-}" ] && kill "$SMI_PID" 2>/dev/null

BUNDLE="$WORK/bundle"
mkdir -p "$BUNDLE"
cp "$WORK/calibrate/calibration.json" "$WORK/calibrate.log" "$BUNDLE/" 2>/dev/null
cp "$WORK/nvidia_smi.csv" "$BUNDLE/" 2>/dev/null
for exp in polynomial induction bytes finetune; do
  mkdir -p "$BUNDLE/$exp"
  cp "$WORK/$exp/results.json" "$WORK/$exp/results.md" "$WORK/$exp"/*.png "$BUNDLE/$exp/" 2>/dev/null
  cp "$WORK/$exp.log" "$BUNDLE/$exp/" 2>/dev/null
  [ -f "$WORK/$exp/results.md" ] && cat "$WORK/$exp/results.md" | tee -a "$OUT/log.txt"
done
tar -czf "$OUT/repro_results.tar.gz" -C "$BUNDLE" .
log "wrote $OUT/repro_results.tar.gz ($(du -h "$OUT/repro_results.tar.gz" | cut -f1))"
