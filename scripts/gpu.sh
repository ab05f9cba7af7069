#!/usr/bin/env bash
# Build, test, sanitize and benchmark on a machine with an NVIDIA GPU and torch installed, in one
# call (`make bench-gpu`). Stages: build test sanitize step ops (default: all; e.g.
# `scripts/gpu.sh build test` for some). The test stage runs the GPU tests only (the CPU ones run in
# CI) and prints one line per test, so a log cut short still says what passed. Logs and results go
# to $RESULTS_DIR (default gpu-results/); the last lines printed are a summary.
set -uo pipefail
cd "$(dirname "$0")/.."
RESULTS_DIR=${RESULTS_DIR:-gpu-results}
STAGES=${*:-build test sanitize step ops}
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
  $PY -m pytest tests -k cuda -v --tb=short --durations=15 -p no:cacheprovider 2>&1 | tee "$RESULTS_DIR/tests.log" \
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
  $PY -m alexnet_fast.cli bench --ops --out "$RESULTS_DIR" 2>&1 | tee "$RESULTS_DIR/ops.log" | tail -80
  record ops "exit ${PIPESTATUS[0]}"
fi

printf '%s\n' "${summary[@]}"
