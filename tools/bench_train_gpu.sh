#!/usr/bin/env bash
# The training-throughput and FP8 evidence of docs/benchmarks.md in one GPU session (about 8 minutes, one H100):
#   A. at once: the CUDA extension builds (CPU); the FP8 GPU checks run (tests/test_fp8.py -k cuda: FP8 linear
#      against emulation and bf16, a compiled FP8 layer in one graph); the ~100M code model (configs/
#      code_100m.yaml) trains LOSS_ITERS steps in bf16 and, beside it, with train.fp8 -> train_fp8_loss.json;
#   B. tools/bench_train.py --isolate at the 1.1B shape: ours bf16 and FP8 at n = 1, 4 (one process), then each
#      peer in its own process (transformers + Liger, + torchao float8 + compile, + model.compile(), the HF
#      Trainer's autocast regime) -> train_fp8_1b.json;
#   C. the same at the 7B layer shape (4 layers): ours bf16 / FP8, torchao float8 + compile, bf16 + compile
#      -> train_fp8_7b_layer.json.
# Everything lands in $OUT (default benchmarks/): five JSON files and log.txt. On one H100 the whole plan does not
# fit a 500 s session: the compile-heavy peers (torchao float8 + compile, model.compile()) need ~2 min each;
# ROWS_B / ROWS_C / LOSS=0 select a part.
#
#   bash tools/bench_train_gpu.sh                       # on the GPU machine, from the repository root
#   QUICK=1 DEVICE=cpu bash tools/bench_train_gpu.sh    # a dry run of the plumbing at tiny size on a CPU
set -u
OUT=${OUT:-benchmarks}
DEADLINE_S=${DEADLINE_S:-470}   # the whole script's budget: later phases get what is left
LOSS_ITERS=${LOSS_ITERS:-300}
LOSS_S=${LOSS_S:-130}
QUICK=${QUICK:-0}
DEVICE=${DEVICE:-cuda}
mkdir -p "$OUT"
WORK=$(mktemp -d)
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
export PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True
LOG=$OUT/log.txt
T0=$(date +%s)
left() { echo $((DEADLINE_S - ($(date +%s) - T0))); }
say() { echo "[$(($(date +%s) - T0))s] $*" | tee -a "$LOG"; }

say "start $(date -u +%FT%TZ) device=$DEVICE"
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv 2>&1 | tee -a "$LOG"
python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)
for m in ('liger_kernel', 'torchao', 'deepspeed'):
    try:
        mod = __import__(m); print(m, getattr(mod, '__version__', '?'))
    except Exception as e: print(m, 'unavailable:', type(e).__name__, e)" 2>&1 | tee -a "$LOG"

# ---- A: extension build | FP8 checks | the loss comparison, side by side
if [ "$DEVICE" = cuda ]; then
  (MAX_JOBS=8 python3 setup.py build_ext --inplace > "$WORK/build.txt" 2>&1; echo "build rc=$?" >> "$WORK/build.txt") &
  BUILD=$!
  (FP8_CHECK_JSON=$OUT/train_fp8_checks.json timeout 150 python3 -m pytest -q -s -x tests/test_fp8.py -k cuda \
     > "$WORK/checks.txt" 2>&1; echo "fp8 checks rc=$?" >> "$WORK/checks.txt"
   # saved-for-backward bytes per token of one layer (the memory planner's coefficients), compiled and eager,
   # bf16 and FP8, at two SwiGLU widths (so the f and d coefficients separate)
   timeout 200 python3 - "$OUT/train_saved_bytes.json" >> "$WORK/checks.txt" 2>&1 <<'PY'
import json, sys, torch
from megatron_mtp.config import ModelConfig
from megatron_mtp.training import memory_model as mm
out = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "rows": []}
for f in (5632, 11264):
    m = ModelConfig(hidden_size=2048, num_attention_heads=32, num_kv_heads=4, ffn_hidden_size=f)
    for compiled in (True, False):
        for fp8 in (False, True):
            try:
                meas = mm.measure_layer_saved_bytes(m, precision="bf16", compiled=compiled, fp8=fp8, device="cuda",
                                                    batch=(1, 2), seq=512)
            except Exception as exc:
                meas = f"{type(exc).__name__}: {exc}"[:300]
            row = dict(d=2048, f=f, kv_heads=4, heads=32, compiled=compiled, fp8=fp8, measured=meas,
                       formula=mm.formula_bytes_per_token(m, "bf16_master", compiled, fp8))
            out["rows"].append(row)
            print("saved bytes/token", row, flush=True)
            with open(sys.argv[1], "w") as fh:
                json.dump(out, fh, indent=1)
PY
   echo "saved bytes rc=$?" >> "$WORK/checks.txt") &
  CHECKS=$!
else
  BUILD= ; CHECKS=
