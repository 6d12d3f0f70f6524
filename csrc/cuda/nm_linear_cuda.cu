// nm_linear on CUDA (the `sparsesam_cuda` namespace; SPARSESAM_BACKEND=cuda):
// y = x W^T + b with W kept as an N:M pattern along the input dimension
// (values [out][K], K = in * n / m, uint8 position of each entry in its
// group; sparsesam/sparse/nm.py), and its backward.
//
// Layout as in csr_linear_cuda.cu: the dense operand is transposed once
// ([features][batch]), so the threads of a warp, one per batch row, read one
// feature coalesced while the entry they all need is one broadcast load.
//
// * nm_rows_kernel: block (output row, 256 batch rows): out[r][b] = bias +
//   sum over row r's entries of value * x[(e / n) * m + index][b].
// * nm_columns_kernel (dx): block (input column, 256 batch rows): the column
//   c = q * m + p is summed by one thread per batch row (no atomics), walking
//   every row's n entries of group q and taking those at position p. It reads
//   m times the index bytes it uses (broadcast loads, cached): simple, and
//   regular where a transposed index would need offsets.
// * nm_sddmm_kernel: block per output row; each warp takes entries of the
//   row, its lanes stride over the batch, a warp shuffle reduces: dW at kept
//   entries only.
//
// float, half and bfloat16 accumulate in float, double in double. Index
// contents are trusted here (checking them would cost a device sync):
// NMPattern checks them when built, the CPU kernels on every call.
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

template <typename scalar_t>
__global__ void nm_rows_kernel(const scalar_t* __restrict__ x_t, int64_t batch, const uint8_t* __restrict__ idx,
                               const scalar_t* __restrict__ val, int64_t groups, int n, int m,
                               const scalar_t* __restrict__ bias, scalar_t* __restrict__ out_t) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t r = blockIdx.x;
  const int64_t b = int64_t(blockIdx.y) * kThreads + threadIdx.x;
  if (b >= batch) return;
  acc_t acc = bias != nullptr ? static_cast<acc_t>(bias[r]) : acc_t(0);
  const int64_t K = groups * n;
  const uint8_t* row_idx = idx + r * K;
  const scalar_t* row_val = val + r * K;
  for (int64_t g = 0; g < groups; ++g) {
    for (int s = 0; s < n; ++s) {
      const int64_t e = g * n + s;
      const int64_t col = g * m + row_idx[e];
      acc += static_cast<acc_t>(row_val[e]) * static_cast<acc_t>(x_t[col * batch + b]);
    }
  }
  out_t[r * batch + b] = static_cast<scalar_t>(acc);
}

template <typename scalar_t>
__global__ void nm_columns_kernel(const scalar_t* __restrict__ g_t, int64_t batch, int64_t rows,
                                  const uint8_t* __restrict__ idx, const scalar_t* __restrict__ val, int64_t groups,
                                  int n, int m, scalar_t* __restrict__ dx_t) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t c = blockIdx.x;
  const int64_t b = int64_t(blockIdx.y) * kThreads + threadIdx.x;
  if (b >= batch) return;
  const int64_t q = c / m;
  const int p = int(c % m);
  const int64_t K = groups * n;
  acc_t acc = 0;
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t e0 = r * K + q * n;
    for (int s = 0; s < n; ++s) {
      if (idx[e0 + s] == p) acc += static_cast<acc_t>(val[e0 + s]) * static_cast<acc_t>(g_t[r * batch + b]);
    }
  }
  dx_t[c * batch + b] = static_cast<scalar_t>(acc);
}

