// CUDA kernels for apply_mask and masked_weight_grad (the fused epilogue).
//
// Both kernels are memory-bound single passes, so the only thing that
// matters is moving bytes at full bandwidth: 16-byte vector loads/stores
// (when every pointer is aligned; otherwise an element-wise variant of the
// same kernel), a grid-stride loop sized to fill the GPU once rather than
// one thread per element, and the "which outputs" branches turned into
// template parameters so each variant touches only the streams it needs.
// Reduced-precision types compute in float and round once, as ATen's own
// elementwise ops do, so the results equal sparsesam/reference.py bit for bit.
#include "masked_weight_cuda.cuh"

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAFunctions.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>

#include "../common/masked_math.h"

namespace sparsesam::cuda {
namespace {

constexpr int kThreads = 256;
// 8 blocks x 256 threads = 2048 resident threads, the per-SM maximum on
// A100/H100: enough in flight to saturate memory, no more (the grid-stride
// loop covers the rest without paying for extra block launches).
constexpr int kBlocksPerSm = 8;
constexpr int kVectorBytes = 16;

// N elements moved as one aligned load/store (LDG.128 for the weight
// streams; the bool mask rides along as an N-byte load).
template <typename T, int N>
struct alignas(sizeof(T) * N) Pack {
  T v[N];
};

template <typename T, int N>
bool is_aligned(const T* p) {
  return p == nullptr || reinterpret_cast<std::uintptr_t>(p) % alignof(Pack<T, N>) == 0;
}

// The SM count comes straight from the runtime (a cached attribute read)
// rather than at::cuda::getCurrentDeviceProperties(): that lives in
// ATen/cuda/CUDAContext.h, which pulls in the cuBLAS/cuSPARSE/cuSOLVER
// headers, and a toolkit with only nvcc and the runtime lacks them.
int64_t num_blocks(int64_t n, int vec) {
  int sm_count = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sm_count, cudaDevAttrMultiProcessorCount, c10::cuda::current_device()));
  const int64_t items = (n + vec - 1) / vec;
  const int64_t max_blocks = static_cast<int64_t>(sm_count) * kBlocksPerSm;
  return std::clamp<int64_t>((items + kThreads - 1) / kThreads, 1, max_blocks);
}

// A bool mask selects, in the weight's own dtype (exact, no rounding).
template <typename scalar_t>
__device__ __forceinline__ scalar_t mask_one(scalar_t w, bool keep) {
  return masked_value(w, keep);
}

// A floating mask multiplies in opmath (float for half/bf16), rounded once.
template <typename scalar_t>
__device__ __forceinline__ scalar_t mask_one(scalar_t w, scalar_t m) {
  using acc_t = at::opmath_type<scalar_t>;
  return static_cast<scalar_t>(masked_value(static_cast<acc_t>(w), static_cast<acc_t>(m)));
}

template <typename scalar_t>
__device__ __forceinline__ scalar_t mul_one(scalar_t a, scalar_t b) {
  using acc_t = at::opmath_type<scalar_t>;
  return static_cast<scalar_t>(static_cast<acc_t>(a) * static_cast<acc_t>(b));
}

// out = W*M. The first n/N*N elements go as packs; the < N left over (only
// possible when N > 1) go element by element on the first threads.
template <int N, typename scalar_t, typename mask_t>
__global__ void apply_mask_kernel(const scalar_t* __restrict__ w, const mask_t* __restrict__ m,
                                  scalar_t* __restrict__ out, int64_t n) {
  const int64_t start = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t stride = static_cast<int64_t>(blockDim.x) * gridDim.x;
  const int64_t n_packs = n / N;
  for (int64_t p = start; p < n_packs; p += stride) {
    const auto wv = reinterpret_cast<const Pack<scalar_t, N>*>(w)[p];
    const auto mv = reinterpret_cast<const Pack<mask_t, N>*>(m)[p];
    Pack<scalar_t, N> ov;
#pragma unroll
    for (int j = 0; j < N; ++j) ov.v[j] = mask_one(wv.v[j], mv.v[j]);
    reinterpret_cast<Pack<scalar_t, N>*>(out)[p] = ov;
  }
  for (int64_t i = n_packs * N + start; i < n; i += stride) out[i] = mask_one(w[i], m[i]);
}

