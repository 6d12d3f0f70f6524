// CPU kernels of mask-perturbation scoring (DESIGN.md, primitive 4):
// mask_grad_sq_norm, mask_ascent_, mask_flip_scores, mask_flip_topk and
// mask_score_grad. The math, and why, is in sparsesam/reference.py.
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

// A flip op's mask: 1-byte (bool/uint8/int8) masks are binary (M = mask != 0);
// a floating mask (the gradients' dtype) is soft and enters with its value.
enum MaskKind : int { kBinary = 0, kSoft = 1 };

template <typename scalar_t, int kMask>
using mask_elem_t = std::conditional_t<kMask == kSoft, scalar_t, uint8_t>;

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

// Whether entry i is kept (M != 0; a NaN soft mask counts as kept).
template <typename scalar_t, int kMask>
inline bool is_kept(const mask_elem_t<scalar_t, kMask>* __restrict m, int64_t i) {
  if constexpr (kMask == kSoft) {
    return static_cast<double>(load(m[i])) != 0.0;
  } else {
    return m[i] != 0;
  }
}

// First-order loss change of flipping entry i: dM * (M' - M), M' = 0 for a
// kept entry (prune it) and 1 for a pruned one (grow it).
template <typename scalar_t, int kMask, bool kWeights>
inline double flip_score(const scalar_t* __restrict g, const scalar_t* __restrict w,
                         const mask_elem_t<scalar_t, kMask>* __restrict m, int64_t i) {
  const bool keep = is_kept<scalar_t, kMask>(m, i);
  double value;
  if constexpr (kMask == kSoft) {
    value = static_cast<double>(load(m[i]));
  } else {
    value = keep ? 1.0 : 0.0;
  }
  const double target = keep ? 0.0 : 1.0;
  return mask_grad<scalar_t, kWeights>(g, w, i) * (target - value);
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

// Picks fn = Kernel<scalar_t, kWeights>::range (or <scalar_t, kMask, kWeights>).
template <template <typename, bool> class Kernel>
auto pick(at::ScalarType dtype, bool weights) {
  double (*fn)(const Job&, int64_t, int64_t) = nullptr;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, dtype, "mask_scoring", [&] {
    fn = weights ? &Kernel<scalar_t, true>::range : &Kernel<scalar_t, false>::range;
  });
  return fn;
}

