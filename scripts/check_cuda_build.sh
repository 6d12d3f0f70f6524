#!/usr/bin/env bash
# Compile the extension WITH the CUDA kernels (SPARSESAM_CUDA=1) in a scratch
# copy of the tree, so the in-tree CPU build is untouched, then import it and
# check that the CUDA C++ ops registered. No GPU is needed to compile.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=$(pwd)/${SPARSESAM_VENV:-.venv}/bin/python
scratch=$(mktemp -d -t sparsesam-cuda.XXXXXX)
trap 'rm -rf "$scratch"' EXIT
git ls-files -co --exclude-standard | tar cf - -T - | tar xf - -C "$scratch"
cd "$scratch"
export CUDA_HOME=${CUDA_HOME:-/usr/local/cuda}
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-8.0}
start=$(date +%s)
SPARSESAM_CUDA=1 MAX_JOBS=${MAX_JOBS:-2} "$PY" setup.py -q build_ext --inplace
echo "CUDA build: $(( $(date +%s) - start )) s"
# Every schema of csrc/common/schemas.h registered in both namespaces, with a CUDA kernel.
"$PY" -m pytest -q -p no:cacheprovider tests/ops/test_op_registration.py
"$PY" -c "import sparsesam.ops as ops; assert ops.cuda_cpp_available(); print('CUDA build imports; sparsesam_cuda ops registered')"
