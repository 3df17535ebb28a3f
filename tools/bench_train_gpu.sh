#!/usr/bin/env bash
# The training-throughput and FP8 evidence of docs/benchmarks.md in one GPU session that watches its own clock
# (DEADLINE_S, default 375 s on one H100). Parts, in order, each writing its JSON to $OUT as soon as it ends:
#   A. the CUDA extension builds on the CPU in the background while the GPU runs, one after another:
#      A1. the FP8 GPU checks (tests/test_fp8.py -k cuda: FP8 linear against emulation and bf16, a compiled FP8
#          layer in one graph) -> train_fp8_checks_v2.json;
#      A2. the FP8 peer at the 7B layer shape (d 4096, 4 layers): transformers bf16 + model.compile() and
#          transformers + torchao float8 + model.compile(), each in its own process -> train_7b_peers_v2.json
#          (the peers do not use the extension; their whole-model compile is what a 1.1B run cannot afford here);
#   B. (extension built) tools/bench_train.py --isolate at the 1.1B shape: ours bf16 and FP8 at n = 1, 4 (one
#      process), then transformers + Liger (ROWS_B) -> train_fp8_1b_v2.json;
#   C. ours bf16 / FP8 at the 7B layer shape -> train_7b_ours_v2.json, merged with A2's rows into
#      train_fp8_7b_layer_v2.json (bench_train.py --merge: the ratios over both);
#   B2. with CSTEP=1: ours bf16 at 1.1B again (ROWS_CSTEP, default fast:1,fast:4) with the compiled optimizer
#      step -> train_cstep_1b_v2.json, to set against B's rows (torch's fused AdamW, same machine);
#   D. with LOSS=1 and time left: the ~100M code model trained LOSS_ITERS steps bf16 and, beside it, with
#      train.fp8, then both final checkpoints evaluated with bf16 GEMMs -> train_fp8_loss_v2.json.
# Every part is time-boxed from what is left; a part that fails is logged and the next one runs.
#
#   bash tools/bench_train_gpu.sh                       # on the GPU machine, from the repository root
#   QUICK=1 DEVICE=cpu bash tools/bench_train_gpu.sh    # a dry run of the plumbing at tiny size on a CPU
set -u
OUT=${OUT:-benchmarks}
DEADLINE_S=${DEADLINE_S:-375}
LOSS=${LOSS:-0}
LOSS_ITERS=${LOSS_ITERS:-300}
CSTEP=${CSTEP:-0}
QUICK=${QUICK:-0}
DEVICE=${DEVICE:-cuda}
TAG=${TAG:-_v2}
mkdir -p "$OUT"
WORK=$(mktemp -d)
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
export PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True
LOG=$OUT/log.txt
T0=${T0:-$(date +%s)}  # the caller may start the clock earlier (e.g. before installing wheels)
left() { echo $((DEADLINE_S - ($(date +%s) - T0))); }
say() { echo "[$(($(date +%s) - T0))s] $*" | tee -a "$LOG"; }

say "start $(date -u +%FT%TZ) device=$DEVICE deadline=${DEADLINE_S}s"
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv 2>&1 | tee -a "$LOG"
python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)
for m in ('liger_kernel', 'torchao'):
    try:
        mod = __import__(m); print(m, getattr(mod, '__version__', '?'))
    except Exception as e: print(m, 'unavailable:', type(e).__name__, e)" 2>&1 | grep -v Warning | tee -a "$LOG"

if [ "$QUICK" = 1 ]; then
  SHAPE_B=tiny-gqa; SHAPE_C=tiny-mha
  ROWS_A=${ROWS_A:-hf:1}; ROWS_B=${ROWS_B:-fast:1,fast-fp8:1,hf:1}; ROWS_C=${ROWS_C:-fast:1,fast-fp8:1}
  ROWS_CSTEP=${ROWS_CSTEP:-fast:1}
  BENCH=(--tiny --warmup 1 --steps 1 --ce-backend torch)
