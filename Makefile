# The README's commands. Every target sets up first (idempotent, seconds when done).
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: setup demo test test-triton test-gpu test-slow build-cuda ctest check-wheel bench ci

setup:
	bash scripts/setup.sh

demo: setup
	$(VENV)/bin/sparsesam demo

# The default suite (a few minutes on 2 cores); pytest's "no tests" (5) is not a pass.
test: setup
	$(PY) -m pytest -q

# Triton kernels on the CPU through Triton's interpreter.
test-triton: setup
	TRITON_INTERPRET=1 $(PY) -m pytest -q -m triton

# The op cases marked gpu (Triton and CUDA C++ kernels on a device); each skips, saying why, without a GPU.
test-gpu: setup
	$(PY) -m pytest -q -m gpu

test-slow: setup
	$(PY) -m pytest -q -m slow

# Compile every .cu file (no GPU needed) in a scratch copy and import it.
build-cuda: setup
	bash scripts/check_cuda_build.sh

# The libtorch CMake build and its C++ tests.
ctest: setup
	bash scripts/ctest.sh

# A wheel with the compiled library, installed into a second venv.
check-wheel: setup
	bash scripts/check_wheel.sh

bench: setup
	$(PY) -m pytest bench -q --benchmark-enable

ci: test test-triton build-cuda ctest check-wheel

# The reproduction study (AdaSAP / HARP / C-SAM comparisons and ablations, 5 seeds; about 9 CPU-hours, 4.5 hours
# with 2 workers on 2 quiet cores; resumable: run it again to continue). Results go to docs/reproduce/.
.PHONY: reproduce
reproduce: setup
	$(VENV)/bin/sparsesam reproduce --out reproduce-out --report-dir docs/reproduce --threads 1 --workers 2
