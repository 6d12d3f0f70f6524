// CPU kernels of the fused SAM step (DESIGN.md, primitive 3): the
// multi-tensor ops sam_grad_sq_norm, sam_perturb_ and sgd_step_.
//
// Every op is one pass over memory, so what matters is the number of streams
// and the cost of getting to them. Like apex's multi_tensor_apply, each op
// cuts ALL its tensors into fixed-size chunks (a chunk is a contiguous range
// of one tensor) and runs ONE parallel region over the global chunk index:
// 62 small and large ResNet tensors cost one fork, not 62, and the threads
// stay balanced whatever the size mix. Before that region each tensor gets a
// job: its raw pointers and a function pointer to the kernel instantiation
// for its dtype, mask kind and options, so the region itself never
// dispatches. Every option is a template parameter and every inner loop a
// plain indexed loop over __restrict pointers with selects instead of
// branches: GCC vectorises each variant at -O3 (no -ffast-math needed;
// float16 alone stays scalar, c10::Half's conversions defeat the vectoriser).
//
// Reduced-precision tensors (bf16, half) compute in float and round once
// per stored value; float computes in float, double in double. The element
// math is written in the order of sparsesam/reference.py so that float64
// (and, for sgd_step_, float32) results agree with it to the bit.
//
// Masks: None (dense), or a tensor of the same numel whose zero entries are
// pruned: bool/uint8/int8, or floating of any width. A floating mask is
// tested on its bits with the sign cleared (+0.0 and -0.0 prune, anything
// else, NaN included, keeps: exactly `mask != 0`), so one kernel per mask
// width serves every mask dtype and the test vectorises as an integer one.
//
// The chunk plan, mask tests, selects, bf16 load/store, the blocked sum and
// the sum-of-squares kernel are shared with mask_scoring_cpu.cpp through
// multi_tensor_cpu.h.
#include <torch/library.h>

#include <cmath>
#include <cstdint>
#include <vector>

#include "../common/sam_step_args.h"
#include "multi_tensor_cpu.h"