template <template <typename, int, bool> class Kernel>
auto pick(at::ScalarType dtype, int mask_kind, bool weights) {
  double (*fn)(const Job&, int64_t, int64_t) = nullptr;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, dtype, "mask_scoring", [&] {
    if (mask_kind == kSoft) {
      fn = weights ? &Kernel<scalar_t, kSoft, true>::range : &Kernel<scalar_t, kSoft, false>::range;
    } else {
      fn = weights ? &Kernel<scalar_t, kBinary, true>::range : &Kernel<scalar_t, kBinary, false>::range;
    }
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

// A flip op's mask: binary (1 byte) or soft (the gradients' dtype).
int flip_mask_kind(const at::Tensor& m, const at::Tensor& g, const char* op, size_t t) {
  TORCH_CHECK(m.defined(), op, ": masks[", t, "] is undefined");
  TORCH_CHECK(m.device().is_cpu(), op, ": masks[", t, "] must be on the CPU, got ", m.device());
  TORCH_CHECK(m.sizes() == g.sizes(), op, ": masks[", t, "] has shape ", m.sizes(), ", grads[", t, "] has ",
              g.sizes());
  TORCH_CHECK(m.is_contiguous(), op, ": masks[", t, "] must be contiguous");
  const auto dtype = m.scalar_type();
  if (dtype == at::kBool || dtype == at::kByte || dtype == at::kChar) return kBinary;
  TORCH_CHECK(dtype == g.scalar_type(), op, ": masks[", t, "] must be bool, uint8, int8 or ", g.scalar_type(),
              " (the gradients' dtype), got ", dtype);
  return kSoft;
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
    const double coef = job.coef;
    for (int64_t i = begin; i < end; ++i) {
      double v = static_cast<double>(load(m[i])) + coef * mask_grad<scalar_t, kWeights>(g, w, i);
      // A NaN fails both tests and comes through, as with torch.clamp.
      v = v < 0.0 ? 0.0 : v;
      v = v > 1.0 ? 1.0 : v;
      out[i] = round_to<scalar_t>(v);
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
// mask_flip_scores
// =============================================================================

template <typename scalar_t, int kMask, bool kWeights>
struct FlipScoresKernel {
  static double range(const Job& job, int64_t begin, int64_t end) {
    using score_t = at::opmath_type<scalar_t>;
    const scalar_t* __restrict g = static_cast<const scalar_t*>(job.grad);
    const scalar_t* __restrict w = static_cast<const scalar_t*>(job.weight);
    const auto* __restrict m = static_cast<const mask_elem_t<scalar_t, kMask>*>(job.other);
    score_t* __restrict out = static_cast<score_t*>(job.out);
    for (int64_t i = begin; i < end; ++i) {
      out[i] = round_to<score_t>(flip_score<scalar_t, kMask, kWeights>(g, w, m, i));
    }
    return 0.0;
  }
};

// Scores are float32 for 16/32-bit gradients, float64 for float64 ones.
at::ScalarType score_dtype(at::ScalarType grad_dtype) {
  return grad_dtype == at::kDouble ? at::kDouble : at::kFloat;
}

std::vector<at::Tensor> mask_flip_scores(at::TensorList grads, const c10::List<std::optional<at::Tensor>>& weights,
                                         at::TensorList masks) {
  constexpr const char* op = "mask_flip_scores";
  const size_t n = grads.size();
  check_lengths(op, n, "weights", weights.size());
  check_lengths(op, n, "masks", masks.size());
  std::vector<Job> jobs(n);
  std::vector<int64_t> numels(n);
  std::vector<at::Tensor> scores(n);
  for (size_t t = 0; t < n; ++t) {
    const at::Tensor& g = grads[t];
    check_floating(g, op, "grads", t);
    std::optional<at::Tensor> holder;
    const at::Tensor* w = weight_of(weights, t, g, op, holder);
    const int kind = flip_mask_kind(masks[t], g, op, t);
    scores[t] = at::empty(g.sizes(), g.options().dtype(score_dtype(g.scalar_type())));
    jobs[t] = Job{g.const_data_ptr(), w ? w->const_data_ptr() : nullptr, masks[t].const_data_ptr(),
                  scores[t].mutable_data_ptr(), 0.0, pick<FlipScoresKernel>(g.scalar_type(), kind, w != nullptr)};
    numels[t] = g.numel();
  }
  run_jobs(jobs, numels);
  return scores;
}

// =============================================================================
// mask_flip_topk
// =============================================================================

// Per layer: the k_prune kept entries with the smallest flip score (pruning
// them raises the loss least) and the k_grow pruned entries with the
// smallest flip score (growing them lowers the loss most), each in the
// order (score, flat index) ascending with NaN scores after every number:
// a strict total order, so the answer is unique (torch.sort(stable=True)'s
// order, which the reference uses).
//
// A layer at a time, each in parallel over chunks: one pass counts the kept
// entries per chunk (the mask alone), a second scores every entry and
// writes its candidate -- (order key, index), two integers -- to the kept or
// the pruned array at the place the prefix counts give it, so the arrays
// hold exactly the eligible entries. nth_element then finds the k smallest
// and a sort orders them.

// An order-preserving integer image of a score: -inf < ... < -0 = +0 < ...
// < +inf < NaN (every NaN equal), so candidates compare as plain integers.
template <typename score_t>
inline uint64_t order_key(score_t s) {
  using bits_t = typename UIntOfSize<sizeof(score_t)>::type;
  constexpr bits_t kSign = bits_t(1) << (8 * sizeof(score_t) - 1);
  bits_t b = std::bit_cast<bits_t>(s);
  if (std::isnan(s)) b = std::bit_cast<bits_t>(std::numeric_limits<score_t>::quiet_NaN()) & ~kSign;
  if (s == score_t(0)) b = 0;  // -0.0 ties with +0.0, as in torch.sort
  return static_cast<uint64_t>((b & kSign) ? static_cast<bits_t>(~b) : static_cast<bits_t>(b | kSign));
}

struct Candidate {
  uint64_t key;
  int64_t index;
  bool operator<(const Candidate& other) const {
    return key < other.key || (key == other.key && index < other.index);
  }
};

// The k smallest candidates' indices, in order, into out.
void write_smallest(std::vector<Candidate>& candidates, int64_t k, int64_t* out) {
  if (k == 0) return;
  const auto nth = candidates.begin() + k;
  if (nth != candidates.end()) std::nth_element(candidates.begin(), nth, candidates.end());
  std::sort(candidates.begin(), nth);
  for (int64_t j = 0; j < k; ++j) out[j] = candidates[j].index;
}

struct TopkLayer {
  Job job;
  int64_t numel;
  int64_t k_prune;
  int64_t k_grow;
  int64_t* prune_out;
  int64_t* grow_out;
  int64_t kept;  // counted by the kernel, checked against k_prune / k_grow
  void (*select)(TopkLayer&);
};

template <typename scalar_t, int kMask, bool kWeights>
void select_flips(TopkLayer& layer) {
  using score_t = at::opmath_type<scalar_t>;
  const scalar_t* __restrict g = static_cast<const scalar_t*>(layer.job.grad);
  const scalar_t* __restrict w = static_cast<const scalar_t*>(layer.job.weight);
  const auto* __restrict m = static_cast<const mask_elem_t<scalar_t, kMask>*>(layer.job.other);
  const int64_t n = layer.numel;
  layer.kept = 0;
  if (layer.k_prune == 0 && layer.k_grow == 0) return;
  const int64_t chunks = (n + kChunk - 1) / kChunk;
  // kept_before[c]: kept entries in chunks before c.
  std::vector<int64_t> kept_before(chunks + 1, 0);
  at::parallel_for(0, chunks, 1, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      int64_t count = 0;
      for (int64_t i = c * kChunk; i < std::min(n, (c + 1) * kChunk); ++i) count += is_kept<scalar_t, kMask>(m, i);
      kept_before[c + 1] = count;
    }
  });
  for (int64_t c = 0; c < chunks; ++c) kept_before[c + 1] += kept_before[c];
  layer.kept = kept_before[chunks];
  if (layer.k_prune > layer.kept || layer.k_grow > n - layer.kept) return;  // refused by the caller
  std::vector<Candidate> prune(layer.k_prune ? layer.kept : 0), grow(layer.k_grow ? n - layer.kept : 0);
  const bool want_prune = layer.k_prune > 0, want_grow = layer.k_grow > 0;
  at::parallel_for(0, chunks, 1, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      int64_t at_kept = kept_before[c], at_pruned = c * kChunk - kept_before[c];
      for (int64_t i = c * kChunk; i < std::min(n, (c + 1) * kChunk); ++i) {
        const bool keep = is_kept<scalar_t, kMask>(m, i);
        if (keep ? !want_prune : !want_grow) {
          (keep ? at_kept : at_pruned) += 1;
          continue;
        }
        const Candidate candidate{order_key(round_to<score_t>(flip_score<scalar_t, kMask, kWeights>(g, w, m, i))), i};
        if (keep) {
          prune[at_kept++] = candidate;
        } else {
          grow[at_pruned++] = candidate;
        }
      }
    }
  });
  write_smallest(prune, layer.k_prune, layer.prune_out);
  write_smallest(grow, layer.k_grow, layer.grow_out);
}

