// The fused SAM step on CUDA (DESIGN.md primitive 3): sam_grad_sq_norm,
// sam_perturb_ and sgd_step_ as multi-tensor kernels, apex style.
//
// One call covers every parameter. The host cuts each tensor into fixed
// chunks of kChunkSize elements and writes a table of (tensor, chunk start)
// entries plus one TensorMeta (pointers, sizes, mask and rho kinds) per
// tensor; that table goes to the device in one non-blocking copy from
// pinned memory on the current stream, and one kernel launch per dtype
// (almost always exactly one) processes every chunk, one block per chunk.
//
// Inside a chunk each thread owns the packs threadIdx.x + k * kThreads
// (16-byte vector loads when every pointer of the tensor is aligned, the
// same packs element by element otherwise) and loads kIlp packs of every
// stream before computing on any, so enough bytes are in flight.
//
// sam_grad_sq_norm is a deterministic two-stage reduction: each block sums
// its chunk in float (double for double) in a fixed order — per thread in
// pack order, then a fixed shuffle tree — and writes one partial per chunk;
// a single block then adds the partials in double, again in a fixed order.
// Chunk size and block size are constants, the element-to-thread map is the
// same with and without vector loads, and every multiply-add is an explicit
// fma, so the bits depend on neither the GPU, nor the run, nor the stream,
// nor the tensors' alignment. No atomics.
//
// sam_perturb_ computes in double and rounds once, exactly as
// sparsesam/reference.py does, so every dtype equals the reference bit for
// bit. sgd_step_ computes in opmath (float for half/bfloat16, rounded once);
// in float and double it performs the reference's own operations in its
// order, each rounded, so it equals the reference bit for bit there.
// Products and sums whose bits are promised use the _rn intrinsics, which
// the compiler never contracts into an FMA.
//
// A mask is a predicate here: entries where it is 0 (False) are pruned — not
// counted in the norm, not moved by the ascent or the optimizer (weight and
// momentum buffer keep their bits).
//
// The chunk table, packs, mask tests and the norm's kernels are shared with
// mask_scoring_cuda.cu through multi_tensor_cuda.cuh.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/core/ScalarType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <initializer_list>
#include <limits>
#include <optional>
#include <type_traits>
#include <utility>
#include <vector>

#include "../common/sam_step_args.h"
#include "multi_tensor_cuda.cuh"

namespace sparsesam::cuda {
namespace {

// ---------------------------------------------------------------------------
// sam_perturb_

// rho * scale for element i of a chunk, in double: one value for the tensor,
// or the value of the element's output channel (dim 0).
class RhoScale {
 public:
  __device__ RhoScale(const TensorMeta& t, int64_t chunk_start, double scale)
      : rho_(t.rho),
        kind_(t.rho_kind),
        channel_size_(t.channel_size),
        magic_(t.channel_magic),
        shift_(t.channel_shift),
        scale_(scale) {
    if (channel_size_ == 0) {
      uniform_ = __dmul_rn(rho_ != nullptr ? load_double(kind_, rho_, 0) : t.rho_value, scale);
    } else {
      first_channel_ = chunk_start / channel_size_;  // once per thread: the only 64-bit division
      offset_ = chunk_start % channel_size_;
    }
  }

  __device__ __forceinline__ double operator()(int i) const {
    if (channel_size_ == 0) return uniform_;
    const int64_t r = offset_ + i;
    int64_t channel;
    if (magic_ != 0) {
      // r < channel_size + kChunkSize <= 2^31 (checked on the host), where
      // this multiply-and-shift equals r / channel_size exactly.
      const uint32_t r32 = static_cast<uint32_t>(r);
      channel = (__umulhi(r32, magic_) + r32) >> shift_;
    } else {
      channel = r / channel_size_;
    }
    return __dmul_rn(load_double(kind_, rho_, first_channel_ + channel), scale_);
  }

