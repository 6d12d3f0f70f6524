// masked_conv2d on CUDA: the CUDA elementwise kernels around ATen's
// convolution / convolution_backward (cuDNN), composed in
// common/masked_layers.h. Registered in the `sparsesam_cuda` namespace (see
// masked_weight_cuda.cu for why).
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "masked_weight_cuda.cuh"

namespace sparsesam::cuda {
namespace {

at::Tensor masked_conv2d(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& mask,
                         const std::optional<at::Tensor>& bias, at::IntArrayRef stride,
                         at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups) {
  TORCH_CHECK(x.is_cuda(), "masked_conv2d (CUDA): x must be a CUDA tensor, got ", x.device());
  // Custom ops get no automatic device guard: everything the composition
  // allocates must land on x's device, not on the current one.
  const c10::cuda::CUDAGuard device_guard(x.device());
  return masked_conv2d_impl(kernels(), x, weight, mask, bias, stride, padding, dilation, groups);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> masked_conv2d_backward(
    const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& weight, const at::Tensor& mask,
    at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups,
    std::array<bool, 3> output_mask) {
  TORCH_CHECK(grad_out.is_cuda(), "masked_conv2d_backward (CUDA): grad_out must be a CUDA tensor, got ",
              grad_out.device());
  const c10::cuda::CUDAGuard device_guard(grad_out.device());
  return masked_conv2d_backward_impl(kernels(), grad_out, x, weight, mask, stride, padding, dilation, groups,
                                     output_mask);
}

}  // namespace

TORCH_LIBRARY_IMPL(sparsesam_cuda, CUDA, m) {
  m.impl("masked_conv2d", &masked_conv2d);
  m.impl("masked_conv2d_backward", &masked_conv2d_backward);
}

}  // namespace sparsesam::cuda
