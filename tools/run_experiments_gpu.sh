#!/usr/bin/env bash
# The four reproduction experiments (docs/reproduction.md) on one GPU in one go: many small models train
# concurrently (one process each), their schedules sized to the time available.
#
#   OUT=results/ bash tools/run_experiments_gpu.sh            # on a machine with one GPU
#   EXPS="polynomial induction" OUT=results/ bash tools/run_experiments_gpu.sh   # two of them, more steps each
#   SIZE=smoke DEVICE=cpu TOTAL=150 CAL_JOBS=2 OUT=/tmp/o bash tools/run_experiments_gpu.sh   # dry run on a CPU
#
# 1. calibrate: CAL_JOBS concurrent runs of the polynomial size's largest model (n = 4) measure the step time
#    under contention like the real runs' (megatron_mtp/experiments/calibrate.py: the cost model);
# 2. `experiments fit` turns it into one schedule factor (--iters-scale, the same for every n and seed) that
#    fits all four experiments' planned steps into the seconds left before TOTAL, less start-up and end margins;
#    jobs that cannot start before seven tenths of that budget are cut (and reported);
# 3. while they run, every experiment's results.json (rewritten after each finished job) is copied to $OUT, so a
#    run stopped at any point still returns the finished jobs; runs still going at TOTAL - END_MARGIN seconds are
#    stopped; results, tables, logs and an nvidia-smi trace go into $OUT/repro_results.tar.gz.
set -u
OUT=${OUT:-runs/experiments-gpu}
WORK=${WORK:-/tmp/repro_work}
SIZE=${SIZE:-small}
DEVICE=${DEVICE:-cuda}
TOTAL=${TOTAL:-480}          # seconds this script may take, end to end
END_MARGIN=${END_MARGIN:-25} # seconds kept at the end to stop the runs and pack the results
START_S=${START_S:-30}       # seconds the experiments take to write their data and start their workers
CAL_STEPS=${CAL_STEPS:-60}
SEEDS=${SEEDS:-0 1 2}
# Workers per experiment: each experiment's jobs in two waves (polynomial's 18 runs, induction's 12, bytes' 6,
# finetune's 9 jobs of a pretraining and a finetune each). 23 processes keep the GPU busy as well as 45 would,
# and the first wave (seed 0 and part of seed 1: jobs go seed-major) finishes near half time, so a run that
# overruns its plan loses the last seeds, not every run of an experiment at once.
W_POLY=${W_POLY:-9} W_IND=${W_IND:-6} W_BYTES=${W_BYTES:-3} W_FT=${W_FT:-5}
# The calibration's runs are the largest polynomial model: 24 of them keep the device as busy as the
# experiments' 23 runs will (`fit` takes the device's throughput to be the same, and its cost model scales it
# to the other models' layers, tokens and width).
CAL_JOBS=${CAL_JOBS:-24}
mkdir -p "$OUT" "$WORK"
# expandable segments: ~30 processes share the GPU's memory, so each one's cache should not fragment.
export PYTHONUNBUFFERED=1 OMP_NUM_THREADS=1 PYTHONPATH=$PWD PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True
T0=$(date +%s)
now() { echo $(( $(date +%s) - T0 )); }
log() { echo "[$(now)s] $*" | tee -a "$OUT/log.txt"; }
EXPS=${EXPS:-polynomial induction bytes finetune}  # a subset gets the whole budget (more steps each)

if command -v nvidia-smi >/dev/null; then
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee -a "$OUT/log.txt"
  nvidia-smi --query-gpu=timestamp,utilization.gpu,memory.used --format=csv -l 5 > "$WORK/nvidia_smi.csv" 2>&1 &
  SMI_PID=$!
fi
python -c "import torch, sys; print('python', sys.version.split()[0], 'torch', torch.__version__)" | tee -a "$OUT/log.txt"

log "calibrating: $CAL_JOBS concurrent runs x $CAL_STEPS steps"
timeout 120 python -m megatron_mtp.experiments calibrate --device "$DEVICE" --jobs "$CAL_JOBS" --steps "$CAL_STEPS" \
  --size "$SIZE" --out "$WORK/calibrate" > "$WORK/calibrate.log" 2>&1
tail -n 1 "$WORK/calibrate.log" | cut -c1-400 | tee -a "$OUT/log.txt"
BUDGET=$(( TOTAL - $(now) - START_S - END_MARGIN ))
PLAN=""
declare -A WORKERS=([polynomial]=$W_POLY [induction]=$W_IND [bytes]=$W_BYTES [finetune]=$W_FT)
for exp in $EXPS; do PLAN="$PLAN $exp:$(echo $SEEDS | tr ' ' ','):${WORKERS[$exp]}"; done
if python -m megatron_mtp.experiments fit "$WORK/calibrate/calibration.json" --budget-s "$BUDGET" --size "$SIZE" \
     --plan $PLAN > "$WORK/fit.json" 2>>"$OUT/log.txt"; then
  SCALE=$(python -c "import json, sys; print(json.load(open(sys.argv[1]))['scale'])" "$WORK/fit.json")