 private:
  const void* rho_;
  int32_t kind_;
  int64_t channel_size_;
  uint32_t magic_;
  int32_t shift_;
  double scale_;
  double uniform_ = 0;
  int64_t first_channel_ = 0;
  int64_t offset_ = 0;
};

// w + (rho * scale) * g [* w^2], in double, rounded once to the dtype.
template <bool kAdaptive, typename scalar_t>
__device__ __forceinline__ scalar_t ascent_point(scalar_t w, scalar_t g, double rho_scale, bool keep) {
  if (!keep) return w;
  const double wd = static_cast<double>(w);
  double e = __dmul_rn(rho_scale, static_cast<double>(g));
  if constexpr (kAdaptive) e = __dmul_rn(e, __dmul_rn(wd, wd));
  return static_cast<scalar_t>(__dadd_rn(wd, e));
}

template <typename scalar_t, bool kAdaptive>
__global__ void __launch_bounds__(kThreads)
    sam_perturb_kernel(const TensorMeta* __restrict__ metas, const Chunk* __restrict__ chunks,
                       const double* __restrict__ sq_norm, double eps) {
  constexpr int N = pack_width<scalar_t>();
  constexpr int kIlp = ilp<scalar_t>();
  const Chunk chunk = chunks[blockIdx.x];
  const TensorMeta& t = metas[chunk.tensor];
  const int len = chunk_length(t, chunk);
  const bool aligned = t.aligned != 0;
  const int32_t mask_kind = t.mask_kind;
  const scalar_t* w = static_cast<const scalar_t*>(t.param) + chunk.start;
  const scalar_t* g = static_cast<const scalar_t*>(t.grad) + chunk.start;
  scalar_t* out = static_cast<scalar_t*>(t.out) + chunk.start;
  const void* m = chunk_mask(t, chunk);
  // 1 / (||s g|| + eps), as the reference: correctly rounded sqrt, add, divide.
  const double scale = 1.0 / __dadd_rn(__dsqrt_rn(*sq_norm), eps);
  const RhoScale rho_scale(t, chunk.start, scale);

  const int n_packs = len / N;
  for (int base = threadIdx.x; base < n_packs; base += kThreads * kIlp) {
    Pack<scalar_t, N> wv[kIlp];
    Pack<scalar_t, N> gv[kIlp];
    uint32_t keep[kIlp];
#pragma unroll
    for (int k = 0; k < kIlp; ++k) {
      const int p = base + k * kThreads;
      if (p < n_packs) {
        wv[k] = load_pack<N>(w, p, aligned);
        gv[k] = load_pack<N>(g, p, aligned);
        keep[k] = keep_bits<N>(mask_kind, m, p, aligned);
      }
    }
#pragma unroll
    for (int k = 0; k < kIlp; ++k) {
      const int p = base + k * kThreads;
      if (p < n_packs) {
        Pack<scalar_t, N> ov;
#pragma unroll
        for (int j = 0; j < N; ++j) {
          ov.v[j] = ascent_point<kAdaptive>(wv[k].v[j], gv[k].v[j], rho_scale(p * N + j), kept(keep[k], j));
        }
        store_pack<N>(out, p, ov, aligned);
      }
    }
  }
  for (int i = n_packs * N + threadIdx.x; i < len; i += kThreads) {
    out[i] = ascent_point<kAdaptive>(w[i], g[i], rho_scale(i), keep_one(mask_kind, m, i));
  }
}

// ---------------------------------------------------------------------------
// sgd_step_

enum MomentumMode : int { kNoMomentum = 0, kFirstStep, kRunning };

struct SgdScalars {
  double lr;
  double momentum;
  double dampening_complement;  // 1 - dampening, computed in double as Python does
  double weight_decay;
};

template <typename acc_t>
struct SgdCoefficients {
  acc_t lr, momentum, dampening_complement, weight_decay;
  __device__ explicit SgdCoefficients(const SgdScalars& s)
      : lr(static_cast<acc_t>(s.lr)),
        momentum(static_cast<acc_t>(s.momentum)),
        dampening_complement(static_cast<acc_t>(s.dampening_complement)),
        weight_decay(static_cast<acc_t>(s.weight_decay)) {}
};

// One kept element of torch.optim.SGD, the reference's operations in its
// order (each rounded in acc_t; stored once in the dtype).
template <int kMomentum, bool kNesterov, bool kWeightDecay, bool kMaximize, typename scalar_t, typename acc_t>
__device__ __forceinline__ void sgd_one(scalar_t& w, scalar_t& b, scalar_t g, const SgdCoefficients<acc_t>& c) {
  const acc_t wv = static_cast<acc_t>(w);
  acc_t d = kMaximize ? -static_cast<acc_t>(g) : static_cast<acc_t>(g);
  if constexpr (kWeightDecay) d = add_rn(d, mul_rn(c.weight_decay, wv));
  if constexpr (kMomentum != kNoMomentum) {
    acc_t nb;
    if constexpr (kMomentum == kFirstStep) {
      nb = d;
    } else {
      nb = add_rn(mul_rn(static_cast<acc_t>(b), c.momentum), mul_rn(c.dampening_complement, d));
    }
    b = static_cast<scalar_t>(nb);
    d = kNesterov ? add_rn(d, mul_rn(c.momentum, nb)) : nb;
  }
  w = static_cast<scalar_t>(sub_rn(wv, mul_rn(c.lr, d)));
}

template <typename scalar_t, int kMomentum, bool kNesterov, bool kWeightDecay, bool kMaximize>
__global__ void __launch_bounds__(kThreads)
    sgd_step_kernel(const TensorMeta* __restrict__ metas, const Chunk* __restrict__ chunks, SgdScalars scalars) {
  using acc_t = at::opmath_type<scalar_t>;
  constexpr int N = pack_width<scalar_t>();
  constexpr int kIlp = ilp<scalar_t>();
  constexpr bool kBuffer = kMomentum != kNoMomentum;
  const Chunk chunk = chunks[blockIdx.x];
  const TensorMeta& t = metas[chunk.tensor];
  const int len = chunk_length(t, chunk);
  const bool aligned = t.aligned != 0;
  const int32_t mask_kind = t.mask_kind;
  scalar_t* w = static_cast<scalar_t*>(t.param) + chunk.start;
  const scalar_t* g = static_cast<const scalar_t*>(t.grad) + chunk.start;
  scalar_t* buf = kBuffer ? static_cast<scalar_t*>(t.buf) + chunk.start : nullptr;
  const void* m = chunk_mask(t, chunk);
  const SgdCoefficients<acc_t> coef(scalars);

  const int n_packs = len / N;
  for (int base = threadIdx.x; base < n_packs; base += kThreads * kIlp) {
    Pack<scalar_t, N> wv[kIlp];
    Pack<scalar_t, N> gv[kIlp];
    Pack<scalar_t, N> bv[kIlp];
    uint32_t keep[kIlp];
#pragma unroll
    for (int k = 0; k < kIlp; ++k) {
      const int p = base + k * kThreads;
      if (p < n_packs) {
        wv[k] = load_pack<N>(w, p, aligned);
        gv[k] = load_pack<N>(g, p, aligned);
        // Read even on the first step: the pruned entries are written back as they were.
        if constexpr (kBuffer) bv[k] = load_pack<N>(buf, p, aligned);
        keep[k] = keep_bits<N>(mask_kind, m, p, aligned);
      }
    }
#pragma unroll
    for (int k = 0; k < kIlp; ++k) {
      const int p = base + k * kThreads;
      if (p < n_packs) {
#pragma unroll
        for (int j = 0; j < N; ++j) {
          if (kept(keep[k], j)) {
            sgd_one<kMomentum, kNesterov, kWeightDecay, kMaximize>(wv[k].v[j], bv[k].v[j], gv[k].v[j], coef);
          }
        }
        store_pack<N>(w, p, wv[k], aligned);
        if constexpr (kBuffer) store_pack<N>(buf, p, bv[k], aligned);
      }
    }
  }
  for (int i = n_packs * N + threadIdx.x; i < len; i += kThreads) {
    if (!keep_one(mask_kind, m, i)) continue;  // the tail writes kept entries only
    scalar_t wi = w[i];
    scalar_t bi = kBuffer ? buf[i] : scalar_t(0);
    sgd_one<kMomentum, kNesterov, kWeightDecay, kMaximize>(wi, bi, g[i], coef);
    w[i] = wi;
    if constexpr (kBuffer) buf[i] = bi;
  }
}


// Division by d as (umulhi(n, magic) + n) >> shift, exact for n < 2^31 and
// d <= 2^31 (PyTorch's IntDivider). Left off (magic 0) when a chunk's
// offsets could pass 2^31.
void set_channel_division(int64_t d, TensorMeta& meta) {
  meta.channel_magic = 0;
  meta.channel_shift = 0;
  if (d > (int64_t{1} << 31) - kChunkSize) return;
  int shift = 0;
  while ((int64_t{1} << shift) < d) ++shift;
  const uint64_t magic = ((uint64_t{1} << 32) * ((uint64_t{1} << shift) - static_cast<uint64_t>(d))) /
                             static_cast<uint64_t>(d) + 1;
  meta.channel_magic = static_cast<uint32_t>(magic);
  meta.channel_shift = shift;
}

void set_rho(const char* op, size_t i, const at::Tensor& rho, const at::Tensor& ref, TensorMeta& meta,
             MultiTensorTable& table) {
  TORCH_CHECK(rho.defined(), op, ": rhos[", i, "] is undefined");
  TORCH_CHECK(is_supported_float(rho.scalar_type()), op, ": rhos[", i, "] must be floating, got ",
              rho.scalar_type());
  if (rho.numel() == 1) {
    if (rho.is_cpu()) {
      meta.rho_value = rho.item<double>();  // a host value: no device sync
    } else {
      TORCH_CHECK(rho.device() == ref.device(), op, ": rhos[", i, "] is on ", rho.device(),
                  " but its parameter is on ", ref.device());
      meta.rho = rho.const_data_ptr();
      meta.rho_kind = kind_of(rho.scalar_type());
    }
    return;
  }
  TORCH_CHECK(ref.dim() >= 1 && rho.numel() == ref.size(0), op, ": rhos[", i,
              "] must hold one value, or one per output channel (dim 0 of a parameter of shape ", ref.sizes(),
              "), got shape ", rho.sizes());
  TORCH_CHECK(rho.device() == ref.device(), op, ": a per-channel rhos[", i, "] must be on its parameter's device ",
              ref.device(), ", got ", rho.device());
  if (ref.numel() == 0) return;
  const int64_t channel_size = ref.numel() / ref.size(0);
  TORCH_CHECK(ref.stride(0) == channel_size, op, ": a per-channel rhos[", i,
              "] needs dim 0 outermost in memory; parameter ", i, " has strides ", ref.strides());
  const at::Tensor r = rho.contiguous();
  table.keep_alive(r);
  meta.rho = r.const_data_ptr();
  meta.rho_kind = kind_of(rho.scalar_type());
  meta.channel_size = channel_size;
  set_channel_division(channel_size, meta);
}

// ---------------------------------------------------------------------------
// The ops

at::Tensor sam_grad_sq_norm(at::TensorList grads, at::TensorList weights,
                            const c10::List<std::optional<at::Tensor>>& masks, bool adaptive) {
  constexpr const char* op = "sam_grad_sq_norm (CUDA)";
  check_lengths(op, "grads", grads.size(), {{"weights", weights.size()}, {"masks", masks.size()}});
  if (grads.empty()) return at::zeros({}, at::dtype(at::kDouble));  // as the reference: nothing to sum
  const at::Device device = grads[0].device();
  TORCH_CHECK(device.is_cuda(), op, ": grads[0] must be a CUDA tensor, got ", device);
  const c10::cuda::CUDAGuard device_guard(device);

  MultiTensorTable table;
  for (size_t i = 0; i < grads.size(); ++i) {
    check_param(op, "grads", i, grads[i], device);
    // `weights` is read only when adaptive; otherwise it may hold placeholders.
    if (adaptive) check_like(op, "weights", i, weights[i], "grads", grads[i]);
    const at::Tensor g = dense(grads[i], table);
    TensorMeta meta{};
    meta.numel = g.numel();
    set_mask(op, i, masks.get(i), g, meta, table);
    if (meta.numel == 0) continue;
    meta.grad = g.const_data_ptr();
    if (adaptive) meta.param = const_cast<void*>(laid_out_like(weights[i], g, table).const_data_ptr());
    table.add(meta, g.scalar_type(), adaptive ? 1 : 0);  // variant 1: the norm is scaled by |w|
  }
  table.upload(device);
  return sum_of_squares(table, device);
}

void sam_perturb_(at::TensorList out, at::TensorList params, at::TensorList grads,
                  const c10::List<std::optional<at::Tensor>>& masks, at::TensorList rhos, const at::Tensor& sq_norm,
                  bool adaptive, double eps) {
  constexpr const char* op = "sam_perturb_ (CUDA)";
  check_lengths(op, "params", params.size(),
                {{"out", out.size()}, {"grads", grads.size()}, {"masks", masks.size()}, {"rhos", rhos.size()}});
  if (params.empty()) return;
  const at::Device device = params[0].device();
  TORCH_CHECK(device.is_cuda(), op, ": params[0] must be a CUDA tensor, got ", device);
  TORCH_CHECK(sq_norm.defined() && sq_norm.numel() == 1 && is_supported_float(sq_norm.scalar_type()), op,
              ": sq_norm must be a floating tensor with one element");
  // rhos stay on the device (checking their values would cost a host sync per
  // step); the Python face and the CPU kernel check them.
  check_finite_non_negative(op, "eps", eps);
  const c10::cuda::CUDAGuard device_guard(device);

  MultiTensorTable table;
  for (size_t i = 0; i < params.size(); ++i) {
    check_param(op, "params", i, params[i], device);
    check_like(op, "out", i, out[i], "params", params[i]);
    check_like(op, "grads", i, grads[i], "params", params[i]);
    check_writable(op, "out", i, out[i]);
    const at::Tensor& o = out[i];
    TensorMeta meta{};
    meta.numel = o.numel();
    set_mask(op, i, masks.get(i), o, meta, table);
    set_rho(op, i, rhos[i], o, meta, table);
    if (meta.numel == 0) continue;
    meta.out = o.mutable_data_ptr();
    meta.param = const_cast<void*>(laid_out_like(params[i], o, table).const_data_ptr());
    meta.grad = laid_out_like(grads[i], o, table).const_data_ptr();
    table.add(meta, o.scalar_type());
  }
  table.upload(device);
  if (table.num_chunks() == 0) return;

  // Read on the device by every block: no host sync on the norm.
  const at::Tensor norm = sq_norm.reshape({}).to(device, at::kDouble);
  const double* norm_ptr = norm.const_data_ptr<double>();
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  for (const Group& group : table.groups()) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, group.dtype, "sam_perturb_cuda", [&] {
      dispatch_bool(adaptive, [&](auto adaptive_t) {
        for_each_launch(group, [&](int64_t first, unsigned int count) {
          sam_perturb_kernel<scalar_t, decltype(adaptive_t)::value><<<count, kThreads, 0, stream>>>(
              table.device_metas(), table.device_chunks() + first, norm_ptr, eps);
          C10_CUDA_KERNEL_LAUNCH_CHECK();
        });
      });
    });
  }
}