template <typename scalar_t>
__global__ void nm_sddmm_kernel(const scalar_t* __restrict__ g_t, const scalar_t* __restrict__ x_t, int64_t batch,
                                const uint8_t* __restrict__ idx, int64_t groups, int n, int m,
                                scalar_t* __restrict__ dval) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t r = blockIdx.x;
  const int warp = threadIdx.x / kWarp, lane = threadIdx.x % kWarp;
  const int64_t K = groups * n;
  const scalar_t* g_row = g_t + r * batch;
  for (int64_t e = warp; e < K; e += kThreads / kWarp) {
    const int64_t col = (e / n) * m + idx[r * K + e];
    const scalar_t* x_row = x_t + col * batch;
    acc_t s = 0;
    for (int64_t b = lane; b < batch; b += kWarp) s += static_cast<acc_t>(g_row[b]) * static_cast<acc_t>(x_row[b]);
#pragma unroll
    for (int offset = kWarp / 2; offset > 0; offset /= 2) s += __shfl_down_sync(0xffffffffu, s, offset);
    if (lane == 0) dval[r * K + e] = static_cast<scalar_t>(s);
  }
}

struct Shape {
  int64_t out_features, in_features, groups, K;
  int n, m;
};

Shape check_shape(const at::Tensor& x, const at::Tensor& values, const at::Tensor& indices, int64_t n, int64_t m) {
  TORCH_CHECK_VALUE(1 <= n && n < m && m <= 16, "nm_linear (CUDA): n and m must satisfy 1 <= n < m <= 16, got n=", n,
                    ", m=", m);
  TORCH_CHECK_VALUE(values.dim() == 2 && values.size(1) % n == 0,
                    "nm_linear (CUDA): values must be 2-D with whole groups of n entries per row, got shape ",
                    values.sizes());
  TORCH_CHECK_TYPE(indices.scalar_type() == at::kByte, "nm_linear (CUDA): indices must be uint8, got ",
                   indices.scalar_type());
  TORCH_CHECK_VALUE(indices.device() == x.device(), "nm_linear (CUDA): indices is on ", indices.device(),
                    " but x is on ", x.device());
  TORCH_CHECK_VALUE(indices.sizes() == values.sizes() && indices.is_contiguous(),
                    "nm_linear (CUDA): indices must be contiguous with the shape of values, got ", indices.sizes());
  const int64_t groups = values.size(1) / n;
  const Shape s{values.size(0), groups * m, groups, values.size(1), int(n), int(m)};
  TORCH_CHECK_VALUE(x.dim() >= 1 && x.size(-1) == s.in_features, "nm_linear (CUDA): x has shape ", x.sizes(),
                    "; its last dimension must be in_features=", s.in_features);
  return s;
}

// t as [features][batch], contiguous (one transposed copy).
at::Tensor transposed(const at::Tensor& t) { return as_rows(t).t().contiguous(); }

dim3 grid_for(int64_t rows, int64_t batch) {
  TORCH_CHECK_VALUE((batch + kThreads - 1) / kThreads <= 65535, "nm_linear (CUDA): a batch of ", batch,
                    " rows is more than one launch covers");
  return dim3(static_cast<unsigned int>(rows), static_cast<unsigned int>((batch + kThreads - 1) / kThreads));
}