else
  SCALE=${FALLBACK_SCALE:-0.7}  # a failed calibration must not cost the run: about what run 2's H100 rates give
  log "calibration failed (see calibrate.log): falling back to iters scale $SCALE"
fi
cat "$WORK/fit.json" >> "$OUT/log.txt" 2>/dev/null
log "iters scale $SCALE (device budget ${BUDGET}s for the runs)"

START_BUDGET=$(( BUDGET * 7 / 10 ))
RUN_T0=$(date +%s)
declare -A PGID
launch() {  # experiment, workers
  local exp=$1 jobs=$2
  setsid python -m megatron_mtp.experiments run "$exp" --size "$SIZE" --device "$DEVICE" --seeds $SEEDS \
    --jobs "$jobs" --out "$WORK/$exp" --iters-scale "$SCALE" --time-budget-s "$START_BUDGET" \
    > "$WORK/$exp.log" 2>&1 &
  PGID[$exp]=$!
  log "started $exp (pid ${PGID[$exp]}, $jobs workers, seeds $SEEDS)"
}
for exp in $EXPS; do launch "$exp" "${WORKERS[$exp]}"; done

snapshot() {  # the finished jobs so far, where the device call returns them
  for exp in $EXPS; do
    [ -f "$WORK/$exp/results.json" ] && cp "$WORK/$exp/results.json" "$OUT/$exp.json.tmp" && mv "$OUT/$exp.json.tmp" "$OUT/$exp.json"
  done
}
STOP_AT=$(( TOTAL - END_MARGIN ))
LAST_SNAP=0
while :; do
  running=0
  for exp in "${!PGID[@]}"; do kill -0 "${PGID[$exp]}" 2>/dev/null && running=1; done
  [ $running = 0 ] && break
  if [ "$(now)" -ge "$STOP_AT" ]; then
    for exp in "${!PGID[@]}"; do
      if kill -0 "${PGID[$exp]}" 2>/dev/null; then
        log "stopping $exp: out of time (its finished runs are in its results.json)"
        kill -TERM -- "-${PGID[$exp]}" 2>/dev/null
      fi
    done
    sleep 3
    for exp in "${!PGID[@]}"; do kill -KILL -- "-${PGID[$exp]}" 2>/dev/null; done
    break
  fi
  if [ $(( $(now) - LAST_SNAP )) -ge 15 ]; then snapshot; LAST_SNAP=$(now); fi
  sleep 2
done
log "runs done"
[ -n "${SMI_PID:-}" ] && kill "$SMI_PID" 2>/dev/null
snapshot

BUNDLE="$WORK/bundle"
mkdir -p "$BUNDLE"
cp "$WORK/calibrate/calibration.json" "$WORK/calibrate.log" "$WORK/fit.json" "$BUNDLE/" 2>/dev/null
cp "$WORK/nvidia_smi.csv" "$BUNDLE/" 2>/dev/null
for exp in $EXPS; do
  mkdir -p "$BUNDLE/$exp"
  # A stopped experiment never wrote its table: write it from the finished jobs
  # (when time is left: `python -m megatron_mtp.experiments report DIR` does it later from results.json).
  if [ -f "$WORK/$exp/results.json" ] && [ "$WORK/$exp/results.json" -nt "$WORK/$exp/results.md" ] \
     && [ "$(now)" -lt $(( TOTAL - 12 )) ]; then
    timeout 15 python -m megatron_mtp.experiments report "$WORK/$exp" > /dev/null 2>&1
  fi
  cp "$WORK/$exp/results.json" "$WORK/$exp/results.md" "$WORK/$exp"/*.png "$BUNDLE/$exp/" 2>/dev/null
  tail -c 200000 "$WORK/$exp.log" > "$BUNDLE/$exp/$exp.log" 2>/dev/null
  for curve in "$WORK/$exp"/runs/*/curve.json; do  # induction: the curves of runs stopped before their end
    [ -f "$curve" ] && cp "$curve" "$BUNDLE/$exp/curve-$(basename "$(dirname "$curve")").json"
  done
  [ -f "$WORK/$exp/results.md" ] && tee -a "$OUT/log.txt" < "$WORK/$exp/results.md"
done
tar -czf "$OUT/repro_results.tar.gz" -C "$BUNDLE" .
log "wrote $OUT/repro_results.tar.gz ($(du -h "$OUT/repro_results.tar.gz" | cut -f1))"