namespace sparsesam::cpu {
namespace {

using namespace multi_tensor;

// =============================================================================
// sam_grad_sq_norm
// =============================================================================

// Chunk partials of (s*g)^2 (multi_tensor_cpu.h), added in chunk order.
at::Tensor sam_grad_sq_norm(at::TensorList grads, at::TensorList weights,
                            const c10::List<std::optional<at::Tensor>>& masks, bool adaptive) {
  constexpr const char* op = "sam_grad_sq_norm";
  const size_t n = grads.size();
  TORCH_CHECK(masks.size() == n, op, ": masks has ", masks.size(), " entries, grads ", n);
  TORCH_CHECK(!adaptive || weights.size() == n, op, ": weights has ", weights.size(), " entries, grads ", n);

  std::vector<NormJob> jobs(n);
  std::vector<int64_t> numels(n);
  for (size_t t = 0; t < n; ++t) {
    const at::Tensor& g = grads[t];
    check_floating(g, op, "grads", t);
    if (adaptive) check_partner(weights[t], g, op, "weights", "grads", t);
    const std::optional<at::Tensor> mask = masks.get(t);
    const int mbytes = mask_bytes(mask, g, op, t);
    NormJob& job = jobs[t];
    job.grad = g.const_data_ptr();
    job.weight = adaptive ? weights[t].const_data_ptr() : nullptr;
    job.mask = mbytes ? mask->const_data_ptr() : nullptr;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, g.scalar_type(), op, [&] {
      switch (mbytes) {
        case 0: job.fn = SqNormKernel<0>::get<scalar_t>(adaptive); break;
        case 1: job.fn = SqNormKernel<1>::get<scalar_t>(adaptive); break;
        case 2: job.fn = SqNormKernel<2>::get<scalar_t>(adaptive); break;
        case 4: job.fn = SqNormKernel<4>::get<scalar_t>(adaptive); break;
        default: job.fn = SqNormKernel<8>::get<scalar_t>(adaptive); break;
      }
    });
    numels[t] = g.numel();
  }
  return sum_of_squares(jobs, numels);
}

// =============================================================================
// sam_perturb_
// =============================================================================

// out = w + c * s^2 * g at kept entries (s^2 = w*w if adaptive, else 1), w at
// pruned ones, with c = rho / (sqrt(sq_norm) + eps) per output channel. The
// channel of element k is k / row (row = numel / size(0)); a chunk walks its
// rows as segments with one coefficient each, so there is no division per
// element. A 1-d tensor with per-channel rho (row == 1) reads a coefficient
// per element instead.
struct PerturbJob {
  void* out;
  const void* param;
  const void* grad;
  const void* mask;
  const double* coef;  // one per channel (rho * scale, in double)
  int64_t row;         // elements per channel
  void (*fn)(const PerturbJob&, int64_t, int64_t);
};

// [begin, end) with coefficient coef[i] (kPerElement) or the constant c.
template <typename scalar_t, int kMaskBytes, bool kAdaptive, bool kPerElement>
inline void perturb_segment(scalar_t* __restrict out, const scalar_t* __restrict w, const scalar_t* __restrict g,
                            const mask_word_t<kMaskBytes>* __restrict m, const double* __restrict coef,
                            at::opmath_type<scalar_t> c, int64_t begin, int64_t end) {
  using acc_t = at::opmath_type<scalar_t>;
  for (int64_t i = begin; i < end; ++i) {
    const scalar_t w_old = w[i];
    const acc_t wi = load(w_old);
    const acc_t ci = kPerElement ? static_cast<acc_t>(coef[i]) : c;
    // The reference's order: e = (rho*scale) * g, then e * w^2, then w + e.
    acc_t e = ci * load(g[i]);
    if constexpr (kAdaptive) e = e * (wi * wi);
    out[i] = select(kept<kMaskBytes>(m, i), store<scalar_t>(wi + e), w_old);
  }
}

template <typename scalar_t, int kMaskBytes, bool kAdaptive, bool kPerElement>
void perturb_range(const PerturbJob& job, int64_t begin, int64_t end) {
  using acc_t = at::opmath_type<scalar_t>;
  scalar_t* out = static_cast<scalar_t*>(job.out);
  const scalar_t* w = static_cast<const scalar_t*>(job.param);
  const scalar_t* g = static_cast<const scalar_t*>(job.grad);
  const auto* m = static_cast<const mask_word_t<kMaskBytes>*>(job.mask);
  if constexpr (kPerElement) {
    perturb_segment<scalar_t, kMaskBytes, kAdaptive, true>(out, w, g, m, job.coef, acc_t(0), begin, end);
  } else {
    int64_t channel = begin / job.row;
    for (int64_t seg = begin; seg < end; ++channel) {
      const int64_t seg_end = std::min(end, (channel + 1) * job.row);
      perturb_segment<scalar_t, kMaskBytes, kAdaptive, false>(out, w, g, m, nullptr,
                                                              static_cast<acc_t>(job.coef[channel]), seg, seg_end);
      seg = seg_end;
    }
  }
}

template <int kMaskBytes>
struct PerturbKernel {
  template <typename scalar_t>
  static auto get(bool adaptive, bool per_element) {
    if (adaptive) {
      return per_element ? &perturb_range<scalar_t, kMaskBytes, true, true>
                         : &perturb_range<scalar_t, kMaskBytes, true, false>;
    }
    return per_element ? &perturb_range<scalar_t, kMaskBytes, false, true>
                       : &perturb_range<scalar_t, kMaskBytes, false, false>;
  }
};

void sam_perturb_(at::TensorList out, at::TensorList params, at::TensorList grads,
                  const c10::List<std::optional<at::Tensor>>& masks, at::TensorList rhos, const at::Tensor& sq_norm,
                  bool adaptive, double eps) {
  constexpr const char* op = "sam_perturb_";
  const size_t n = params.size();
  TORCH_CHECK(out.size() == n && grads.size() == n && masks.size() == n && rhos.size() == n, op,
              ": out, params, grads, masks and rhos must have one entry per parameter, got ", out.size(), ", ", n,
              ", ", grads.size(), ", ", masks.size(), " and ", rhos.size());
  TORCH_CHECK(sq_norm.defined() && sq_norm.numel() == 1 && sq_norm.device().is_cpu() &&
                  at::isFloatingType(sq_norm.scalar_type()),
              op, ": sq_norm must be a one-element floating CPU tensor");
  check_finite_non_negative(op, "eps", eps);
  // Read once. A non-finite norm is the caller's business (the Python
  // optimizer skips the step); the kernel just computes with it.
  const double scale = 1.0 / (std::sqrt(value_at(sq_norm, 0)) + eps);

  std::vector<PerturbJob> jobs(n);
  std::vector<int64_t> numels(n);
  std::vector<std::vector<double>> coefs(n);
  for (size_t t = 0; t < n; ++t) {
    const at::Tensor& w = params[t];
    check_floating(w, op, "params", t);
    check_partner(grads[t], w, op, "grads", "params", t);
    check_partner(out[t], w, op, "out", "params", t);
    // The schema reads params and grads and writes only out.
    check_no_overlap(out[t], w, op, "out", "params", t);
    check_no_overlap(out[t], grads[t], op, "out", "grads", t);
    const std::optional<at::Tensor> mask = masks.get(t);
    const int mbytes = mask_bytes(mask, w, op, t);

    const at::Tensor& rho = rhos[t];
    TORCH_CHECK(rho.defined() && rho.device().is_cpu() && at::isFloatingType(rho.scalar_type()) && rho.dim() <= 1,
                op, ": rhos[", t, "] must be a 0-d or 1-d floating CPU tensor");
    const int64_t channels = w.dim() == 0 ? 1 : w.size(0);
    const bool per_channel = rho.numel() != 1;
    TORCH_CHECK(!per_channel || (w.dim() > 0 && rho.numel() == channels), op, ": rhos[", t, "] has ", rho.numel(),
                " values, params[", t, "] has ", channels, " output channels");
    std::vector<double>& coef = coefs[t];
    coef.resize(per_channel ? channels : 1);
    for (size_t c = 0; c < coef.size(); ++c) {
      const double r = value_at(rho, static_cast<int64_t>(c));
      // Read here anyway, so the check costs nothing: a NaN, infinite or
      // negative rho would give a NaN ascent point or a descent step.
      TORCH_CHECK_VALUE(std::isfinite(r) && r >= 0.0, op, ": rhos[", t, "] must be finite and >= 0, got ", r);
      coef[c] = r * scale;
    }

    PerturbJob& job = jobs[t];
    job.out = out[t].mutable_data_ptr();
    job.param = w.const_data_ptr();
    job.grad = grads[t].const_data_ptr();
    job.mask = mbytes ? mask->const_data_ptr() : nullptr;
    job.coef = coef.data();
    // A 0-d rho is one channel spanning the tensor.
    job.row = per_channel && channels > 0 ? w.numel() / channels : std::max<int64_t>(w.numel(), 1);
    const bool per_element = per_channel && job.row == 1;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, w.scalar_type(), op, [&] {
      switch (mbytes) {
        case 0: job.fn = PerturbKernel<0>::get<scalar_t>(adaptive, per_element); break;
        case 1: job.fn = PerturbKernel<1>::get<scalar_t>(adaptive, per_element); break;
        case 2: job.fn = PerturbKernel<2>::get<scalar_t>(adaptive, per_element); break;
        case 4: job.fn = PerturbKernel<4>::get<scalar_t>(adaptive, per_element); break;
        default: job.fn = PerturbKernel<8>::get<scalar_t>(adaptive, per_element); break;
      }
    });
    numels[t] = w.numel();
  }

