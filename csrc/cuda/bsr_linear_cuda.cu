// bsr_linear on CUDA (the `sparsesam_cuda` namespace; SPARSESAM_BACKEND=cuda):
// y = x W^T + b with W kept as (nblocks, bh, bw) blocks at a fixed BSR
// pattern, dx through the precomputed transposed block index (no atomics),
// dW at kept blocks only (a block SDDMM).
//
// Layout as in csr_linear_cuda.cu: the dense operand is transposed once
// ([features][batch], an ATen copy), so the threads of a warp, one per batch
// row, read one feature's values coalesced, while the weight they all need is
// one broadcast load. Results come out transposed and are transposed back.
//
// * block_spmm_kernel: CUDA block (output feature, 256 batch rows): out[f][b]
//   = init + sum over the kept blocks of f's block line, over the block's
//   reduction index k, of w[o][k] * in[other * red_block + k][b]. The forward
//   runs it over the BSR (lines = block rows, operand x); dx over the
//   transposed block index (lines = block columns, operand grad_out, blocks
//   through bsr_positions, read transposed): every value is summed by one
//   thread, so no atomics and no transposed copy of the values.
// * block_sddmm_kernel: CUDA block per block row; each warp takes one
//   (block, i, c) output at a time, its lanes stride over the batch
//   (coalesced on both rows), and a warp shuffle reduction gives the value.
//
// float, half and bfloat16 accumulate in float, double in double; each
// result is rounded once. Index contents are trusted here (checking them on
// the host would cost a device sync per call): BSRPattern checks them when
// it is built, and the CPU kernels check them on every call.
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
__global__ void block_spmm_kernel(const scalar_t* __restrict__ in, int64_t batch, const int32_t* __restrict__ ptr,
                                  const int32_t* __restrict__ idx, const int32_t* __restrict__ pos,
                                  const scalar_t* __restrict__ val, const scalar_t* __restrict__ bias,
                                  int64_t out_block, int64_t red_block, int64_t w_out_stride, int64_t w_red_stride,
                                  scalar_t* __restrict__ out) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t f = blockIdx.x;  // output feature
  const int64_t b = int64_t(blockIdx.y) * kThreads + threadIdx.x;
  if (b >= batch) return;
  const int64_t line = f / out_block, o = f % out_block;
  const int64_t block_elems = out_block * red_block;
  acc_t acc = bias != nullptr ? static_cast<acc_t>(bias[f]) : acc_t(0);
  const int32_t end = ptr[line + 1];
  for (int32_t j = ptr[line]; j < end; ++j) {
    const int64_t blk = kValuesThroughPos ? int64_t(pos[j]) : int64_t(j);
    const scalar_t* w = val + blk * block_elems + o * w_out_stride;
    const scalar_t* x = in + int64_t(idx[j]) * red_block * batch + b;
    for (int64_t k = 0; k < red_block; ++k) {
      acc += static_cast<acc_t>(w[k * w_red_stride]) * static_cast<acc_t>(x[k * batch]);
    }
  }
  out[f * batch + b] = static_cast<scalar_t>(acc);
}

template <typename scalar_t>
__global__ void block_sddmm_kernel(const scalar_t* __restrict__ g_t, const scalar_t* __restrict__ x_t, int64_t batch,
                                   const int32_t* __restrict__ ptr, const int32_t* __restrict__ idx, int64_t bh,
                                   int64_t bw, scalar_t* __restrict__ dval) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t r = blockIdx.x;  // block row
  const int warp = threadIdx.x / kWarp, lane = threadIdx.x % kWarp;
  const int64_t block_elems = bh * bw;
  const int64_t first = int64_t(ptr[r]) * block_elems, last = int64_t(ptr[r + 1]) * block_elems;
  for (int64_t e = first + warp; e < last; e += kThreads / kWarp) {
    const int64_t j = e / block_elems, i = (e % block_elems) / bw, c = e % bw;
    const scalar_t* g_row = g_t + (r * bh + i) * batch;
    const scalar_t* x_row = x_t + (int64_t(idx[j]) * bw + c) * batch;
    acc_t s = 0;
    for (int64_t b = lane; b < batch; b += kWarp) s += static_cast<acc_t>(g_row[b]) * static_cast<acc_t>(x_row[b]);
#pragma unroll
    for (int offset = kWarp / 2; offset > 0; offset /= 2) s += __shfl_down_sync(0xffffffffu, s, offset);
    if (lane == 0) dval[e] = static_cast<scalar_t>(s);
  }
}

