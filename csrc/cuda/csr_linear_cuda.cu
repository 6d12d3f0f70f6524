// csr_linear on CUDA (the `sparsesam_cuda` namespace; SPARSESAM_BACKEND=cuda):
// y = x W^T + b with W kept as CSR values at a fixed pattern, dx through the
// precomputed transposed index (no atomics), dW at kept entries only (SDDMM).
//
// Layout: the dense operand is transposed once ([features][batch], an ATen
// copy), so the threads of a warp, one per batch row, read one feature's
// values coalesced, while the entry they all need (column, value) is one
// broadcast load. Results come out transposed and are transposed back.
//
// * rows_spmm_kernel: block (sparse row, 256 batch rows): out[r][b] =
//   init + sum over row r's entries of value * in[column][b]. The forward
//   runs it over the CSR (operand x), dx over the transposed index (operand
//   grad_out), reading each value through csr_positions: every dx value is
//   summed by one thread, so no atomics and no transposed copy of the values.
// * rows_sddmm_kernel: block per CSR row; each warp takes entries of the row,
//   its lanes stride over the batch (coalesced on both rows), and a warp
//   shuffle reduction gives the entry's dW.
//
// float, half and bfloat16 accumulate in float, double in double; each
// result is rounded once. Index contents are trusted here (checking them on
// the host would cost a device sync per call): CSRPattern checks them when it
// is built, and the CPU kernels check them on every call.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <array>
#include <cstdint>
#include <optional>
#include <tuple>
#include <vector>

#include "../common/masked_layers.h"

namespace sparsesam::cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kWarp = 32;

template <typename scalar_t, bool kValuesThroughPos>
__global__ void rows_spmm_kernel(const scalar_t* __restrict__ in, int64_t batch, const int32_t* __restrict__ ptr,
                                 const int32_t* __restrict__ idx, const scalar_t* __restrict__ val,
                                 const int32_t* __restrict__ pos, const scalar_t* __restrict__ bias,
                                 scalar_t* __restrict__ out) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t r = blockIdx.x;
  const int64_t b = int64_t(blockIdx.y) * kThreads + threadIdx.x;
  if (b >= batch) return;
  acc_t acc = bias != nullptr ? static_cast<acc_t>(bias[r]) : acc_t(0);
  const int32_t end = ptr[r + 1];
  for (int32_t j = ptr[r]; j < end; ++j) {
    const scalar_t w = kValuesThroughPos ? val[pos[j]] : val[j];
    acc += static_cast<acc_t>(w) * static_cast<acc_t>(in[int64_t(idx[j]) * batch + b]);
  }
  out[r * batch + b] = static_cast<scalar_t>(acc);
}

template <typename scalar_t>
__global__ void rows_sddmm_kernel(const scalar_t* __restrict__ g_t, const scalar_t* __restrict__ x_t, int64_t batch,
                                  const int32_t* __restrict__ ptr, const int32_t* __restrict__ idx,
                                  scalar_t* __restrict__ dval) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t r = blockIdx.x;
  const int warp = threadIdx.x / kWarp, lane = threadIdx.x % kWarp;
  const scalar_t* g_row = g_t + r * batch;
  for (int64_t j = ptr[r] + warp; j < ptr[r + 1]; j += kThreads / kWarp) {
    const scalar_t* x_row = x_t + int64_t(idx[j]) * batch;
    acc_t s = 0;
    for (int64_t b = lane; b < batch; b += kWarp) s += static_cast<acc_t>(g_row[b]) * static_cast<acc_t>(x_row[b]);
#pragma unroll
    for (int offset = kWarp / 2; offset > 0; offset /= 2) s += __shfl_down_sync(0xffffffffu, s, offset);
    if (lane == 0) dval[j] = static_cast<scalar_t>(s);
  }
}

