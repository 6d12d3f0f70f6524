// CPU kernels of mask-perturbation scoring (DESIGN.md, primitive 4):
// mask_grad_sq_norm, mask_ascent_ and mask_score_grad. The math, and why, is
// in sparsesam/reference.py.
//
// Every op reads, per layer, the effective-weight gradient G = dL/d(W*M) and
// the weight W (or, with weights[i] None, a ready mask gradient dM in place
// of G) plus the op's own tensor (mask or score), and works on the mask
// gradient dM = G*W element by element: one pass over G, W, M.
//
// The multi-tensor layout is sam_step_cpu.cpp's (multi_tensor_cpu.h): one
// parallel region over fixed-size chunks of all tensors, a job per tensor
// holding its pointers and the kernel instantiation for its dtype and
// options. The reductions (the squared norm, the per-layer sums of dM) use
// the shared blocked sum with chunk partials added in chunk order, so their
// bits do not depend on the thread count.
//
// Elementwise results are computed in double exactly as the reference
// computes them in float64 (a product of two 16/32-bit values is exact in
// double) and rounded once the way torch's .to() rounds (16-bit types via
// float), so every dtype matches the reference bit for bit.
#include <torch/library.h>

#include <cmath>
#include <cstdint>
#include <limits>
#include <type_traits>
#include <vector>

#include "multi_tensor_cpu.h"

namespace sparsesam::cpu {
namespace {

using namespace multi_tensor;

// --- Element math ------------------------------------------------------------

// dM = g*w, or g when the caller passed the mask gradient itself.
template <typename scalar_t, bool kWeights>
inline double mask_grad(const scalar_t* __restrict g, const scalar_t* __restrict w, int64_t i) {
  double d = static_cast<double>(load(g[i]));
  if constexpr (kWeights) d = d * static_cast<double>(load(w[i]));
  return d;
}

// float64 -> T as torch's .to(T) rounds: 16-bit floats through float.
template <typename T>
inline T round_to(double v) {
  if constexpr (std::is_same_v<T, double>) {
    return v;
  } else if constexpr (std::is_same_v<T, float>) {
    return static_cast<float>(v);
  } else {
    return store<T>(static_cast<float>(v));
  }
}

// --- Jobs ----------------------------------------------------------------------

// One tensor of one op. fn works on [begin, end) and returns the range's
// partial sum (0 for ops that do not reduce).
struct Job {
  const void* grad;
  const void* weight;  // null: grad is dM itself
  const void* other;   // the op's mask or scores
  void* out;
  double coef;         // mask_ascent_: rho / (||dM|| + eps)
  double (*fn)(const Job&, int64_t, int64_t);
};

// Picks fn = Kernel<scalar_t, kWeights>::range.
template <template <typename, bool> class Kernel>
auto pick(at::ScalarType dtype, bool weights) {
  double (*fn)(const Job&, int64_t, int64_t) = nullptr;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, dtype, "mask_scoring", [&] {
    fn = weights ? &Kernel<scalar_t, true>::range : &Kernel<scalar_t, false>::range;
  });
  return fn;
}

// --- Shared argument handling -----------------------------------------------------

// weights[t] when given: the partner of grads[t].
const at::Tensor* weight_of(const c10::List<std::optional<at::Tensor>>& weights, size_t t, const at::Tensor& g,
                            const char* op, std::optional<at::Tensor>& holder) {
  holder = weights.get(t);
  if (!holder.has_value() || !holder->defined()) return nullptr;
  check_partner(*holder, g, op, "weights", "grads", t);
  return &*holder;
}

void check_lengths(const char* op, size_t n, const char* name, size_t size) {
  TORCH_CHECK(size == n, op, ": ", name, " has ", size, " entries, grads ", n);
}

void run_jobs(const std::vector<Job>& jobs, const std::vector<int64_t>& numels) {
  ChunkPlan(numels).for_each_chunk(
      [&](size_t t, int64_t /*chunk*/, int64_t begin, int64_t end) { jobs[t].fn(jobs[t], begin, end); });
}

// =============================================================================
// mask_grad_sq_norm
// =============================================================================

// sum over all layers of dM^2 = (g*w)^2: sam_step's sum-of-squares kernel
// (multi_tensor_cpu.h), scaled by w where a weight is given, so its bits
// equal sam_grad_sq_norm(grads, weights, None, adaptive=True) there.
at::Tensor mask_grad_sq_norm(at::TensorList grads, const c10::List<std::optional<at::Tensor>>& weights) {
  constexpr const char* op = "mask_grad_sq_norm";
  const size_t n = grads.size();
  check_lengths(op, n, "weights", weights.size());
  std::vector<NormJob> jobs(n);
  std::vector<int64_t> numels(n);
  for (size_t t = 0; t < n; ++t) {
    const at::Tensor& g = grads[t];
    check_floating(g, op, "grads", t);
    std::optional<at::Tensor> holder;
    const at::Tensor* w = weight_of(weights, t, g, op, holder);
    NormJob& job = jobs[t];
    job.grad = g.const_data_ptr();
    job.weight = w ? w->const_data_ptr() : nullptr;
    job.mask = nullptr;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, g.scalar_type(), op,
                                    [&] { job.fn = SqNormKernel<0>::get<scalar_t>(w != nullptr); });
    numels[t] = g.numel();
  }
  return sum_of_squares(jobs, numels);
}

