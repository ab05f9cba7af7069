#!/usr/bin/env bash
# compute-sanitizer over every native CUDA op (scripts/sanitize_ops.py, small shapes): memcheck
# (out-of-bounds and misaligned accesses, launch errors) and racecheck (shared-memory hazards) must
# report no error. `make sanitize`; TOOLS="memcheck racecheck initcheck" adds initcheck.
# Needs a built extension (pip install --no-build-isolation -e .) and a GPU.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python3}
SANITIZER=${COMPUTE_SANITIZER:-$(command -v compute-sanitizer || echo "${CUDA_HOME:-/usr/local/cuda}/bin/compute-sanitizer")}
TOOLS=${TOOLS:-memcheck racecheck}
# One cudaMalloc per tensor: with the caching allocator a read past a tensor's end lands in memory
# of the same cached block, which memcheck cannot tell from a valid access.
export PYTORCH_NO_CUDA_MEMORY_CACHING=1
export PYTHONUNBUFFERED=1

if [ ! -x "$SANITIZER" ]; then
  echo "compute-sanitizer not found (set COMPUTE_SANITIZER or CUDA_HOME)" >&2
  exit 1
fi
status=0
for tool in $TOOLS; do
  start=$SECONDS
  "$SANITIZER" --tool "$tool" --error-exitcode 1 "$PY" scripts/sanitize_ops.py
  rc=$?
  echo "== compute-sanitizer --tool $tool: exit $rc in $((SECONDS - start)) s"
  [ "$rc" -eq 0 ] || status=1
done
exit $status
