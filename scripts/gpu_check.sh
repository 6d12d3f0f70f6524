#!/usr/bin/env bash
# The GPU check, for the day a GPU is lent: build the extension with the CUDA
# C++ kernels for this GPU, then run every test marked `gpu` -- each op's
# Triton and CUDA C++ kernels on the device against sparsesam.reference
# (tests/ops/test_<op>.py, both backends bound through sparsesam.ops.use_backend),
# the CUDA C++ kernels called directly, and sparsesam.robust on device.
#
#   bash scripts/gpu_check.sh [OUT]        # OUT defaults to gpu-check-out/
#
# Everything it learns goes to OUT: device.txt (nvidia-smi, torch, triton),
# build.log, tests.log (pytest -rA: every case with its outcome and every skip
# with its reason), tests.xml (JUnit) and summary.txt (one line per step with
# its exit code and seconds). It exits non-zero if a step failed or no GPU is
# visible. Budget: the build compiles for this GPU's architecture only, with
# every core; the tests stop after TEST_TIMEOUT seconds (default 420).
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-${SPARSESAM_VENV:-.venv}/bin/python}
OUT=${1:-gpu-check-out}
TEST_TIMEOUT=${TEST_TIMEOUT:-420}
mkdir -p "$OUT"
: > "$OUT/summary.txt"

failed=0
step() {
  local name=$1 log=$2; shift 2
  local start rc
  start=$(date +%s)
  "$@" > "$log" 2>&1; rc=$?
  echo "$name: exit $rc after $(( $(date +%s) - start )) s (log: $log)" | tee -a "$OUT/summary.txt"
  [ "$rc" -eq 0 ] || failed=1
  return "$rc"
}

{
  nvidia-smi || true
  "$PY" -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__); print(torch.cuda.get_device_name() if torch.cuda.is_available() else 'no GPU visible to torch')"
} > "$OUT/device.txt" 2>&1
if ! "$PY" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  echo "no GPU visible to torch: nothing to check (see $OUT/device.txt)" | tee -a "$OUT/summary.txt"
  exit 2
fi

# setup.py targets the visible GPU's architecture when TORCH_CUDA_ARCH_LIST is unset.
export CUDA_HOME=${CUDA_HOME:-/usr/local/cuda}
step build "$OUT/build.log" env SPARSESAM_CUDA=1 MAX_JOBS="${MAX_JOBS:-$(nproc)}" "$PY" setup.py build_ext --inplace \
  || { echo "the CUDA build failed: see $OUT/build.log" | tee -a "$OUT/summary.txt"; exit 1; }
step cuda-registered "$OUT/registered.log" "$PY" -c \
  "import sparsesam.ops as o; assert o.cuda_cpp_available(), 'the build has no CUDA C++ kernels'; print(o.backend())"
# Registration in both namespaces, then every case marked gpu.
step registration "$OUT/registration.log" "$PY" -m pytest -q -p no:cacheprovider tests/ops/test_op_registration.py
step tests "$OUT/tests.log" timeout "$TEST_TIMEOUT" "$PY" -m pytest -q -rA -p no:cacheprovider -m gpu \
  --junitxml="$OUT/tests.xml"
tail -n 3 "$OUT/tests.log" | tee -a "$OUT/summary.txt"
exit $failed
