// masked_linear on CUDA: the CUDA elementwise kernels around ATen's GEMM
// (cuBLAS / cuBLASLt), composed in common/masked_layers.h. Registered in the
// `sparsesam_cuda` namespace (see masked_weight_cuda.cu for why).
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "masked_weight_cuda.cuh"

namespace sparsesam::cuda {
namespace {

at::Tensor masked_linear(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& mask,
                         const std::optional<at::Tensor>& bias) {
  TORCH_CHECK(x.is_cuda(), "masked_linear (CUDA): x must be a CUDA tensor, got ", x.device());
  // Custom ops get no automatic device guard: everything the composition
  // allocates must land on x's device, not on the current one.
  const c10::cuda::CUDAGuard device_guard(x.device());
  return masked_linear_impl(kernels(), x, weight, mask, bias);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> masked_linear_backward(
    const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& weight, const at::Tensor& mask,
    std::array<bool, 3> output_mask) {
  TORCH_CHECK(grad_out.is_cuda(), "masked_linear_backward (CUDA): grad_out must be a CUDA tensor, got ",
              grad_out.device());
  const c10::cuda::CUDAGuard device_guard(grad_out.device());
  return masked_linear_backward_impl(kernels(), grad_out, x, weight, mask, output_mask);
}

}  // namespace

TORCH_LIBRARY_IMPL(sparsesam_cuda, CUDA, m) {
  m.impl("masked_linear", &masked_linear);
  m.impl("masked_linear_backward", &masked_linear_backward);
}

}  // namespace sparsesam::cuda
