#!/usr/bin/env bash
# Build, test, sanitize and benchmark on a machine with NVIDIA GPUs and torch installed, in one
# call (`make bench-gpu`).
#
#   scripts/gpu.sh [STAGE ...]     stages: build test sanitize step ops train ddp
#                                  (default: all but ddp; e.g. `scripts/gpu.sh build test`)
#
# After the build, the other stages are independent jobs. With one GPU they run one after another.
# With several, each GPU ("lane", one CUDA_VISIBLE_DEVICES each) takes the next job from a queue
# whenever it is free, the longest jobs first, so the lanes finish close together; the per-op
# benchmark becomes one job per dtype and kernel group. Each benchmark job writes its own CSV and
# they are merged into $RESULTS_DIR/<gpu>.csv at the end (`bench --merge`). Every benchmark times
# on its own GPU, with CUDA events; a lane's neighbours only share the host.
#
# Settings (environment):
#   SCOPE         "full" (default): every benchmark, spread over the GPUs (a per-op dtype alone
#                 takes about 5 minutes of a GPU). "core": what one GPU does in under 10 minutes: the
#                 build, the GPU tests, the sanitizers, the training step at B=128 (bf16, TF32,
#                 fp32; eager, torch.compile and the graphed auto step) and the per-op benchmark of
#                 LRN, max-pool and LRN->max-pool (bf16 and fp32, channels_last; eager, native and
#                 auto). The settings below override either scope's.
#   RESULTS_DIR   logs and results (default gpu-results/); the last lines printed are a summary
#   BENCH_DTYPES  dtypes of the per-op benchmark (default "bf16 fp32 tf32 fp16")
#   BENCH_ARGS    further narrowing of the per-op benchmark (e.g. "--layout nhwc --mode fwd+bwd")
#   OPS_GROUPS    with several GPUs, the per-op jobs of each dtype: space-separated groups of
#                 comma-separated kernels (default: the convolutions, and LRN with the pools;
#                 "" for one job per dtype)
#   STEP_ARGS     narrowing of the training-step benchmark (e.g. "--batch-size 128")
#   TEST_TIMEOUT  seconds that bound the test stage; TEST_PROCS its pytest-xdist processes
#   GPU_LANES     GPUs to spread the jobs over (default: all that torch sees)
# The test stage runs the GPU tests only (the CPU ones run in CI) and prints one line per test;
# failures are written to $RESULTS_DIR/failures.log as they happen, so a log cut short still says
# what passed and what failed.
set -uo pipefail
cd "$(dirname "$0")/.."
RESULTS_DIR=${RESULTS_DIR:-gpu-results}
SCOPE=${SCOPE:-full}
case $SCOPE in
  full) STAGES=${*:-build test sanitize step ops train} ;;
  core)
    STAGES=${*:-build test sanitize step ops}
    BENCH_DTYPES=${BENCH_DTYPES:-bf16 fp32}
    BENCH_ARGS=${BENCH_ARGS:---layout nhwc --kernels lrn,max_pool2d,lrn_max_pool2d --providers eager,native,auto}
    STEP_ARGS=${STEP_ARGS:---batch-size 128 --dtype bf16,tf32,fp32 --providers eager,compile,auto+cudagraph} ;;
  *) echo "SCOPE must be full or core, got '$SCOPE'" >&2; exit 2 ;;
esac
BENCH_DTYPES=${BENCH_DTYPES:-bf16 fp32 tf32 fp16}
BENCH_ARGS=${BENCH_ARGS:-}
OPS_GROUPS=${OPS_GROUPS-conv1,conv2,conv3,conv4,conv5 lrn,max_pool2d,lrn_max_pool2d}
STEP_ARGS=${STEP_ARGS:-}
mkdir -p "$RESULTS_DIR"
RESULTS_DIR=$(cd "$RESULTS_DIR" && pwd)
export CUDA_HOME=${CUDA_HOME:-/usr/local/cuda}
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
export MAX_JOBS=${MAX_JOBS:-$(nproc)}
export PYTHONUNBUFFERED=1
export ALEXNET_FAST_FAILURE_LOG=${ALEXNET_FAST_FAILURE_LOG:-$RESULTS_DIR/failures.log}
PY=${PY:-python3}
SUMMARY=$RESULTS_DIR/summary.txt
: >"$SUMMARY"
stage() { case " $STAGES " in *" $1 "*) return 0 ;; *) return 1 ;; esac; }
# lanes run in subshells: the summary is a file
record() { echo "$1: $2" >>"$SUMMARY"; echo "== $1: $2"; }