else
  SHAPE_B=1.1b; SHAPE_C=7b-layer
  ROWS_A=${ROWS_A:-hf-fp8:1,hf-compile:1}
  ROWS_B=${ROWS_B:-fast:1,fast:4,fast-fp8:1,fast-fp8:4,hf-liger:1}
  ROWS_C=${ROWS_C:-fast:1,fast-fp8:1}
  ROWS_CSTEP=${ROWS_CSTEP:-fast:1,fast:4}
  BENCH=(--warmup 3 --steps 6)
fi
bench() {  # name budget_s output shape rows extra...
  local name=$1 budget=$2 out=$3 shape=$4 rows=$5; shift 5
  if [ "$budget" -lt 30 ]; then say "$name: skipped (${budget}s left for it)"; return; fi
  say "$name: $shape $rows, budget ${budget}s"
  timeout $((budget + 10)) python3 tools/bench_train.py --isolate --skip-extras --attention default "${BENCH[@]}" \
    --shapes "$shape" --rows "$rows" --time-budget-s "$budget" --output "$out" "$@" \
    2>>"$WORK/bench_err.txt" | grep -v "^\s*$" | tee -a "$LOG"
  echo "$name rc=${PIPESTATUS[0]}" | tee -a "$LOG"
  tail -3 "$WORK/bench_err.txt" >> "$LOG"; : > "$WORK/bench_err.txt"
}

# ---- A: extension build (CPU, background) | FP8 checks, then the 7B-layer peers (GPU)
BUILD=
if [ "$DEVICE" = cuda ]; then
  (MAX_JOBS=6 python3 setup.py build_ext --inplace > "$WORK/build.txt" 2>&1; echo "build rc=$? at $(($(date +%s) - T0))s" >> "$WORK/build.txt") &
  BUILD=$!
  say "A1: FP8 GPU checks"
  FP8_CHECK_JSON=$OUT/train_fp8_checks$TAG.json timeout 120 python3 -m pytest -q -s -x tests/test_fp8.py -k cuda \
    > "$WORK/checks.txt" 2>&1
  echo "fp8 checks rc=$?" >> "$WORK/checks.txt"
  grep -E "fp8 check|passed|failed|Error|rc=" "$WORK/checks.txt" | tail -12 | tee -a "$LOG"
fi
A2_BUDGET=$(( $(left) - ${RESERVE_BC:-165} ))
[ "$A2_BUDGET" -gt 200 ] && A2_BUDGET=200
bench A2 "$A2_BUDGET" "$OUT/train_7b_peers$TAG.json" "$SHAPE_C" "$ROWS_A" --profile none
if [ -n "$BUILD" ]; then
  while kill -0 "$BUILD" 2>/dev/null && [ "$(left)" -gt 120 ]; do sleep 2; done
  kill -0 "$BUILD" 2>/dev/null && say "extension build still running: the rows below use the PyTorch CE fallback"
  tail -2 "$WORK/build.txt" | tee -a "$LOG"
fi
say "phase A done"

# ---- B: 1.1B, ours (one process) then Liger (its own)
RES_C=$([ "$QUICK" = 1 ] && echo 20 || echo 60)
bench B $(( $(left) - RES_C )) "$OUT/train_fp8_1b$TAG.json" "$SHAPE_B" "$ROWS_B" --profile fast:1,fast-fp8:1
# ---- B2 (CSTEP=1): the same machine's bf16 rows again with the compiled optimizer step (optimizer.compiled_step),
# beside B's, which ran torch's fused AdamW
if [ "$CSTEP" = 1 ]; then
  bench B2 $(( $(left) - RES_C )) "$OUT/train_cstep_1b$TAG.json" "$SHAPE_B" "$ROWS_CSTEP" --profile fast:1 \
    --compiled-optimizer-step
fi
# ---- C: ours at the 7B layer shape
bench C $(( $(left) - 15 )) "$OUT/train_7b_ours$TAG.json" "$SHAPE_C" "$ROWS_C" --profile none
python3 tools/bench_train.py --merge "$OUT/train_7b_ours$TAG.json" "$OUT/train_7b_peers$TAG.json" \
  --output "$OUT/train_fp8_7b_layer$TAG.json" \
  2>&1 | tail -12 | tee -a "$LOG"