  ChunkPlan(numels).for_each_chunk(
      [&](size_t t, int64_t /*chunk*/, int64_t begin, int64_t end) { jobs[t].fn(jobs[t], begin, end); });
}

// =============================================================================
// sgd_step_
// =============================================================================

// torch.optim.SGD (single-tensor path), per element:
//   d = maximize ? -g : g;   d += weight_decay * w
//   buf = first_step ? d : momentum * buf + (1 - dampening) * d
//   d = nesterov ? d + momentum * buf : buf;   w -= lr * d
// Coefficients are rounded to the compute type first, as ATen does with a
// Python scalar, and each product and sum is its own rounding in the same
// order, so float32 and float64 agree with PyTorch to the bit (no FMA: the
// build targets baseline x86-64). The buffer is stored in the parameter's
// dtype, and the update uses the stored (rounded) buffer, as torch does.
// Pruned entries keep both the weight and the buffer bits.
struct SgdJob {
  void* param;
  const void* grad;
  void* buf;
  const void* mask;
  void (*fn)(const SgdJob&, int64_t, int64_t, const double*);
};

// coefficients: {sign (-1 if maximize), weight_decay, momentum, 1 - dampening, lr}
template <typename scalar_t, int kMaskBytes, bool kDecay, bool kMomentum, bool kNesterov, bool kFirst>
void sgd_range(const SgdJob& job, int64_t begin, int64_t end, const double* coefficients) {
  using acc_t = at::opmath_type<scalar_t>;
  scalar_t* __restrict w = static_cast<scalar_t*>(job.param);
  const scalar_t* __restrict g = static_cast<const scalar_t*>(job.grad);
  scalar_t* __restrict buf = static_cast<scalar_t*>(job.buf);
  const mask_word_t<kMaskBytes>* __restrict m = static_cast<const mask_word_t<kMaskBytes>*>(job.mask);
  // Multiplying by -1 or 1 is exact: the same bits as -g / g, with no branch.
  const acc_t sign = static_cast<acc_t>(coefficients[0]);
  const acc_t weight_decay = static_cast<acc_t>(coefficients[1]);
  const acc_t momentum = static_cast<acc_t>(coefficients[2]);
  const acc_t keep_grad = static_cast<acc_t>(coefficients[3]);
  const acc_t lr = static_cast<acc_t>(coefficients[4]);
  for (int64_t i = begin; i < end; ++i) {
    const bool keep = kept<kMaskBytes>(m, i);
    const scalar_t w_old = w[i];
    const acc_t wi = load(w_old);
    acc_t d = sign * load(g[i]);
    if constexpr (kDecay) d = d + weight_decay * wi;
    if constexpr (kMomentum) {
      // On the first step the old buffer is read only where a mask may keep
      // it (dense: the load is dead and the compiler drops it).
      const scalar_t b_old = buf[i];
      const acc_t b_acc = kFirst ? d : momentum * load(b_old) + keep_grad * d;
      const scalar_t b_new = store<scalar_t>(b_acc);
      const acc_t b = load(b_new);
      d = kNesterov ? d + momentum * b : b;
      buf[i] = select(keep, b_new, b_old);
    }
    w[i] = select(keep, store<scalar_t>(wi - lr * d), w_old);
  }
}

