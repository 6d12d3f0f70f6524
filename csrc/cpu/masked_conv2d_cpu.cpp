// masked_conv2d on CPU: the CPU elementwise kernels around ATen's
// convolution / convolution_backward (oneDNN), composed in
// common/masked_layers.h.
#include <torch/library.h>

#include "masked_weight_cpu.h"

namespace sparsesam::cpu {
namespace {

at::Tensor masked_conv2d(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& mask,
                         const std::optional<at::Tensor>& bias, at::IntArrayRef stride,
                         at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups) {
  return masked_conv2d_impl(kernels(), x, weight, mask, bias, stride, padding, dilation, groups);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> masked_conv2d_backward(
    const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& weight, const at::Tensor& mask,
    at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups,
    std::array<bool, 3> output_mask) {
  return masked_conv2d_backward_impl(kernels(), grad_out, x, weight, mask, stride, padding, dilation,
                                     groups, output_mask);
}

}  // namespace

TORCH_LIBRARY_IMPL(sparsesam, CPU, m) {
  m.impl("masked_conv2d", &masked_conv2d);
  m.impl("masked_conv2d_backward", &masked_conv2d_backward);
}

}  // namespace sparsesam::cpu