if stage build; then
  start=$SECONDS
  if $PY -m pip install --no-build-isolation --no-deps -e . >"$RESULTS_DIR/build.log" 2>&1; then
    record build "ok in $((SECONDS - start)) s"
  else
    tail -60 "$RESULTS_DIR/build.log"; record build "FAILED"; exit 1
  fi
  $PY -m alexnet_fast.cli info | tee "$RESULTS_DIR/info.txt"
fi

# --- the jobs -------------------------------------------------------------------------------------
job_test() {
  local t0=$SECONDS
  # Compiling the Triton kernels of every test case dominates a first run: spread the tests over
  # processes when pytest-xdist is installed, one CPU thread each for the float64 CPU references,
  # or the processes oversubscribe the cores.
  local parallel=()
  if $PY -c "import xdist" 2>/dev/null; then
    parallel=(-n "${TEST_PROCS:-8}")
    export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
  fi
  # shellcheck disable=SC2086
  ${TEST_TIMEOUT:+timeout $TEST_TIMEOUT} $PY -m pytest tests -k cuda "${parallel[@]}" -v --tb=short \
    --durations=15 -p no:cacheprovider >"$RESULTS_DIR/tests.log" 2>&1
  grep -E "FAILED|ERROR" "$RESULTS_DIR/tests.log" | tail -40
  record tests "$(tail -1 "$RESULTS_DIR/tests.log") ($((SECONDS - t0)) s)"
}

job_sanitize() {
  local t0=$SECONDS
  bash scripts/sanitize.sh >"$RESULTS_DIR/sanitize.log" 2>&1
  local rc=$?
  grep "^== " "$RESULTS_DIR/sanitize.log"
  record sanitize "exit $rc in $((SECONDS - t0)) s"
}

job_step() {
  local t0=$SECONDS
  # shellcheck disable=SC2086
  $PY -m alexnet_fast.cli bench --train-step $STEP_ARGS --no-plots --out "$RESULTS_DIR/bench-step" >"$RESULTS_DIR/step.log" 2>&1
  record step "exit $? in $((SECONDS - t0)) s"
}

job_ops() {  # $1: the dtypes, comma-separated; $2: the kernels, comma-separated (empty: all)
  local tag=${1//,/-}${2:+-${2%%,*}} t0=$SECONDS  # e.g. bf16-conv1, fp32-lrn
  # shellcheck disable=SC2086
  $PY -m alexnet_fast.cli bench --ops $BENCH_ARGS --dtype "$1" ${2:+--kernels "$2"} --no-plots \
    --out "$RESULTS_DIR/bench-ops-$tag" >"$RESULTS_DIR/ops-$tag.log" 2>&1
  record "ops $1${2:+ $2}" "exit $? in $((SECONDS - t0)) s"
}

# The training loop's own speed (data pipeline and optimizer included), to set against the pure
# step of the `step` stage: the seed model, bf16, channels_last, batch 128, backend auto; the
# one-GPU run replays its step from a CUDA graph (--cuda-graph), the torchrun runs are eager.
TRAIN_FLAGS="--data synthetic --limit 8192 --epochs 2 --batch-size 128 --amp bf16 --channels-last \
  --backend auto --lr 0.01 --keep-checkpoints 1 --overwrite --no-progress"
job_train() {
  local t0=$SECONDS
  # shellcheck disable=SC2086
  $PY -m alexnet_fast.cli train $TRAIN_FLAGS --cuda-graph --out "$RESULTS_DIR/train" >"$RESULTS_DIR/train.log" 2>&1
  record train "exit $? in $((SECONDS - t0)) s: $(grep -E 'img/s' "$RESULTS_DIR/train.log" | tail -1)"
}

run_job() {
  case $1 in
    test) job_test ;;
    sanitize) job_sanitize ;;
    step) job_step ;;
    train) job_train ;;
    ops:*) local spec=${1#ops:}; job_ops "${spec%%:*}" "${spec#*:}" ;;
  esac
}