// =============================================================================
// mask_ascent_
// =============================================================================

// out = clip(M + coef * dM, 0, 1), coef = rho / (sqrt(sq_norm) + eps).
template <typename scalar_t, bool kWeights>
struct AscentKernel {
  static double range(const Job& job, int64_t begin, int64_t end) {
    const scalar_t* __restrict g = static_cast<const scalar_t*>(job.grad);
    const scalar_t* __restrict w = static_cast<const scalar_t*>(job.weight);
    const scalar_t* __restrict m = static_cast<const scalar_t*>(job.other);
    scalar_t* __restrict out = static_cast<scalar_t*>(job.out);
    using acc_t = at::opmath_type<scalar_t>;
    const double coef = job.coef;
    for (int64_t i = begin; i < end; ++i) {
      const double v = static_cast<double>(load(m[i])) + coef * mask_grad<scalar_t, kWeights>(g, w, i);
      // Clipped after rounding to acc_t: a loop of one float width
      // vectorises, one that mixes a double test with a float result does
      // not. Exact: with v <= 0 -> +0.0 and v >= 1 -> 1 (the reference's
      // clip), clipping commutes with rounding. NaN fails both tests.
      acc_t f = static_cast<acc_t>(v);
      f = f <= acc_t(0) ? acc_t(0) : f;
      f = f >= acc_t(1) ? acc_t(1) : f;
      out[i] = store<scalar_t>(f);
    }
    return 0.0;
  }
};

void mask_ascent_(at::TensorList out, at::TensorList grads, const c10::List<std::optional<at::Tensor>>& weights,
                  at::TensorList masks, const at::Tensor& sq_norm, double rho, double eps) {
  constexpr const char* op = "mask_ascent_";
  const size_t n = grads.size();
  check_lengths(op, n, "out", out.size());
  check_lengths(op, n, "weights", weights.size());
  check_lengths(op, n, "masks", masks.size());
  TORCH_CHECK(sq_norm.defined() && sq_norm.numel() == 1 && sq_norm.device().is_cpu() &&
                  at::isFloatingType(sq_norm.scalar_type()),
              op, ": sq_norm must be a one-element floating CPU tensor");
  // The reference's float64 coefficient: (1 / (sqrt(sq_norm) + eps)), times rho.
  const double coef = rho * (1.0 / (std::sqrt(value_at(sq_norm, 0)) + eps));

  std::vector<Job> jobs(n);
  std::vector<int64_t> numels(n);
  for (size_t t = 0; t < n; ++t) {
    const at::Tensor& g = grads[t];
    check_floating(g, op, "grads", t);
    std::optional<at::Tensor> holder;
    const at::Tensor* w = weight_of(weights, t, g, op, holder);
    check_partner(masks[t], g, op, "masks", "grads", t);
    check_partner(out[t], g, op, "out", "grads", t);
    // The schema reads grads, weights and masks and writes only out.
    check_no_overlap(out[t], masks[t], op, "out", "masks", t);
    check_no_overlap(out[t], g, op, "out", "grads", t);
    if (w) check_no_overlap(out[t], *w, op, "out", "weights", t);
    jobs[t] = Job{g.const_data_ptr(), w ? w->const_data_ptr() : nullptr, masks[t].const_data_ptr(),
                  out[t].mutable_data_ptr(), coef, pick<AscentKernel>(g.scalar_type(), w != nullptr)};
    numels[t] = g.numel();
  }
  run_jobs(jobs, numels);
}

