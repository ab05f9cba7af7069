#!/usr/bin/env bash
# Build, test, sanitize and benchmark on a machine with an NVIDIA GPU and torch installed, in one
# call (`make bench-gpu`). Stages: build test sanitize step ops train ddp (default: all but ddp;
# e.g. `scripts/gpu.sh build test` for some). BENCH_ARGS narrows the ops stage (e.g.
# "--dtype bf16 --layout channels_last"); TEST_TIMEOUT (seconds) bounds the test stage. The test stage runs the GPU tests only (the CPU ones run in
# CI) and prints one line per test, so a log cut short still says what passed. Logs and results go
# to $RESULTS_DIR (default gpu-results/); the last lines printed are a summary.
set -uo pipefail
cd "$(dirname "$0")/.."
RESULTS_DIR=${RESULTS_DIR:-gpu-results}
STAGES=${*:-build test sanitize step ops train}
BENCH_ARGS=${BENCH_ARGS:-}
mkdir -p "$RESULTS_DIR"
export CUDA_HOME=${CUDA_HOME:-/usr/local/cuda}
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
export MAX_JOBS=${MAX_JOBS:-$(nproc)}
export PYTHONUNBUFFERED=1
PY=${PY:-python3}
summary=()
stage() { case " $STAGES " in *" $1 "*) return 0 ;; *) return 1 ;; esac; }
record() { summary+=("$1: $2"); echo "== $1: $2"; }

if stage build; then
  start=$SECONDS
  if $PY -m pip install --no-build-isolation --no-deps -e . >"$RESULTS_DIR/build.log" 2>&1; then
    record build "ok in $((SECONDS - start)) s"
  else
    tail -60 "$RESULTS_DIR/build.log"; record build "FAILED"; exit 1
  fi
  $PY -m alexnet_fast.cli info | tee "$RESULTS_DIR/info.txt"
fi

if stage test; then
  # Compiling the Triton kernels of every test case dominates a first run: spread the tests over
  # processes when pytest-xdist is installed.
  parallel=()
  # One thread each for the float64 CPU references, or the processes oversubscribe the cores.
  if $PY -c "import xdist" 2>/dev/null; then
    parallel=(-n "${TEST_PROCS:-8}")
    export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
  fi
  # shellcheck disable=SC2086
  ${TEST_TIMEOUT:+timeout $TEST_TIMEOUT} $PY -m pytest tests -k cuda "${parallel[@]}" -v --tb=short --durations=15 -p no:cacheprovider 2>&1 | tee "$RESULTS_DIR/tests.log" \
    | grep -E "FAILED|ERROR|passed|failed" | tail -40
  record tests "$(tail -1 "$RESULTS_DIR/tests.log")"
fi

if stage sanitize; then
  bash scripts/sanitize.sh 2>&1 | tee "$RESULTS_DIR/sanitize.log" | tail -20
  record sanitize "exit ${PIPESTATUS[0]}"
fi

if stage step; then
  $PY -m alexnet_fast.cli bench --train-step --out "$RESULTS_DIR" 2>&1 | tee "$RESULTS_DIR/step.log" | tail -30
  record step "exit ${PIPESTATUS[0]}"
fi

if stage ops; then
  # shellcheck disable=SC2086
  $PY -m alexnet_fast.cli bench --ops $BENCH_ARGS --out "$RESULTS_DIR" 2>&1 | tee "$RESULTS_DIR/ops.log" | tail -80
  record ops "exit ${PIPESTATUS[0]}"
fi

# The training loop's own speed (data pipeline and optimizer included), to set against the pure
# step of the `step` stage: the seed model, bf16, channels_last, batch 128, backend auto.
TRAIN_FLAGS="--data synthetic --limit 8192 --epochs 2 --batch-size 128 --amp bf16 --channels-last \
  --backend auto --lr 0.01 --progress --keep-checkpoints 1 --overwrite"
if stage train; then
  # shellcheck disable=SC2086
  $PY -m alexnet_fast.cli train $TRAIN_FLAGS --out "$RESULTS_DIR/train" 2>&1 | tee "$RESULTS_DIR/train.log" | tail -8
  record train "exit ${PIPESTATUS[0]}"
fi

# Weak scaling: the same per-GPU batch on 1, 2, 4... GPUs through torchrun.
if stage ddp; then
  gpus=$($PY -c "import torch; print(torch.cuda.device_count())")
  for n in 1 2 4 8; do
    [ "$n" -le "$gpus" ] || break
    # shellcheck disable=SC2086
    torchrun --standalone --nproc_per_node="$n" -m alexnet_fast.train $TRAIN_FLAGS --no-progress \
      --out "$RESULTS_DIR/ddp$n" >"$RESULTS_DIR/ddp$n.log" 2>&1
    record "ddp $n GPU" "exit $?: $(grep -E 'img/s' "$RESULTS_DIR/ddp$n.log" | tail -1)"
  done
fi

printf '%s\n' "${summary[@]}"
