// CPU elementwise kernels of the masked-weight ops, shared by the masked
// layers (cpu/masked_linear_cpu.cpp, cpu/masked_conv2d_cpu.cpp).
#pragma once

#include <ATen/ATen.h>

#include "../common/masked_layers.h"

namespace sparsesam::cpu {

// W*M, contiguous, weight dtype.
at::Tensor apply_mask(const at::Tensor& weight, const at::Tensor& mask);

// One pass over G, W, M: returns dM = G*W (undefined when not wanted) and,
// when want_dweight, overwrites G with dW = G*M. G must be contiguous.
at::Tensor weight_grad_inplace(at::Tensor& grad, const at::Tensor& weight, const at::Tensor& mask,
                               bool want_dweight, bool want_dmask);

inline const MaskKernels& kernels() {
  static const MaskKernels k{&apply_mask, &weight_grad_inplace};
  return k;
}

}  // namespace sparsesam::cpu