# --- deal the jobs to the GPUs ---------------------------------------------------------------------
visible=$($PY -c "import torch; print(torch.cuda.device_count())")
[ "$visible" -ge 1 ] 2>/dev/null || { echo "no CUDA device visible to torch" >&2; exit 1; }
# the GPUs' ids as CUDA_VISIBLE_DEVICES names them (it may already hold a subset)
if [ -n "${CUDA_VISIBLE_DEVICES:-}" ]; then IFS=, read -r -a devices <<<"$CUDA_VISIBLE_DEVICES"
else devices=(); for ((i = 0; i < visible; i++)); do devices+=("$i"); done; fi
lanes=${GPU_LANES:-$visible}
[ "$lanes" -le "${#devices[@]}" ] || lanes=${#devices[@]}
# The jobs, about longest first (a 2-GPU run measured the tests with the sanitizers at about 250
# s, a per-op dtype at about 330 s, the step at B=128 at about 80 s). An ops job is
# ops:DTYPES:KERNELS.
jobs=()
# test and sanitize share a job: both are short, and the sanitizer wants a quiet GPU
if stage test && stage sanitize; then jobs+=("test+sanitize")
elif stage test; then jobs+=(test)
elif stage sanitize; then jobs+=(sanitize); fi
if stage ops; then
  if [ "$lanes" -gt 1 ]; then
    read -r -a groups <<<"$OPS_GROUPS"
    [ "${#groups[@]}" -gt 0 ] || groups=("")  # one job per dtype, every kernel
    for group in "${groups[@]}"; do
      for d in $BENCH_DTYPES; do
        [[ $d == tf32 && -n $group && $group != *conv* ]] && continue  # TF32 is a convolution mode
        jobs+=("ops:$d:$group")
      done
    done
  else
    jobs+=("ops:$(echo "$BENCH_DTYPES" | tr ' ' ','):")
  fi
fi
stage step && jobs+=(step)
stage train && jobs+=(train)

QUEUE=$RESULTS_DIR/.jobs
next_job() {  # prints the queue's first job and removes it; fails when the queue is empty
  local job
  until mkdir "$QUEUE.lock" 2>/dev/null; do sleep 0.1; done  # mkdir: an atomic lock
  job=$(head -n 1 "$QUEUE")
  sed -i 1d "$QUEUE"
  rmdir "$QUEUE.lock"
  [ -n "$job" ] && printf '%s\n' "$job"
}

run_lane() {  # $1: the GPU. Call it in a subshell (it sets the GPU).
  local job part
  export CUDA_VISIBLE_DEVICES=$1
  while job=$(next_job); do
    echo "GPU $1: $job"
    for part in ${job//+/ }; do run_job "$part"; done
  done
}

if [ "${#jobs[@]}" -gt 0 ]; then
  start=$SECONDS
  rm -rf "$QUEUE.lock"
  printf '%s\n' "${jobs[@]}" >"$QUEUE"
  for ((lane = 0; lane < lanes; lane++)); do
    (run_lane "${devices[lane]}") &
  done
  wait
  rm -f "$QUEUE"
  record jobs "${jobs[*]} on $lanes GPU(s) in $((SECONDS - start)) s"
fi

# One results CSV, markdown and plots from every benchmark job of this run.
csvs=()
for dir in "$RESULTS_DIR"/bench-step "$RESULTS_DIR"/bench-ops-*; do
  [ -d "$dir" ] && for f in "$dir"/*.csv; do [ -f "$f" ] && csvs+=("$f"); done
done
if [ "${#csvs[@]}" -gt 0 ]; then
  $PY -m alexnet_fast.cli bench --merge "${csvs[@]}" --out "$RESULTS_DIR" | tail -1
  $PY -m alexnet_fast.cli bench --markdown "$RESULTS_DIR/$(basename "${csvs[0]}")" >"$RESULTS_DIR/tables.md"
fi

# Weak scaling: the same per-GPU batch on 1, 2, 4... GPUs through torchrun (needs every GPU).
if stage ddp; then
  gpus=$($PY -c "import torch; print(torch.cuda.device_count())")
  for n in 1 2 4 8; do
    [ "$n" -le "$gpus" ] || break
    # shellcheck disable=SC2086
    torchrun --standalone --nproc_per_node="$n" -m alexnet_fast.train $TRAIN_FLAGS \
      --out "$RESULTS_DIR/ddp$n" >"$RESULTS_DIR/ddp$n.log" 2>&1
    record "ddp $n GPU" "exit $?: $(grep -E 'img/s' "$RESULTS_DIR/ddp$n.log" | tail -1)"
  done
fi

echo "== summary"
cat "$SUMMARY"