at::Tensor nm_linear(const at::Tensor& x, const at::Tensor& values, const at::Tensor& indices, int64_t n, int64_t m,
                     const std::optional<at::Tensor>& bias) {
  TORCH_CHECK(x.is_cuda(), "nm_linear (CUDA): x must be a CUDA tensor, got ", x.device());
  const c10::cuda::CUDAGuard device_guard(x.device());
  const Shape s = check_shape(x, values, indices, n, m);
  TORCH_CHECK_TYPE(values.scalar_type() == x.scalar_type(), "nm_linear (CUDA): values dtype differs from x dtype");
  at::Tensor b;
  if (bias.has_value() && bias->defined()) {
    TORCH_CHECK_VALUE(bias->dim() == 1 && bias->size(0) == s.out_features, "nm_linear (CUDA): bias must have ",
                      s.out_features, " entries");
    TORCH_CHECK_TYPE(bias->scalar_type() == x.scalar_type(), "nm_linear (CUDA): bias dtype differs from x dtype");
    b = bias->contiguous();
  }
  std::vector<int64_t> out_shape(x.sizes().begin(), x.sizes().end());
  out_shape.back() = s.out_features;
  const at::Tensor x_t = transposed(x);
  const int64_t batch = x_t.size(1);
  at::Tensor y_t = at::empty({s.out_features, batch}, x.options());
  if (s.out_features > 0 && batch > 0) {
    const at::Tensor val = values.contiguous();
    const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "nm_linear_cuda", [&] {
      nm_rows_kernel<scalar_t><<<grid_for(s.out_features, batch), kThreads, 0, stream>>>(
          x_t.const_data_ptr<scalar_t>(), batch, indices.const_data_ptr<uint8_t>(), val.const_data_ptr<scalar_t>(),
          s.groups, s.n, s.m, b.defined() ? b.const_data_ptr<scalar_t>() : nullptr, y_t.mutable_data_ptr<scalar_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }
  return y_t.t().contiguous().view(out_shape);
}

std::tuple<at::Tensor, at::Tensor> nm_linear_backward(const at::Tensor& grad_out, const at::Tensor& x,
                                                      const at::Tensor& values, const at::Tensor& indices, int64_t n,
                                                      int64_t m, std::array<bool, 2> output_mask) {
  TORCH_CHECK(grad_out.is_cuda(), "nm_linear_backward (CUDA): grad_out must be a CUDA tensor, got ", grad_out.device());
  const c10::cuda::CUDAGuard device_guard(grad_out.device());
  const auto [want_dx, want_dvalues] = output_mask;
  const Shape s = check_shape(x, values, indices, n, m);
  TORCH_CHECK_TYPE(grad_out.scalar_type() == x.scalar_type() && values.scalar_type() == x.scalar_type(),
                   "nm_linear_backward (CUDA): grad_out, x and values must have one dtype");
  TORCH_CHECK_VALUE(grad_out.dim() == x.dim() && grad_out.size(-1) == s.out_features,
                    "nm_linear_backward (CUDA): grad_out has shape ", grad_out.sizes());
  const at::Tensor g_t = transposed(grad_out);  // [out_features][batch]
  const int64_t batch = g_t.size(1);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  at::Tensor dx = empty_output(x), dvalues = empty_output(values);
  if (want_dx) {
    at::Tensor dx_t = at::empty({s.in_features, batch}, grad_out.options());
    if (s.in_features > 0 && batch > 0) {
      const at::Tensor val = values.contiguous();
      AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, g_t.scalar_type(), "nm_linear_backward_cuda_dx", [&] {
        nm_columns_kernel<scalar_t><<<grid_for(s.in_features, batch), kThreads, 0, stream>>>(
            g_t.const_data_ptr<scalar_t>(), batch, s.out_features, indices.const_data_ptr<uint8_t>(),
            val.const_data_ptr<scalar_t>(), s.groups, s.n, s.m, dx_t.mutable_data_ptr<scalar_t>());
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
    }
    dx = dx_t.t().contiguous().view(x.sizes());
  }
  if (want_dvalues) {
    dvalues = at::empty({s.out_features, s.K}, grad_out.options());
    if (batch == 0) {
      dvalues.zero_();
    } else if (dvalues.numel() > 0) {
      const at::Tensor x_t = transposed(x);  // read only here: x may be a placeholder otherwise
      AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, g_t.scalar_type(), "nm_linear_backward_cuda_dw", [&] {
        nm_sddmm_kernel<scalar_t><<<static_cast<unsigned int>(s.out_features), kThreads, 0, stream>>>(
            g_t.const_data_ptr<scalar_t>(), x_t.const_data_ptr<scalar_t>(), batch, indices.const_data_ptr<uint8_t>(),
            s.groups, s.n, s.m, dvalues.mutable_data_ptr<scalar_t>());
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
    }
  }
  return {dx, dvalues};
}

}  // namespace

TORCH_LIBRARY_IMPL(sparsesam_cuda, CUDA, m) {
  m.impl("nm_linear", &nm_linear);
  m.impl("nm_linear_backward", &nm_linear_backward);
}

}  // namespace sparsesam::cuda