// [lines * out_block][batch] = init + block lines x operand^T, operand_t = [features][batch].
at::Tensor block_spmm(const at::Tensor& operand_t, const at::Tensor& ptr, const at::Tensor& idx,
                      const at::Tensor& values, const std::optional<at::Tensor>& pos,
                      const std::optional<at::Tensor>& bias, int64_t out_block, int64_t red_block,
                      int64_t w_out_stride, int64_t w_red_stride) {
  const int64_t features = (ptr.numel() - 1) * out_block, batch = operand_t.size(1);
  at::Tensor out_t = at::empty({features, batch}, operand_t.options());
  if (features == 0 || batch == 0) return out_t;
  TORCH_CHECK_VALUE((batch + kThreads - 1) / kThreads <= 65535, "bsr_linear (CUDA): a batch of ", batch,
                    " rows is more than one launch covers");
  const dim3 grid(static_cast<unsigned int>(features), static_cast<unsigned int>((batch + kThreads - 1) / kThreads));
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, operand_t.scalar_type(), "bsr_linear_cuda", [&] {
    const scalar_t* b = bias.has_value() ? bias->const_data_ptr<scalar_t>() : nullptr;
    if (pos.has_value()) {
      block_spmm_kernel<scalar_t, true><<<grid, kThreads, 0, stream>>>(
          operand_t.const_data_ptr<scalar_t>(), batch, ptr.const_data_ptr<int32_t>(), idx.const_data_ptr<int32_t>(),
          pos->const_data_ptr<int32_t>(), values.const_data_ptr<scalar_t>(), b, out_block, red_block, w_out_stride,
          w_red_stride, out_t.mutable_data_ptr<scalar_t>());
    } else {
      block_spmm_kernel<scalar_t, false><<<grid, kThreads, 0, stream>>>(
          operand_t.const_data_ptr<scalar_t>(), batch, ptr.const_data_ptr<int32_t>(), idx.const_data_ptr<int32_t>(),
          nullptr, values.const_data_ptr<scalar_t>(), b, out_block, red_block, w_out_stride, w_red_stride,
          out_t.mutable_data_ptr<scalar_t>());
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out_t;
}

void check_index(const at::Tensor& t, const char* name, int64_t numel, const at::Tensor& like) {
  TORCH_CHECK_TYPE(t.scalar_type() == at::kInt, "bsr_linear (CUDA): ", name, " must be int32, got ", t.scalar_type());
  TORCH_CHECK_VALUE(t.device() == like.device(), "bsr_linear (CUDA): ", name, " is on ", t.device(), " but x is on ",
                    like.device());
  TORCH_CHECK_VALUE(t.dim() == 1 && t.numel() == numel && t.is_contiguous(), "bsr_linear (CUDA): ", name,
                    " must be a contiguous 1-D tensor of ", numel, " entries, got shape ", t.sizes());
}

struct Shape {
  int64_t block_rows, block_cols, nblocks, bh, bw;
  int64_t out_features() const { return block_rows * bh; }
  int64_t in_features() const { return block_cols * bw; }
};

Shape check_pattern(const at::Tensor& x, const at::Tensor& values, const at::Tensor& crow, const at::Tensor& col,
                    const at::Tensor& ccol, const at::Tensor& row, const at::Tensor& pos) {
  TORCH_CHECK_VALUE(values.dim() == 3 && values.size(1) >= 1 && values.size(2) >= 1,
                    "bsr_linear (CUDA): values must be 3-D (nblocks, bh, bw), got shape ", values.sizes());
  TORCH_CHECK_VALUE(crow.dim() == 1 && crow.numel() >= 1 && ccol.dim() == 1 && ccol.numel() >= 1,
                    "bsr_linear (CUDA): crow_indices and ccol_indices must be 1-D and non-empty");
  const Shape s{crow.numel() - 1, ccol.numel() - 1, values.size(0), values.size(1), values.size(2)};
  check_index(crow, "crow_indices", s.block_rows + 1, x);
  check_index(col, "col_indices", s.nblocks, x);
  check_index(ccol, "ccol_indices", s.block_cols + 1, x);
  check_index(row, "row_indices", s.nblocks, x);
  check_index(pos, "bsr_positions", s.nblocks, x);
  // The block width comes only from values' shape: a mismatch may be x's fault or values'.
  TORCH_CHECK_VALUE(x.dim() >= 1 && x.size(-1) == s.in_features(), "bsr_linear (CUDA): x has shape ", x.sizes(),
                    " but in_features = ", s.block_cols, " block columns (ccol_indices) x bw = ", s.bw,
                    " (values.shape[2]) = ", s.in_features(), ": x or values' block shape (nblocks, bh, bw) = ",
                    values.sizes(), " is wrong");
  TORCH_CHECK_VALUE(s.out_features() < (int64_t(1) << 31), "bsr_linear (CUDA): too many output features");
  return s;
}

// t as [features][batch], contiguous (one transposed copy).
at::Tensor transposed(const at::Tensor& t) { return as_rows(t).t().contiguous(); }

at::Tensor bsr_linear(const at::Tensor& x, const at::Tensor& values, const at::Tensor& crow_indices,
                      const at::Tensor& col_indices, const at::Tensor& ccol_indices, const at::Tensor& row_indices,
                      const at::Tensor& bsr_positions, const std::optional<at::Tensor>& bias) {
  TORCH_CHECK(x.is_cuda(), "bsr_linear (CUDA): x must be a CUDA tensor, got ", x.device());
  const c10::cuda::CUDAGuard device_guard(x.device());
  const Shape s = check_pattern(x, values, crow_indices, col_indices, ccol_indices, row_indices, bsr_positions);
  TORCH_CHECK_TYPE(values.scalar_type() == x.scalar_type(), "bsr_linear (CUDA): values dtype differs from x dtype");
  std::optional<at::Tensor> b;
  if (bias.has_value() && bias->defined()) {
    TORCH_CHECK_VALUE(bias->dim() == 1 && bias->size(0) == s.out_features(), "bsr_linear (CUDA): bias must have ",
                      s.out_features(), " entries");
    TORCH_CHECK_TYPE(bias->scalar_type() == x.scalar_type(), "bsr_linear (CUDA): bias dtype differs from x dtype");
    b = bias->contiguous();
  }
  std::vector<int64_t> out_shape(x.sizes().begin(), x.sizes().end());
  out_shape.back() = s.out_features();
  const at::Tensor y_t = block_spmm(transposed(x), crow_indices, col_indices, values.contiguous(), std::nullopt, b,
                                    s.bh, s.bw, s.bw, 1);
  return y_t.t().contiguous().view(out_shape);
}

std::tuple<at::Tensor, at::Tensor> bsr_linear_backward(const at::Tensor& grad_out, const at::Tensor& x,
                                                       const at::Tensor& values, const at::Tensor& crow_indices,
                                                       const at::Tensor& col_indices, const at::Tensor& ccol_indices,
                                                       const at::Tensor& row_indices, const at::Tensor& bsr_positions,
                                                       std::array<bool, 2> output_mask) {
  TORCH_CHECK(grad_out.is_cuda(), "bsr_linear_backward (CUDA): grad_out must be a CUDA tensor, got ",
              grad_out.device());
  const c10::cuda::CUDAGuard device_guard(grad_out.device());
  const auto [want_dx, want_dvalues] = output_mask;
  const Shape s = check_pattern(x, values, crow_indices, col_indices, ccol_indices, row_indices, bsr_positions);
  TORCH_CHECK_TYPE(grad_out.scalar_type() == x.scalar_type() && values.scalar_type() == x.scalar_type(),
                   "bsr_linear_backward (CUDA): grad_out, x and values must have one dtype");
  TORCH_CHECK_VALUE(grad_out.dim() == x.dim() && grad_out.size(-1) == s.out_features(),
                    "bsr_linear_backward (CUDA): grad_out has shape ", grad_out.sizes());
  const at::Tensor g_t = transposed(grad_out);  // [out_features][batch]
  const int64_t batch = g_t.size(1);
  at::Tensor dx = empty_output(x), dvalues = empty_output(values);
  if (want_dx) {
    // W^T's block lines are the transposed index; blocks through bsr_positions, read transposed.
    const at::Tensor dx_t = block_spmm(g_t, ccol_indices, row_indices, values.contiguous(), bsr_positions,
                                       std::nullopt, s.bw, s.bh, 1, s.bw);
    dx = dx_t.t().contiguous().view(x.sizes());
  }
  if (want_dvalues) {
    dvalues = at::empty({s.nblocks, s.bh, s.bw}, grad_out.options());
    if (batch == 0) {
      dvalues.zero_();
    } else if (s.nblocks > 0) {
      const at::Tensor x_t = transposed(x);  // read only here: x may be a placeholder otherwise
      const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
      AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, g_t.scalar_type(), "bsr_linear_backward_cuda", [&] {
        block_sddmm_kernel<scalar_t><<<static_cast<unsigned int>(s.block_rows), kThreads, 0, stream>>>(
            g_t.const_data_ptr<scalar_t>(), x_t.const_data_ptr<scalar_t>(), batch,
            crow_indices.const_data_ptr<int32_t>(), col_indices.const_data_ptr<int32_t>(), s.bh, s.bw,
            dvalues.mutable_data_ptr<scalar_t>());
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
    }
  }
  return {dx, dvalues};
}

}  // namespace

TORCH_LIBRARY_IMPL(sparsesam_cuda, CUDA, m) {
  m.impl("bsr_linear", &bsr_linear);
  m.impl("bsr_linear_backward", &bsr_linear_backward);
}

}  // namespace sparsesam::cuda