// dM = G*W (kDMask) and G <- G*M (kDWeight), one read of G. W is touched
// only when kDMask and M only when kDWeight, so a variant reads exactly the
// streams its outputs need (and W may be a placeholder when !kDMask).
template <int N, bool kDWeight, bool kDMask, typename scalar_t, typename mask_t>
__global__ void weight_grad_kernel(scalar_t* __restrict__ g, const scalar_t* __restrict__ w,
                                   const mask_t* __restrict__ m, scalar_t* __restrict__ dmask, int64_t n) {
  const int64_t start = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t stride = static_cast<int64_t>(blockDim.x) * gridDim.x;
  const int64_t n_packs = n / N;
  for (int64_t p = start; p < n_packs; p += stride) {
    auto gv = reinterpret_cast<const Pack<scalar_t, N>*>(g)[p];
    if constexpr (kDMask) {
      const auto wv = reinterpret_cast<const Pack<scalar_t, N>*>(w)[p];
      Pack<scalar_t, N> dv;
#pragma unroll
      for (int j = 0; j < N; ++j) dv.v[j] = mul_one(gv.v[j], wv.v[j]);
      reinterpret_cast<Pack<scalar_t, N>*>(dmask)[p] = dv;
    }
    if constexpr (kDWeight) {
      const auto mv = reinterpret_cast<const Pack<mask_t, N>*>(m)[p];
#pragma unroll
      for (int j = 0; j < N; ++j) gv.v[j] = mask_one(gv.v[j], mv.v[j]);
      reinterpret_cast<Pack<scalar_t, N>*>(g)[p] = gv;
    }
  }
  for (int64_t i = n_packs * N + start; i < n; i += stride) {
    const scalar_t gi = g[i];
    if constexpr (kDMask) dmask[i] = mul_one(gi, w[i]);
    if constexpr (kDWeight) g[i] = mask_one(gi, m[i]);
  }
}