void sgd_step_(at::TensorList params, at::TensorList grads, at::TensorList momentum_buffers,
               const c10::List<std::optional<at::Tensor>>& masks, double lr, double momentum, double dampening,
               double weight_decay, bool nesterov, bool maximize, bool first_step) {
  constexpr const char* op = "sgd_step_ (CUDA)";
  const bool with_momentum = momentum != 0;
  check_lengths(op, "params", params.size(), {{"grads", grads.size()}, {"masks", masks.size()}});
  if (with_momentum) check_lengths(op, "params", params.size(), {{"momentum_buffers", momentum_buffers.size()}});
  if (params.empty()) return;
  const at::Device device = params[0].device();
  TORCH_CHECK(device.is_cuda(), op, ": params[0] must be a CUDA tensor, got ", device);
  check_sgd_scalars(op, lr, momentum, dampening, weight_decay);
  const c10::cuda::CUDAGuard device_guard(device);

  MultiTensorTable table;
  for (size_t i = 0; i < params.size(); ++i) {
    const at::Tensor& w = params[i];
    check_param(op, "params", i, w, device);
    check_like(op, "grads", i, grads[i], "params", w);
    check_writable(op, "params", i, w);
    TensorMeta meta{};
    meta.numel = w.numel();
    if (with_momentum) {
      const at::Tensor& b = momentum_buffers[i];
      check_like(op, "momentum_buffers", i, b, "params", w);
      TORCH_CHECK(same_layout(b, w), op, ": momentum_buffers[", i, "] (strides ", b.strides(),
                  ") is updated in place and must have the memory layout of params[", i, "] (strides ",
                  w.strides(), ")");
      if (meta.numel > 0) meta.buf = b.mutable_data_ptr();
    }
    set_mask(op, i, masks.get(i), w, meta, table);
    if (meta.numel == 0) continue;
    meta.param = w.mutable_data_ptr();
    meta.grad = laid_out_like(grads[i], w, table).const_data_ptr();
    table.add(meta, w.scalar_type());
  }
  table.upload(device);
  if (table.num_chunks() == 0) return;

  const SgdScalars scalars{lr, momentum, 1.0 - dampening, weight_decay};
  const int mode = !with_momentum ? kNoMomentum : first_step ? kFirstStep : kRunning;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  for (const Group& group : table.groups()) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, group.dtype, "sgd_step_cuda", [&] {
      auto launch = [&](auto momentum_t, auto nesterov_t, auto decay_t, auto maximize_t) {
        constexpr int kMode = decltype(momentum_t)::value;
        constexpr bool kNesterov = decltype(nesterov_t)::value;
        // Nesterov exists only with momentum: that variant is never built.
        if constexpr (!(kMode == kNoMomentum && kNesterov)) {
          for_each_launch(group, [&](int64_t first, unsigned int count) {
            sgd_step_kernel<scalar_t, kMode, kNesterov, decltype(decay_t)::value, decltype(maximize_t)::value>
                <<<count, kThreads, 0, stream>>>(table.device_metas(), table.device_chunks() + first, scalars);
            C10_CUDA_KERNEL_LAUNCH_CHECK();
          });
        }
      };
      auto with_flags = [&](auto momentum_t) {
        dispatch_bool(nesterov && with_momentum, [&](auto nesterov_t) {
          dispatch_bool(weight_decay != 0, [&](auto decay_t) {
            dispatch_bool(maximize, [&](auto maximize_t) { launch(momentum_t, nesterov_t, decay_t, maximize_t); });
          });
        });
      };
      switch (mode) {
        case kNoMomentum: with_flags(std::integral_constant<int, kNoMomentum>{}); break;
        case kFirstStep: with_flags(std::integral_constant<int, kFirstStep>{}); break;
        default: with_flags(std::integral_constant<int, kRunning>{}); break;
      }
    });
  }
}

}  // namespace

TORCH_LIBRARY_IMPL(sparsesam_cuda, CUDA, m) {
  m.impl("sam_grad_sq_norm", &sam_grad_sq_norm);
  m.impl("sam_perturb_", &sam_perturb_);
  m.impl("sgd_step_", &sgd_step_);
}

}  // namespace sparsesam::cuda