// =============================================================================
// mask_score_grad
// =============================================================================

// HARP's straight-through gradients: ds = sign(s) * dM (the |s| the mask is
// ranked by), and the layer's rate gradient sum(dM) as this range's partial.
// One loop writes ds and feeds the blocked sum.
template <typename scalar_t, bool kWeights>
struct ScoreGradKernel {
  static double range(const Job& job, int64_t begin, int64_t end) {
    const scalar_t* __restrict g = static_cast<const scalar_t*>(job.grad);
    const scalar_t* __restrict w = static_cast<const scalar_t*>(job.weight);
    const scalar_t* __restrict s = static_cast<const scalar_t*>(job.other);
    scalar_t* __restrict out = static_cast<scalar_t*>(job.out);
    return blocked_sum<double>(begin, end, [&](int64_t i) -> double {
      const double dm = mask_grad<scalar_t, kWeights>(g, w, i);
      const double si = static_cast<double>(load(s[i]));
      // torch.sign: +0.0 for +-0 and NaN (1 - 0, 0 - 1, 0 - 0: selects of constants vectorise).
      const double sign = (si > 0.0 ? 1.0 : 0.0) - (si < 0.0 ? 1.0 : 0.0);
      out[i] = round_to<scalar_t>(sign * dm);
      return dm;
    });
  }
};

std::tuple<std::vector<at::Tensor>, at::Tensor> mask_score_grad(
    at::TensorList grads, const c10::List<std::optional<at::Tensor>>& weights, at::TensorList scores) {
  constexpr const char* op = "mask_score_grad";
  const size_t n = grads.size();
  check_lengths(op, n, "weights", weights.size());
  check_lengths(op, n, "scores", scores.size());
  std::vector<Job> jobs(n);
  std::vector<int64_t> numels(n);
  std::vector<at::Tensor> score_grads(n);
  for (size_t t = 0; t < n; ++t) {
    const at::Tensor& g = grads[t];
    check_floating(g, op, "grads", t);
    std::optional<at::Tensor> holder;
    const at::Tensor* w = weight_of(weights, t, g, op, holder);
    check_partner(scores[t], g, op, "scores", "grads", t);
    score_grads[t] = at::empty(g.sizes(), g.options());
    jobs[t] = Job{g.const_data_ptr(), w ? w->const_data_ptr() : nullptr, scores[t].const_data_ptr(),
                  score_grads[t].mutable_data_ptr(), 0.0, pick<ScoreGradKernel>(g.scalar_type(), w != nullptr)};
    numels[t] = g.numel();
  }
  const ChunkPlan plan(numels);
  std::vector<double> partials(plan.chunks());
  plan.for_each_chunk([&](size_t t, int64_t chunk, int64_t begin, int64_t end) {
    partials[chunk] = jobs[t].fn(jobs[t], begin, end);
  });
  at::Tensor rate_grads = at::empty({static_cast<int64_t>(n)}, at::TensorOptions().dtype(at::kDouble));
  double* rate = rate_grads.mutable_data_ptr<double>();
  for (size_t t = 0; t < n; ++t) {
    double sum = 0.0;
    for (int64_t c = plan.first_chunk(t); c < plan.first_chunk(t + 1); ++c) sum += partials[c];
    rate[t] = sum;
  }
  return {score_grads, rate_grads};
}

}  // namespace

TORCH_LIBRARY_IMPL(sparsesam, CPU, m) {
  m.impl("mask_grad_sq_norm", &mask_grad_sq_norm);
  m.impl("mask_ascent_", &mask_ascent_);
  m.impl("mask_score_grad", &mask_score_grad);
}

}  // namespace sparsesam::cpu
