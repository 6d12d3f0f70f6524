// masked_linear on CPU: the CPU elementwise kernels around ATen's GEMM
// (MKL/oneDNN), composed in common/masked_layers.h.
#include <torch/library.h>

#include "masked_weight_cpu.h"

namespace sparsesam::cpu {
namespace {

at::Tensor masked_linear(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& mask,
                         const std::optional<at::Tensor>& bias) {
  return masked_linear_impl(kernels(), x, weight, mask, bias);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> masked_linear_backward(
    const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& weight, const at::Tensor& mask,
    std::array<bool, 3> output_mask) {
  return masked_linear_backward_impl(kernels(), grad_out, x, weight, mask, output_mask);
}

}  // namespace

TORCH_LIBRARY_IMPL(sparsesam, CPU, m) {
  m.impl("masked_linear", &masked_linear);
  m.impl("masked_linear_backward", &masked_linear_backward);
}

}  // namespace sparsesam::cpu
