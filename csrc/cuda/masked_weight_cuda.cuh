// CUDA elementwise kernels of the masked-weight ops, shared by the masked
// layers (cuda/masked_linear_cuda.cu, cuda/masked_conv2d_cuda.cu).
//
// These are registered in the `sparsesam_cuda` namespace, not under the
// `sparsesam` CUDA key: Python owns that key and routes each call to the
// Triton, CUDA C++ or reference backend (sparsesam/ops/_library.py).
#pragma once

#include <ATen/ATen.h>

#include "../common/masked_layers.h"

namespace sparsesam::cuda {

// W*M, contiguous, weight dtype.
at::Tensor apply_mask(const at::Tensor& weight, const at::Tensor& mask);

// One pass over G, W, M: returns dM = G*W (undefined when not wanted) and,
// when want_dweight, overwrites G with dW = G*M. G must be contiguous. W is
// read only when want_dmask, so callers may pass a zero-stride placeholder
// of the right shape otherwise.
at::Tensor weight_grad_inplace(at::Tensor& grad, const at::Tensor& weight, const at::Tensor& mask,
                               bool want_dweight, bool want_dmask);

inline const MaskKernels& kernels() {
  static const MaskKernels k{&apply_mask, &weight_grad_inplace};
  return k;
}

}  // namespace sparsesam::cuda
