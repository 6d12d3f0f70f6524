// Defines every schema of common/schemas.h in every namespace this build has.
// Per-device implementations live beside their kernels (cpu/*_cpu.cpp,
// cuda/*_cuda.cu); fake (meta) impls and autograd are registered in Python
// (sparsesam/ops/<op>.py), as in pytorch/extension-cpp.
#include <torch/library.h>

#include "common/schemas.h"

namespace {

void define_every_schema(torch::Library& m) {
  for (const char* schema : sparsesam::kSchemas) {
    m.def(schema);
  }
}

}  // namespace

// The public ops: CPU kernels from csrc/cpu, the CUDA kernel bound in Python
// to the backend chosen there (sparsesam/ops/_library.py).
TORCH_LIBRARY(sparsesam, m) { define_every_schema(m); }

#ifdef SPARSESAM_WITH_CUDA
// The same schemas, CUDA kernels only (csrc/cuda): the `cuda` backend of
// sparsesam/ops/_library.py, reached through torch.ops.sparsesam_cuda so that
// choosing it never overrides a registration of `sparsesam`.
TORCH_LIBRARY(sparsesam_cuda, m) { define_every_schema(m); }
#endif
