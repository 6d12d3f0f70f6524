// TORCH_LIBRARY(sparsesam): the one place where the public ops are defined.
// Per-device implementations live beside their kernels (cpu/*_cpu.cpp,
// cuda/*_cuda.cu); fake (meta) impls and autograd are registered in Python
// (sparsesam/ops/<op>.py), as in pytorch/extension-cpp.
#include <torch/library.h>

#include "common/schemas.h"

TORCH_LIBRARY(sparsesam, m) {
  m.def(SPARSESAM_SCHEMA_APPLY_MASK);
  m.def(SPARSESAM_SCHEMA_MASKED_WEIGHT_GRAD);
  m.def(SPARSESAM_SCHEMA_MASKED_LINEAR);
  m.def(SPARSESAM_SCHEMA_MASKED_LINEAR_BACKWARD);
  m.def(SPARSESAM_SCHEMA_MASKED_CONV2D);
  m.def(SPARSESAM_SCHEMA_MASKED_CONV2D_BACKWARD);
  m.def(SPARSESAM_SCHEMA_SAM_GRAD_SQ_NORM);
  m.def(SPARSESAM_SCHEMA_SAM_PERTURB);
  m.def(SPARSESAM_SCHEMA_SGD_STEP);
  m.def(SPARSESAM_SCHEMA_MASK_GRAD_SQ_NORM);
  m.def(SPARSESAM_SCHEMA_MASK_ASCENT);
  m.def(SPARSESAM_SCHEMA_MASK_SCORE_GRAD);
  m.def(SPARSESAM_SCHEMA_SPARSE_LINEAR);
  m.def(SPARSESAM_SCHEMA_SPARSE_LINEAR_BACKWARD);
  m.def(SPARSESAM_SCHEMA_SPARSE_CONV2D);
  m.def(SPARSESAM_SCHEMA_SPARSE_CONV2D_BACKWARD);
  m.def(SPARSESAM_SCHEMA_BSR_LINEAR);
  m.def(SPARSESAM_SCHEMA_BSR_LINEAR_BACKWARD);
  m.def(SPARSESAM_SCHEMA_NM_LINEAR);
  m.def(SPARSESAM_SCHEMA_NM_LINEAR_BACKWARD);
}