# ---- D: the loss comparison, if asked and it fits: both runs side by side, then each final checkpoint evaluated on
# the validation split with bf16 GEMMs (mtp-eval-perplexity builds the plain model), which separates "FP8 trained
# worse weights" from "FP8's forward rounding adds loss at every step"
if [ "$LOSS" = 1 ] && [ "$(left)" -gt 75 ]; then
  # validation at the last step in each run's own regime (FP8 GEMMs for the FP8 run)
  LOSS_EXTRA=(--train.compile true --logging.interval 10 --train.iters "$LOSS_ITERS"
              --train.eval_interval "$LOSS_ITERS" --train.eval_iters 8)
  FP8_FLAG=(--train.fp8 true)
  EVAL_DEV=(--device cuda --dtype bfloat16)
  if [ "$QUICK" = 1 ]; then
    LOSS_EXTRA=(--model.hidden_size 64 --model.num_attention_heads 4 --model.num_kv_heads 2 --model.ffn_hidden_size 128
                --model.num_layers 4 --mtp.n_heads 2 --train.micro_batch_size 4 --data.seq_length 64
                --train.device "$DEVICE" --train.dtype float32 --logging.interval 5 --train.iters "$LOSS_ITERS"
                --optimizer.warmup_iters 2 --train.eval_interval "$LOSS_ITERS" --train.eval_iters 2)
    [ "$DEVICE" = cpu ] && { FP8_FLAG=(); EVAL_DEV=(--device cpu); }  # no FP8 tensor cores: plumbing only
  fi
  LOSS_S=$(( $(left) - 35 ))
  say "D: loss comparison, $LOSS_ITERS steps, ${LOSS_S}s"
  for name in bf16 fp8; do
    extra=(); [ "$name" = fp8 ] && extra=("${FP8_FLAG[@]}")
    timeout -s TERM "$LOSS_S" python3 -m megatron_mtp.train --config configs/code_100m.yaml \
      --train.run_dir "$WORK/loss_$name" "${LOSS_EXTRA[@]}" "${extra[@]}" > "$WORK/loss_$name.txt" 2>&1 &
    sleep 5  # the corpus build takes a lock; the second run waits on it and reuses it
  done
  wait
  for name in bf16 fp8; do tail -2 "$WORK/loss_$name.txt" | cut -c1-200 | tee -a "$LOG"; done
  EVAL_S=$(( $(left) - 12 ))
  for name in bf16 fp8; do
    timeout "$EVAL_S" python3 -m megatron_mtp.cli.eval_perplexity --load "$WORK/loss_$name" "${EVAL_DEV[@]}" \
      --max-samples "${EVAL_SAMPLES:-128}" --batch-size 8 --no-progress --output "$WORK/eval_$name.json" \
      > "$WORK/eval_$name.txt" 2>&1 &
  done
  wait
  python3 tools/compare_loss_runs.py "$WORK/loss_bf16" "$WORK/loss_fp8" --labels bf16,fp8 \
    --eval "bf16=$WORK/eval_bf16.json,fp8=$WORK/eval_fp8.json" \
    --title "configs/code_100m.yaml (n = 4), $LOSS_ITERS steps: bf16 vs train.fp8" \
    --meta "{\"device\": \"$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1)\", \"date\": \"$(date -u +%FT%TZ)\", \"command\": \"python -m megatron_mtp.train --config configs/code_100m.yaml ${LOSS_EXTRA[*]} [--train.fp8 true]; both runs side by side on one GPU; then mtp-eval-perplexity --load RUN ${EVAL_DEV[*]} --max-samples ${EVAL_SAMPLES:-128} on each\"}" \
    --output "$OUT/train_fp8_loss$TAG.json" 2>&1 | tail -40 | tee -a "$LOG"
  tail -3 "$WORK/eval_fp8.txt" >> "$LOG"
fi
say "done"