// [rows][batch] = init + sparse rows x operand^T, operand_t = [features][batch].
at::Tensor spmm_rows(const at::Tensor& operand_t, const at::Tensor& ptr, const at::Tensor& idx,
                     const at::Tensor& values, const std::optional<at::Tensor>& pos,
                     const std::optional<at::Tensor>& bias) {
  const int64_t rows = ptr.numel() - 1, batch = operand_t.size(1);
  at::Tensor out_t = at::empty({rows, batch}, operand_t.options());
  if (rows == 0 || batch == 0) return out_t;
  TORCH_CHECK_VALUE((batch + kThreads - 1) / kThreads <= 65535, "csr_linear (CUDA): a batch of ", batch,
                    " rows is more than one launch covers");
  const dim3 grid(static_cast<unsigned int>(rows), static_cast<unsigned int>((batch + kThreads - 1) / kThreads));
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, operand_t.scalar_type(), "csr_linear_cuda", [&] {
    const scalar_t* b = bias.has_value() ? bias->const_data_ptr<scalar_t>() : nullptr;
    if (pos.has_value()) {
      rows_spmm_kernel<scalar_t, true><<<grid, kThreads, 0, stream>>>(
          operand_t.const_data_ptr<scalar_t>(), batch, ptr.const_data_ptr<int32_t>(), idx.const_data_ptr<int32_t>(),
          values.const_data_ptr<scalar_t>(), pos->const_data_ptr<int32_t>(), b, out_t.mutable_data_ptr<scalar_t>());
    } else {
      rows_spmm_kernel<scalar_t, false><<<grid, kThreads, 0, stream>>>(
          operand_t.const_data_ptr<scalar_t>(), batch, ptr.const_data_ptr<int32_t>(), idx.const_data_ptr<int32_t>(),
          values.const_data_ptr<scalar_t>(), nullptr, b, out_t.mutable_data_ptr<scalar_t>());
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out_t;
}

void check_index(const at::Tensor& t, const char* name, int64_t numel, const at::Tensor& like) {
  TORCH_CHECK_TYPE(t.scalar_type() == at::kInt, "csr_linear (CUDA): ", name, " must be int32, got ", t.scalar_type());
  TORCH_CHECK_VALUE(t.device() == like.device(), "csr_linear (CUDA): ", name, " is on ", t.device(), " but x is on ",
                    like.device());
  TORCH_CHECK_VALUE(t.dim() == 1 && t.numel() == numel && t.is_contiguous(), "csr_linear (CUDA): ", name,
                    " must be a contiguous 1-D tensor of ", numel, " entries, got shape ", t.sizes());
}

struct Shape {
  int64_t out_features, in_features, nnz;
};

Shape check_pattern(const at::Tensor& x, const at::Tensor& values, const at::Tensor& crow, const at::Tensor& col,
                    const at::Tensor& ccol, const at::Tensor& row, const at::Tensor& pos) {
  TORCH_CHECK_VALUE(values.dim() == 1, "csr_linear (CUDA): values must be 1-D, got shape ", values.sizes());
  TORCH_CHECK_VALUE(crow.dim() == 1 && crow.numel() >= 1 && ccol.dim() == 1 && ccol.numel() >= 1,
                    "csr_linear (CUDA): crow_indices and ccol_indices must be 1-D and non-empty");
  const Shape s{crow.numel() - 1, ccol.numel() - 1, values.numel()};
  check_index(crow, "crow_indices", s.out_features + 1, x);
  check_index(col, "col_indices", s.nnz, x);
  check_index(ccol, "ccol_indices", s.in_features + 1, x);
  check_index(row, "row_indices", s.nnz, x);
  check_index(pos, "csr_positions", s.nnz, x);
  TORCH_CHECK_VALUE(x.dim() >= 1 && x.size(-1) == s.in_features, "csr_linear (CUDA): x has shape ", x.sizes(),
                    "; its last dimension must be in_features=", s.in_features);
  return s;
}

// t as [features][batch], contiguous (one transposed copy).
at::Tensor transposed(const at::Tensor& t) { return as_rows(t).t().contiguous(); }

at::Tensor csr_linear(const at::Tensor& x, const at::Tensor& values, const at::Tensor& crow_indices,
                         const at::Tensor& col_indices, const at::Tensor& ccol_indices,
                         const at::Tensor& row_indices, const at::Tensor& csr_positions,
                         const std::optional<at::Tensor>& bias) {
  TORCH_CHECK(x.is_cuda(), "csr_linear (CUDA): x must be a CUDA tensor, got ", x.device());
  const c10::cuda::CUDAGuard device_guard(x.device());
  const Shape s = check_pattern(x, values, crow_indices, col_indices, ccol_indices, row_indices, csr_positions);
  TORCH_CHECK_TYPE(values.scalar_type() == x.scalar_type(), "csr_linear (CUDA): values dtype differs from x dtype");
  std::optional<at::Tensor> b;
  if (bias.has_value() && bias->defined()) {
    TORCH_CHECK_VALUE(bias->dim() == 1 && bias->size(0) == s.out_features, "csr_linear (CUDA): bias must have ",
                      s.out_features, " entries");
    TORCH_CHECK_TYPE(bias->scalar_type() == x.scalar_type(), "csr_linear (CUDA): bias dtype differs from x dtype");
    b = bias->contiguous();
  }
  std::vector<int64_t> out_shape(x.sizes().begin(), x.sizes().end());
  out_shape.back() = s.out_features;
  const at::Tensor y_t = spmm_rows(transposed(x), crow_indices, col_indices, values.contiguous(), std::nullopt, b);
  return y_t.t().contiguous().view(out_shape);
}

std::tuple<at::Tensor, at::Tensor> csr_linear_backward(
    const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& values, const at::Tensor& crow_indices,
    const at::Tensor& col_indices, const at::Tensor& ccol_indices, const at::Tensor& row_indices,
    const at::Tensor& csr_positions, std::array<bool, 2> output_mask) {
  TORCH_CHECK(grad_out.is_cuda(), "csr_linear_backward (CUDA): grad_out must be a CUDA tensor, got ",
              grad_out.device());
  const c10::cuda::CUDAGuard device_guard(grad_out.device());
  const auto [want_dx, want_dvalues] = output_mask;
  const Shape s = check_pattern(x, values, crow_indices, col_indices, ccol_indices, row_indices, csr_positions);
  TORCH_CHECK_TYPE(grad_out.scalar_type() == x.scalar_type() && values.scalar_type() == x.scalar_type(),
                   "csr_linear_backward (CUDA): grad_out, x and values must have one dtype");
  TORCH_CHECK_VALUE(grad_out.dim() == x.dim() && grad_out.size(-1) == s.out_features,
                    "csr_linear_backward (CUDA): grad_out has shape ", grad_out.sizes());
  const at::Tensor g_t = transposed(grad_out);  // [out_features][batch]
  const int64_t batch = g_t.size(1);
  at::Tensor dx = empty_output(x), dvalues = empty_output(values);
  if (want_dx) {
    // W^T's rows are the transposed index; the values are read through csr_positions.
    const at::Tensor dx_t = spmm_rows(g_t, ccol_indices, row_indices, values.contiguous(), csr_positions, std::nullopt);
    dx = dx_t.t().contiguous().view(x.sizes());
  }
  if (want_dvalues) {
    dvalues = at::empty({s.nnz}, grad_out.options());
    if (batch == 0) {
      dvalues.zero_();
    } else if (s.nnz > 0) {
      const at::Tensor x_t = transposed(x);  // read only here: x may be a placeholder otherwise
      const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
      AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, g_t.scalar_type(), "csr_linear_backward_cuda", [&] {
        rows_sddmm_kernel<scalar_t><<<static_cast<unsigned int>(s.out_features), kThreads, 0, stream>>>(
            g_t.const_data_ptr<scalar_t>(), x_t.const_data_ptr<scalar_t>(), batch,
            crow_indices.const_data_ptr<int32_t>(), col_indices.const_data_ptr<int32_t>(),
            dvalues.mutable_data_ptr<scalar_t>());
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
    }
  }
  return {dx, dvalues};
}

}  // namespace

TORCH_LIBRARY_IMPL(sparsesam_cuda, CUDA, m) {
  m.impl("csr_linear", &csr_linear);
  m.impl("csr_linear_backward", &csr_linear_backward);
}

}  // namespace sparsesam::cuda