fi
LOSS_EXTRA=(--train.compile true --logging.interval 10 --checkpoint.save false --train.iters "$LOSS_ITERS"
)
FP8_FLAG=(--train.fp8 true)
if [ "$QUICK" = 1 ]; then
  LOSS_EXTRA=(--model.hidden_size 64 --model.num_attention_heads 4 --model.num_kv_heads 2 --model.ffn_hidden_size 128
              --model.num_layers 4 --mtp.n_heads 2 --train.micro_batch_size 4 --data.seq_length 64
              --train.device "$DEVICE" --train.dtype float32 --logging.interval 5 --checkpoint.save false
              --train.iters "$LOSS_ITERS" --optimizer.warmup_iters 2)
  [ "$DEVICE" = cpu ] && FP8_FLAG=()  # the CPU has no FP8 tensor cores: the dry run checks the plumbing only
fi
loss_run() {  # name extra-args...
  local name=$1; shift
  timeout -s TERM "$LOSS_S" python3 -m megatron_mtp.train --config configs/code_100m.yaml \
    --train.run_dir "$WORK/loss_$name" "${LOSS_EXTRA[@]}" "$@" > "$WORK/loss_$name.txt" 2>&1
  echo "loss run $name rc=$?" >> "$LOG"
}
LOSS=${LOSS:-1}  # LOSS=0 skips the loss comparison (e.g. a session for the peers alone)
if [ "$LOSS" = 1 ]; then
loss_run bf16 &
L1=$!
sleep 5  # the corpus build takes a lock; the second run waits on it and reuses it
loss_run fp8 "${FP8_FLAG[@]}" &
L2=$!
wait $L1 $L2
for f in bf16 fp8; do echo "== loss run $f (tail)" >> "$LOG"; tail -5 "$WORK/loss_$f.txt" >> "$LOG"; done
python3 tools/compare_loss_runs.py "$WORK/loss_bf16" "$WORK/loss_fp8" --labels bf16,fp8 \
  --title "configs/code_100m.yaml (n = 4), $LOSS_ITERS steps: bf16 vs train.fp8" \
  --meta "{\"device\": \"$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1)\", \"date\": \"$(date -u +%FT%TZ)\", \"command\": \"python -m megatron_mtp.train --config configs/code_100m.yaml ${LOSS_EXTRA[*]} [--train.fp8 true]; both runs side by side on one GPU; CE backend: PyTorch fallback (the extension was still building)\"}" \
  --output "$OUT/train_fp8_loss.json" 2>&1 | tail -25 | tee -a "$LOG"
say "loss comparison done"
fi
if [ -n "$CHECKS" ]; then wait $CHECKS; fi
[ -f "$WORK/checks.txt" ] && { echo "== fp8 checks" >> "$LOG"; grep -E "fp8 check|saved bytes|passed|failed|Error|rc=" "$WORK/checks.txt" | tail -20 | tee -a "$LOG"; }
if [ -n "$BUILD" ]; then wait $BUILD; fi
[ -f "$WORK/build.txt" ] && tail -3 "$WORK/build.txt" | tee -a "$LOG"
say "phase A done"

# ---- B: 1.1B, ours then every peer, each peer in its own process
if [ "$QUICK" = 1 ]; then
  SHAPE_B=tiny-gqa; SHAPE_C=tiny-mha; ROWS_B=fast:1,fast-fp8:1,hf:1; ROWS_C=fast:1,fast-fp8:1
  BENCH=(--tiny --warmup 1 --steps 1 --ce-backend torch)
else
  SHAPE_B=1.1b; SHAPE_C=7b-layer
  # override to spend a session on the compile-heavy peers alone, e.g. ROWS_B=fast:1,hf-fp8:1,hf-compile:1,hf:1
  ROWS_B=${ROWS_B:-fast:1,fast:4,fast-fp8:1,fast-fp8:4,hf-liger:1,hf-fp8:1,hf-compile:1,hf:1}
  ROWS_C=${ROWS_C:-fast:1,fast-fp8:1,hf-fp8:1,hf-compile:1}
  BENCH=(--warmup 3 --steps 6)
fi
BUDGET_B=$(( $(left) - 130 ))
say "phase B: $SHAPE_B, budget ${BUDGET_B}s"
timeout $((BUDGET_B + 30)) python3 tools/bench_train.py --isolate --skip-extras --attention default "${BENCH[@]}" \
  --shapes "$SHAPE_B" --rows "$ROWS_B" --profile fast:1,fast-fp8:1 --time-budget-s "$BUDGET_B" \
  --output "$OUT/train_fp8_1b.json" 2>>"$WORK/bench_b_err.txt" | grep -v "^\s*$" | tee -a "$LOG"
tail -5 "$WORK/bench_b_err.txt" >> "$LOG"

# ---- C: the 7B layer shape
BUDGET_C=$(( $(left) - 10 ))
say "phase C: $SHAPE_C, budget ${BUDGET_C}s"
if [ "$BUDGET_C" -gt 40 ]; then
  timeout $((BUDGET_C + 5)) python3 tools/bench_train.py --isolate --skip-extras --attention default "${BENCH[@]}" \
    --shapes "$SHAPE_C" --rows "$ROWS_C" --profile none --time-budget-s "$BUDGET_C" \
    --output "$OUT/train_fp8_7b_layer.json" 2>>"$WORK/bench_c_err.txt" | grep -v "^\s*$" | tee -a "$LOG"
  tail -5 "$WORK/bench_c_err.txt" >> "$LOG"
fi
say "done"
