#!/usr/bin/env bash
# Build the C++ sources against libtorch with CMake and run the C++ tests.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${SPARSESAM_VENV:-.venv}/bin/python
prefix=$("$PY" -c 'import torch; print(torch.utils.cmake_prefix_path)')
cmake -S . -B cmake-build -G Ninja -DCMAKE_BUILD_TYPE=Release -DCMAKE_PREFIX_PATH="$prefix" >/dev/null
cmake --build cmake-build -j "${MAX_JOBS:-2}"
ctest --test-dir cmake-build --output-on-failure