std::tuple<std::vector<at::Tensor>, std::vector<at::Tensor>> mask_flip_topk(
    at::TensorList grads, const c10::List<std::optional<at::Tensor>>& weights, at::TensorList masks,
    at::IntArrayRef k_prune, at::IntArrayRef k_grow) {
  constexpr const char* op = "mask_flip_topk";
  const size_t n = grads.size();
  check_lengths(op, n, "weights", weights.size());
  check_lengths(op, n, "masks", masks.size());
  check_lengths(op, n, "k_prune", k_prune.size());
  check_lengths(op, n, "k_grow", k_grow.size());
  std::vector<TopkLayer> layers(n);
  std::vector<at::Tensor> prune_idx(n), grow_idx(n);
  for (size_t t = 0; t < n; ++t) {
    const at::Tensor& g = grads[t];
    check_floating(g, op, "grads", t);
    std::optional<at::Tensor> holder;
    const at::Tensor* w = weight_of(weights, t, g, op, holder);
    const int kind = flip_mask_kind(masks[t], g, op, t);
    TORCH_CHECK_VALUE(k_prune[t] >= 0 && k_grow[t] >= 0, op, ": k_prune[", t, "] and k_grow[", t,
                      "] must be >= 0, got ", k_prune[t], " and ", k_grow[t]);
    TORCH_CHECK_VALUE(k_prune[t] + k_grow[t] <= g.numel(), op, ": k_prune[", t, "] + k_grow[", t, "] = ",
                      k_prune[t] + k_grow[t], " exceeds the ", g.numel(), " entries of grads[", t, "]");
    prune_idx[t] = at::empty({k_prune[t]}, g.options().dtype(at::kLong));
    grow_idx[t] = at::empty({k_grow[t]}, g.options().dtype(at::kLong));
    TopkLayer& layer = layers[t];
    layer.job = Job{g.const_data_ptr(), w ? w->const_data_ptr() : nullptr, masks[t].const_data_ptr(), nullptr, 0.0,
                    nullptr};
    layer.numel = g.numel();
    layer.k_prune = k_prune[t];
    layer.k_grow = k_grow[t];
    layer.prune_out = prune_idx[t].mutable_data_ptr<int64_t>();
    layer.grow_out = grow_idx[t].mutable_data_ptr<int64_t>();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, g.scalar_type(), op, [&] {
      if (kind == kSoft) {
        layer.select = w ? &select_flips<scalar_t, kSoft, true> : &select_flips<scalar_t, kSoft, false>;
      } else {
        layer.select = w ? &select_flips<scalar_t, kBinary, true> : &select_flips<scalar_t, kBinary, false>;
      }
    });
  }
  // Layer after layer: each is parallel inside.
  for (TopkLayer& layer : layers) layer.select(layer);
  // Checked here, in layer order, so the first offending layer is named.
  for (size_t t = 0; t < n; ++t) {
    const TopkLayer& layer = layers[t];
    TORCH_CHECK_VALUE(layer.k_prune <= layer.kept, op, ": k_prune[", t, "] = ", layer.k_prune, " but masks[", t,
                      "] keeps only ", layer.kept, " entries");
    TORCH_CHECK_VALUE(layer.k_grow <= layer.numel - layer.kept, op, ": k_grow[", t, "] = ", layer.k_grow,
                      " but masks[", t, "] prunes only ", layer.numel - layer.kept, " entries");
  }
  return {prune_idx, grow_idx};
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
      // torch.sign: +0.0 for +-0 and NaN.
      const double sign = si > 0.0 ? 1.0 : (si < 0.0 ? -1.0 : 0.0);
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
  m.impl("mask_flip_scores", &mask_flip_scores);
  m.impl("mask_flip_topk", &mask_flip_topk);
  m.impl("mask_score_grad", &mask_score_grad);
}

}  // namespace sparsesam::cpu
