// Mask-perturbation scoring on CUDA (DESIGN.md primitive 4): mask_grad_sq_norm,
// mask_ascent_ and mask_score_grad as multi-tensor kernels (the math and the why:
// sparsesam/reference.py).
//
// The layout is the fused SAM step's (multi_tensor_cuda.cuh): one table of
// TensorMeta + chunks per call, one block per chunk, one launch per group.
// Per tensor, TensorMeta::grad is G (or dM itself), param the weight W (null
// where grads[i] is dM), mask the op's mask or scores and out what it writes.
// Whether a tensor has a weight is read at run time: uniform over a block, so
// the branch is free.
//
// Elementwise results are computed in double with the _rn intrinsics (never
// contracted into an FMA) in the reference's order, and rounded once as
// torch's .to() rounds (16-bit types through float), so every dtype equals
// the reference bit for bit. mask_grad_sq_norm is the SAM norm's kernel;
// mask_score_grad's per-layer sums are two-stage and deterministic (one
// partial per chunk, then one block per layer adding its chunks in order).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cstdint>
#include <cstring>
#include <optional>
#include <tuple>
#include <type_traits>
#include <vector>

#include "multi_tensor_cuda.cuh"

namespace sparsesam::cuda {
namespace {

// ---------------------------------------------------------------------------
// Device helpers

// double -> T as torch's .to(T) rounds: 16-bit floats through float.
template <typename T>
__device__ __forceinline__ T round_to(double v) {
  if constexpr (std::is_same_v<T, double>) {
    return v;
  } else if constexpr (std::is_same_v<T, float>) {
    return __double2float_rn(v);
  } else {
    return static_cast<T>(__double2float_rn(v));
  }
}

// dM = g * w in double (exact for 16/32-bit inputs), or g.
template <typename scalar_t>
__device__ __forceinline__ double mask_grad(scalar_t g, scalar_t w, bool has_weight) {
  const double gd = static_cast<double>(g);
  return has_weight ? __dmul_rn(gd, static_cast<double>(w)) : gd;
}

// Pack p of G and, when there is one, W.
template <int N, typename scalar_t>
__device__ __forceinline__ void load_gw(const scalar_t* g, const scalar_t* w, int p, bool aligned,
                                        Pack<scalar_t, N>& gv, Pack<scalar_t, N>& wv) {
  gv = load_pack<N>(g, p, aligned);
  if (w != nullptr) wv = load_pack<N>(w, p, aligned);
}

// The chunk's pointers, offset to its start.
template <typename T>
__device__ __forceinline__ const T* at_chunk(const void* base, const Chunk& c) {
  return base == nullptr ? nullptr : static_cast<const T*>(base) + c.start;
}

// ---------------------------------------------------------------------------
// mask_ascent_: out = clip(M + coef * dM, 0, 1), coef = rho * (1 / (sqrt(sq_norm) + eps))

__device__ __forceinline__ double clip01(double v) {
  // The reference's clip: v <= 0 -> +0.0, v >= 1 -> 1; NaN fails both tests and comes through.
  v = v <= 0.0 ? 0.0 : v;
  return v >= 1.0 ? 1.0 : v;
}

template <typename scalar_t>
__global__ void __launch_bounds__(kThreads)
    mask_ascent_kernel(const TensorMeta* __restrict__ metas, const Chunk* __restrict__ chunks,
                       const double* __restrict__ sq_norm, double rho, double eps) {
  constexpr int N = pack_width<scalar_t>();
  const Chunk chunk = chunks[blockIdx.x];
  const TensorMeta& t = metas[chunk.tensor];
  const int len = chunk_length(t, chunk);
  const bool aligned = t.aligned != 0;
  const scalar_t* g = at_chunk<scalar_t>(t.grad, chunk);
  const scalar_t* w = at_chunk<scalar_t>(t.param, chunk);
  const scalar_t* m = at_chunk<scalar_t>(t.mask, chunk);
  scalar_t* out = static_cast<scalar_t*>(t.out) + chunk.start;
  const bool has_weight = w != nullptr;
  const double coef = __dmul_rn(rho, __ddiv_rn(1.0, __dadd_rn(__dsqrt_rn(*sq_norm), eps)));
  auto one = [&](scalar_t gi, scalar_t wi, scalar_t mi) {
    return round_to<scalar_t>(clip01(__dadd_rn(static_cast<double>(mi), __dmul_rn(coef, mask_grad(gi, wi, has_weight)))));
  };
  const int n_packs = len / N;
  for (int p = threadIdx.x; p < n_packs; p += kThreads) {
    Pack<scalar_t, N> gv, wv;
    load_gw<N>(g, w, p, aligned, gv, wv);
    const Pack<scalar_t, N> mv = load_pack<N>(m, p, aligned);
    Pack<scalar_t, N> ov;
#pragma unroll
    for (int j = 0; j < N; ++j) ov.v[j] = one(gv.v[j], has_weight ? wv.v[j] : gv.v[j], mv.v[j]);
    store_pack<N>(out, p, ov, aligned);
  }
  for (int i = n_packs * N + threadIdx.x; i < len; i += kThreads) {
    out[i] = one(g[i], has_weight ? w[i] : g[i], m[i]);
  }
}

// ---------------------------------------------------------------------------
// mask_score_grad: out = sign(s) * dM; partials[chunk] = sum(dM) over the chunk

__device__ __forceinline__ double sign_of(double s) { return s > 0.0 ? 1.0 : (s < 0.0 ? -1.0 : 0.0); }

template <typename scalar_t>
__global__ void __launch_bounds__(kThreads)
    mask_score_grad_kernel(const TensorMeta* __restrict__ metas, const Chunk* __restrict__ chunks,
                           double* __restrict__ partials) {
  constexpr int N = pack_width<scalar_t>();
  const Chunk chunk = chunks[blockIdx.x];
  const TensorMeta& t = metas[chunk.tensor];
  const int len = chunk_length(t, chunk);
  const bool aligned = t.aligned != 0;
  const scalar_t* g = at_chunk<scalar_t>(t.grad, chunk);
  const scalar_t* w = at_chunk<scalar_t>(t.param, chunk);
  const scalar_t* s = at_chunk<scalar_t>(t.mask, chunk);
  scalar_t* out = static_cast<scalar_t*>(t.out) + chunk.start;
  const bool has_weight = w != nullptr;
  double sum = 0.0;  // per thread in pack order, then a fixed tree: deterministic
  const int n_packs = len / N;
  for (int p = threadIdx.x; p < n_packs; p += kThreads) {
    Pack<scalar_t, N> gv, wv;
    load_gw<N>(g, w, p, aligned, gv, wv);
    const Pack<scalar_t, N> sv = load_pack<N>(s, p, aligned);
    Pack<scalar_t, N> ov;
#pragma unroll
    for (int j = 0; j < N; ++j) {
      const double dm = mask_grad(gv.v[j], has_weight ? wv.v[j] : gv.v[j], has_weight);
      ov.v[j] = round_to<scalar_t>(__dmul_rn(sign_of(static_cast<double>(sv.v[j])), dm));
      sum = __dadd_rn(sum, dm);
    }
    store_pack<N>(out, p, ov, aligned);
  }
  for (int i = n_packs * N + threadIdx.x; i < len; i += kThreads) {
    const double dm = mask_grad(g[i], has_weight ? w[i] : g[i], has_weight);
    out[i] = round_to<scalar_t>(__dmul_rn(sign_of(static_cast<double>(s[i])), dm));
    sum = __dadd_rn(sum, dm);
  }
  sum = block_sum<kThreads>(sum);
  if (threadIdx.x == 0) partials[blockIdx.x] = sum;
}

// out[layer] = partials[start, start + count) added in a fixed order; one block per layer.
__global__ void __launch_bounds__(kSumThreads)
    segment_sums_kernel(const double* __restrict__ partials, const int64_t* __restrict__ segments,
                        double* __restrict__ out) {
  const int64_t start = segments[2 * blockIdx.x];
  const int64_t count = segments[2 * blockIdx.x + 1];
  double sum = 0;
  for (int64_t i = threadIdx.x; i < count; i += kSumThreads) sum += partials[start + i];
  sum = block_sum<kSumThreads>(sum);
  if (threadIdx.x == 0) out[blockIdx.x] = sum;
}

// ---------------------------------------------------------------------------
// Host

at::Device checked_device(const char* op, at::TensorList grads) {
  const at::Device device = grads[0].device();
  TORCH_CHECK(device.is_cuda(), op, ": grads[0] must be a CUDA tensor, got ", device);
  return device;
}

// weights[i] laid out like `ref`, or nullptr where grads[i] is dM itself.
void* weight_ptr(const char* op, size_t i, const c10::List<std::optional<at::Tensor>>& weights,
                 const at::Tensor& grad, const at::Tensor& ref, MultiTensorTable& table) {
  const std::optional<at::Tensor> w = weights.get(i);
  if (!w.has_value() || !w->defined()) return nullptr;
  check_like(op, "weights", i, *w, "grads", grad);
  return const_cast<void*>(laid_out_like(*w, ref, table).const_data_ptr());
}

// The gradient as the layout every other tensor of its row follows.
at::Tensor contiguous_kept(const at::Tensor& t, MultiTensorTable& table) {
  at::Tensor c = t.contiguous();
  table.keep_alive(c);
  return c;
}

at::Tensor mask_grad_sq_norm(at::TensorList grads, const c10::List<std::optional<at::Tensor>>& weights) {
  constexpr const char* op = "mask_grad_sq_norm (CUDA)";
  check_lengths(op, "grads", grads.size(), {{"weights", weights.size()}});
  if (grads.empty()) return at::zeros({}, at::dtype(at::kDouble));
  const at::Device device = checked_device(op, grads);
  const c10::cuda::CUDAGuard device_guard(device);
  MultiTensorTable table;
  for (size_t i = 0; i < grads.size(); ++i) {
    check_param(op, "grads", i, grads[i], device);
    const at::Tensor g = dense(grads[i], table);
    TensorMeta meta{};
    meta.numel = g.numel();
    meta.grad = g.const_data_ptr();
    meta.param = weight_ptr(op, i, weights, grads[i], g, table);
    if (meta.numel == 0) continue;
    // Variant 1: the sum-of-squares kernel scales by the weight (dM = g*w).
    table.add(meta, g.scalar_type(), meta.param != nullptr ? 1 : 0);
  }
  table.upload(device);
  return sum_of_squares(table, device);
}

void mask_ascent_(at::TensorList out, at::TensorList grads, const c10::List<std::optional<at::Tensor>>& weights,
                  at::TensorList masks, const at::Tensor& sq_norm, double rho, double eps) {
  constexpr const char* op = "mask_ascent_ (CUDA)";
  check_lengths(op, "grads", grads.size(),
                {{"out", out.size()}, {"weights", weights.size()}, {"masks", masks.size()}});
  if (grads.empty()) return;
  const at::Device device = checked_device(op, grads);
  TORCH_CHECK(sq_norm.defined() && sq_norm.numel() == 1 && is_supported_float(sq_norm.scalar_type()), op,
              ": sq_norm must be a floating tensor with one element");
  const c10::cuda::CUDAGuard device_guard(device);
  MultiTensorTable table;
  for (size_t i = 0; i < grads.size(); ++i) {
    check_param(op, "grads", i, grads[i], device);
    check_like(op, "masks", i, masks[i], "grads", grads[i]);
    check_like(op, "out", i, out[i], "grads", grads[i]);
    check_writable(op, "out", i, out[i]);
    const at::Tensor& o = out[i];
    if (o.numel() == 0) continue;
    TensorMeta meta{};
    meta.numel = o.numel();
    meta.out = o.mutable_data_ptr();
    meta.grad = laid_out_like(grads[i], o, table).const_data_ptr();
    meta.param = weight_ptr(op, i, weights, grads[i], o, table);
    meta.mask = laid_out_like(masks[i], o, table).const_data_ptr();
    meta.mask_kind = kind_of(o.scalar_type());
    meta.mask_bytes = static_cast<int32_t>(o.element_size());
    table.add(meta, o.scalar_type());
  }
  table.upload(device);
  if (table.num_chunks() == 0) return;
  // Read on the device by every block: no host sync on the norm.
  const at::Tensor norm = sq_norm.reshape({}).to(device, at::kDouble);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  for (const Group& group : table.groups()) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, group.dtype, "mask_ascent_cuda", [&] {
      for_each_launch(group, [&](int64_t first, unsigned int count) {
        mask_ascent_kernel<scalar_t><<<count, kThreads, 0, stream>>>(
            table.device_metas(), table.device_chunks() + first, norm.const_data_ptr<double>(), rho, eps);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
    });
  }
}

std::tuple<std::vector<at::Tensor>, at::Tensor> mask_score_grad(
    at::TensorList grads, const c10::List<std::optional<at::Tensor>>& weights, at::TensorList scores) {
  constexpr const char* op = "mask_score_grad (CUDA)";
  const size_t n = grads.size();
  check_lengths(op, "grads", n, {{"weights", weights.size()}, {"scores", scores.size()}});
  if (n == 0) return {std::vector<at::Tensor>{}, at::zeros({0}, at::dtype(at::kDouble))};
  const at::Device device = checked_device(op, grads);
  const c10::cuda::CUDAGuard device_guard(device);
  MultiTensorTable table;
  std::vector<at::Tensor> score_grads;
  std::vector<size_t> layer_of_meta;  // table rows are the non-empty layers
  for (size_t i = 0; i < n; ++i) {
    check_param(op, "grads", i, grads[i], device);
    check_like(op, "scores", i, scores[i], "grads", grads[i]);
    score_grads.push_back(at::empty(grads[i].sizes(), grads[i].options()));
    const at::Tensor g = contiguous_kept(grads[i], table);
    TensorMeta meta{};
    meta.numel = g.numel();
    meta.param = weight_ptr(op, i, weights, grads[i], g, table);
    if (meta.numel == 0) continue;
    meta.grad = g.const_data_ptr();
    meta.mask = laid_out_like(scores[i], g, table).const_data_ptr();
    meta.mask_kind = kind_of(g.scalar_type());
    meta.mask_bytes = static_cast<int32_t>(g.element_size());
    meta.out = score_grads.back().mutable_data_ptr();
    table.add(meta, g.scalar_type());
    layer_of_meta.push_back(i);
  }
  table.upload(device);
  at::Tensor rates = at::zeros({static_cast<int64_t>(n)}, at::TensorOptions().dtype(at::kDouble).device(device));
  if (table.num_chunks() == 0) return {score_grads, rates};

  at::Tensor partials = at::empty({table.num_chunks()}, at::TensorOptions().dtype(at::kDouble).device(device));
  double* partials_ptr = partials.mutable_data_ptr<double>();
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  for (const Group& group : table.groups()) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, group.dtype, "mask_score_grad_cuda", [&] {
      for_each_launch(group, [&](int64_t first, unsigned int count) {
        mask_score_grad_kernel<scalar_t><<<count, kThreads, 0, stream>>>(
            table.device_metas(), table.device_chunks() + first, partials_ptr + first);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
    });
  }
  // (first partial, count) per layer; an empty layer adds nothing.
  at::Tensor segments = at::zeros({static_cast<int64_t>(2 * n)}, at::TensorOptions().dtype(at::kLong).pinned_memory(true));
  int64_t* seg = segments.mutable_data_ptr<int64_t>();
  for (size_t r = 0; r < layer_of_meta.size(); ++r) {
    const size_t layer = layer_of_meta[r];
    seg[2 * layer] = table.first_chunk(r);
    seg[2 * layer + 1] = (grads[layer].numel() + kChunkSize - 1) / kChunkSize;
  }
  const at::Tensor device_segments = segments.to(device, at::kLong, /*non_blocking=*/true);
  segment_sums_kernel<<<static_cast<unsigned int>(n), kSumThreads, 0, stream>>>(
      partials_ptr, device_segments.const_data_ptr<int64_t>(), rates.mutable_data_ptr<double>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {score_grads, rates};
}

}  // namespace

TORCH_LIBRARY_IMPL(sparsesam_cuda, CUDA, m) {
  m.impl("mask_grad_sq_norm", &mask_grad_sq_norm);
  m.impl("mask_ascent_", &mask_ascent_);
  m.impl("mask_score_grad", &mask_score_grad);
}

}  // namespace sparsesam::cuda