template <int kMaskBytes>
struct SgdKernel {
  using Fn = void (*)(const SgdJob&, int64_t, int64_t, const double*);

  template <typename scalar_t, bool kDecay>
  static Fn with_momentum(bool nesterov, bool first_step) {
    if (nesterov) {
      return first_step ? &sgd_range<scalar_t, kMaskBytes, kDecay, true, true, true>
                        : &sgd_range<scalar_t, kMaskBytes, kDecay, true, true, false>;
    }
    return first_step ? &sgd_range<scalar_t, kMaskBytes, kDecay, true, false, true>
                      : &sgd_range<scalar_t, kMaskBytes, kDecay, true, false, false>;
  }

  template <typename scalar_t>
  static Fn get(bool decay, bool momentum, bool nesterov, bool first_step) {
    if (!momentum) {
      return decay ? &sgd_range<scalar_t, kMaskBytes, true, false, false, false>
                   : &sgd_range<scalar_t, kMaskBytes, false, false, false, false>;
    }
    return decay ? with_momentum<scalar_t, true>(nesterov, first_step)
                 : with_momentum<scalar_t, false>(nesterov, first_step);
  }
};

void sgd_step_(at::TensorList params, at::TensorList grads, at::TensorList momentum_buffers,
               const c10::List<std::optional<at::Tensor>>& masks, double lr, double momentum, double dampening,
               double weight_decay, bool nesterov, bool maximize, bool first_step) {
  constexpr const char* op = "sgd_step_";
  const size_t n = params.size();
  const bool use_momentum = momentum != 0.0;
  TORCH_CHECK(grads.size() == n && masks.size() == n, op, ": params, grads and masks must have one entry per "
              "parameter, got ", n, ", ", grads.size(), " and ", masks.size());
  TORCH_CHECK(use_momentum ? momentum_buffers.size() == n : momentum_buffers.empty(), op,
              ": momentum_buffers must have one entry per parameter when momentum != 0 and be empty otherwise, got ",
              momentum_buffers.size(), " for ", n, " parameters");
  check_sgd_scalars(op, lr, momentum, dampening, weight_decay);
  const bool decay = weight_decay != 0.0;
  const double coefficients[5] = {maximize ? -1.0 : 1.0, weight_decay, momentum, 1.0 - dampening, lr};

  std::vector<SgdJob> jobs(n);
  std::vector<int64_t> numels(n);
  for (size_t t = 0; t < n; ++t) {
    const at::Tensor& w = params[t];
    check_floating(w, op, "params", t);
    check_partner(grads[t], w, op, "grads", "params", t);
    check_no_overlap(w, grads[t], op, "params", "grads", t);
    const std::optional<at::Tensor> mask = masks.get(t);
    const int mbytes = mask_bytes(mask, w, op, t);
    SgdJob& job = jobs[t];
    job.param = w.mutable_data_ptr();
    job.grad = grads[t].const_data_ptr();
    job.buf = nullptr;
    if (use_momentum) {
      check_partner(momentum_buffers[t], w, op, "momentum_buffers", "params", t);
      check_no_overlap(momentum_buffers[t], w, op, "momentum_buffers", "params", t);
      check_no_overlap(momentum_buffers[t], grads[t], op, "momentum_buffers", "grads", t);
      job.buf = momentum_buffers[t].mutable_data_ptr();
    }
    job.mask = mbytes ? mask->const_data_ptr() : nullptr;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, w.scalar_type(), op, [&] {
      switch (mbytes) {
        case 0: job.fn = SgdKernel<0>::get<scalar_t>(decay, use_momentum, nesterov, first_step); break;
        case 1: job.fn = SgdKernel<1>::get<scalar_t>(decay, use_momentum, nesterov, first_step); break;
        case 2: job.fn = SgdKernel<2>::get<scalar_t>(decay, use_momentum, nesterov, first_step); break;
        case 4: job.fn = SgdKernel<4>::get<scalar_t>(decay, use_momentum, nesterov, first_step); break;
        default: job.fn = SgdKernel<8>::get<scalar_t>(decay, use_momentum, nesterov, first_step); break;
      }
    });
    numels[t] = w.numel();
  }

  ChunkPlan(numels).for_each_chunk(
      [&](size_t t, int64_t /*chunk*/, int64_t begin, int64_t end) { jobs[t].fn(jobs[t], begin, end, coefficients); });
}

}  // namespace

TORCH_LIBRARY_IMPL(sparsesam, CPU, m) {
  m.impl("sam_grad_sq_norm", &sam_grad_sq_norm);
  m.impl("sam_perturb_", &sam_perturb_);
  m.impl("sgd_step_", &sgd_step_);
}

}  // namespace sparsesam::cpu