template <typename scalar_t, typename mask_t>
void launch_apply_mask(const scalar_t* w, const mask_t* m, scalar_t* out, int64_t n) {
  constexpr int kVec = kVectorBytes / sizeof(scalar_t);
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  if (is_aligned<scalar_t, kVec>(w) && is_aligned<mask_t, kVec>(m) && is_aligned<scalar_t, kVec>(out)) {
    apply_mask_kernel<kVec><<<num_blocks(n, kVec), kThreads, 0, stream>>>(w, m, out, n);
  } else {
    apply_mask_kernel<1><<<num_blocks(n, 1), kThreads, 0, stream>>>(w, m, out, n);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <bool kDWeight, bool kDMask, typename scalar_t, typename mask_t>
void launch_weight_grad_variant(scalar_t* g, const scalar_t* w, const mask_t* m, scalar_t* dmask, int64_t n) {
  constexpr int kVec = kVectorBytes / sizeof(scalar_t);
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  // Pointers a variant does not read are null here, and null counts as aligned.
  if (is_aligned<scalar_t, kVec>(g) && is_aligned<scalar_t, kVec>(w) && is_aligned<mask_t, kVec>(m) &&
      is_aligned<scalar_t, kVec>(dmask)) {
    weight_grad_kernel<kVec, kDWeight, kDMask><<<num_blocks(n, kVec), kThreads, 0, stream>>>(g, w, m, dmask, n);
  } else {
    weight_grad_kernel<1, kDWeight, kDMask><<<num_blocks(n, 1), kThreads, 0, stream>>>(g, w, m, dmask, n);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename scalar_t, typename mask_t>
void launch_weight_grad(scalar_t* g, const scalar_t* w, const mask_t* m, scalar_t* dmask, bool want_dweight,
                        int64_t n) {
  if (dmask != nullptr && want_dweight) {
    launch_weight_grad_variant<true, true>(g, w, m, dmask, n);
  } else if (dmask != nullptr) {
    launch_weight_grad_variant<false, true>(g, w, static_cast<const mask_t*>(nullptr), dmask, n);
  } else if (want_dweight) {
    launch_weight_grad_variant<true, false>(g, static_cast<const scalar_t*>(nullptr), m, dmask, n);
  }
}

void check_mask(const char* op, const at::Tensor& like, const at::Tensor& mask) {
  TORCH_CHECK(mask.device() == like.device(), op, ": mask is on ", mask.device(), " but weight is on ",
              like.device());
  TORCH_CHECK(mask.scalar_type() == at::kBool || mask.scalar_type() == like.scalar_type(), op,
              ": mask must be bool or have the weight's dtype ", like.scalar_type(), ", got ",
              mask.scalar_type());
}

}  // namespace

at::Tensor apply_mask(const at::Tensor& weight, const at::Tensor& mask) {
  TORCH_CHECK(weight.is_cuda(), "apply_mask (CUDA): weight must be a CUDA tensor, got ", weight.device());
  TORCH_CHECK(weight.sizes() == mask.sizes(), "apply_mask: mask shape ", mask.sizes(),
              " must equal weight shape ", weight.sizes());
  check_mask("apply_mask", weight, mask);
  const c10::cuda::CUDAGuard device_guard(weight.device());
  const at::Tensor w = weight.contiguous();
  const at::Tensor m = mask.contiguous();
  at::Tensor out = at::empty_like(w, at::MemoryFormat::Contiguous);
  const int64_t n = w.numel();
  if (n == 0) return out;  // a zero-sized grid is a launch error
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, w.scalar_type(), "apply_mask_cuda", [&] {
    if (m.scalar_type() == at::kBool) {
      launch_apply_mask(w.const_data_ptr<scalar_t>(), m.const_data_ptr<bool>(), out.mutable_data_ptr<scalar_t>(), n);
    } else {
      launch_apply_mask(w.const_data_ptr<scalar_t>(), m.const_data_ptr<scalar_t>(),
                        out.mutable_data_ptr<scalar_t>(), n);
    }
  });
  return out;
}

at::Tensor weight_grad_inplace(at::Tensor& grad, const at::Tensor& weight, const at::Tensor& mask,
                               bool want_dweight, bool want_dmask) {
  TORCH_CHECK(grad.is_cuda(), "masked_weight_grad (CUDA): grad_weight must be a CUDA tensor, got ", grad.device());
  TORCH_CHECK(grad.is_contiguous(), "weight_grad_inplace: grad must be contiguous");
  TORCH_CHECK(grad.sizes() == weight.sizes() && weight.sizes() == mask.sizes(),
              "masked_weight_grad: grad_weight, weight and mask must have one shape");
  TORCH_CHECK(!(want_dmask && mask.scalar_type() == at::kBool),
              "masked_weight_grad: a bool mask has no gradient");
  check_mask("masked_weight_grad", grad, mask);
  if (want_dmask) {
    TORCH_CHECK(weight.device() == grad.device() && weight.scalar_type() == grad.scalar_type(),
                "masked_weight_grad: weight must be on grad_weight's device with its dtype");
  }
  const c10::cuda::CUDAGuard device_guard(grad.device());
  // W is read only for dM (callers may pass a zero-stride placeholder
  // otherwise, which must not be materialised or even dereferenced).
  const at::Tensor w = want_dmask ? weight.contiguous() : at::Tensor();
  const at::Tensor m = want_dweight ? mask.contiguous() : at::Tensor();
  at::Tensor dmask = want_dmask ? at::empty_like(grad, at::MemoryFormat::Contiguous) : at::Tensor();
  const int64_t n = grad.numel();
  if (n == 0 || !(want_dweight || want_dmask)) return dmask;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, grad.scalar_type(), "masked_weight_grad_cuda", [&] {
    scalar_t* g = grad.mutable_data_ptr<scalar_t>();
    const scalar_t* wp = want_dmask ? w.const_data_ptr<scalar_t>() : nullptr;
    scalar_t* dm = want_dmask ? dmask.mutable_data_ptr<scalar_t>() : nullptr;
    if (mask.scalar_type() == at::kBool) {
      launch_weight_grad(g, wp, want_dweight ? m.const_data_ptr<bool>() : nullptr, dm, want_dweight, n);
    } else {
      launch_weight_grad(g, wp, want_dweight ? m.const_data_ptr<scalar_t>() : nullptr, dm, want_dweight, n);
    }
  });
  return dmask;
}

namespace {

std::tuple<at::Tensor, at::Tensor> masked_weight_grad(const at::Tensor& grad_weight, const at::Tensor& weight,
                                                      const at::Tensor& mask, std::array<bool, 2> output_mask) {
  TORCH_CHECK(grad_weight.is_cuda(), "masked_weight_grad (CUDA): grad_weight must be a CUDA tensor, got ",
              grad_weight.device());
  // The clone inside the impl must land on grad_weight's device.
  const c10::cuda::CUDAGuard device_guard(grad_weight.device());
  return masked_weight_grad_impl(kernels(), grad_weight, weight, mask, output_mask);
}

}  // namespace

}  // namespace sparsesam::cuda

TORCH_LIBRARY_IMPL(sparsesam_cuda, CUDA, m) {
  m.impl("apply_mask", &sparsesam::cuda::apply_mask);
  m.impl("masked_weight_grad", &sparsesam::cuda::masked_weight_grad);
}
