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
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/MemoryOverlap.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <bit>
#include <cmath>
#include <cstdint>
#include <vector>

namespace sparsesam::cpu {
namespace {

// Elements per chunk. Chunk boundaries are the reduction's block boundaries,
// so they depend only on the tensor sizes, never on the thread count. 8 K
// float elements = 32 KB per stream: small enough that the 11 M-parameter
// ResNet-18 gives ~1400 chunks (the tail chunks of its 62 tensors are noise
// in the balance), large enough that the per-chunk bookkeeping is free.
constexpr int64_t kChunk = 8192;
// Chunks per thread task at least: below this much work (~32 K elements)
// the fork of a parallel region costs more than it saves.
constexpr int64_t kGrainChunks = 4;

// --- Masks ------------------------------------------------------------------

// kMaskBytes: 0 = no mask (dense), else the mask's element width.
template <int kBytes> struct MaskWord { using type = uint8_t; };
template <> struct MaskWord<2> { using type = uint16_t; };
template <> struct MaskWord<4> { using type = uint32_t; };
// A float64 mask is read as pairs of 32-bit words: SSE2 has no 64-bit
// compare, and this way the test still vectorises.
template <> struct MaskWord<8> { using type = uint32_t; };

template <int kMaskBytes>
using mask_word_t = typename MaskWord<kMaskBytes>::type;

// `mask != 0` on the mask's bits. 1 byte: bool / uint8 / int8. Wider: a
// floating value, zero iff all bits but the sign are zero.
template <int kMaskBytes>
inline bool kept(const mask_word_t<kMaskBytes>* __restrict mask, int64_t i) {
  if constexpr (kMaskBytes == 0) {
    return true;
  } else if constexpr (kMaskBytes == 1) {
    return mask[i] != 0;
  } else if constexpr (kMaskBytes == 8) {
    // Little-endian: the sign is the top bit of the second word.
    static_assert(std::endian::native == std::endian::little);
    return (mask[2 * i] | (mask[2 * i + 1] & 0x7FFFFFFFu)) != 0;
  } else {
    using word_t = mask_word_t<kMaskBytes>;
    constexpr word_t kMagnitude = static_cast<word_t>(~word_t(0)) >> 1;
    return (mask[i] & kMagnitude) != 0;
  }
}

// The mask's width as a template argument: 0 for None. Wider integer masks
// are refused: their bits do not follow the floating rule above.
int mask_bytes(const std::optional<at::Tensor>& mask, const at::Tensor& like, const char* op, size_t index) {
  if (!mask.has_value() || !mask->defined()) return 0;
  const at::Tensor& m = *mask;
  TORCH_CHECK(m.device().is_cpu(), op, ": masks[", index, "] must be on the CPU");
  TORCH_CHECK(m.numel() == like.numel(), op, ": masks[", index, "] has ", m.numel(), " elements, its tensor ",
              like.numel());
  TORCH_CHECK(m.is_contiguous(), op, ": masks[", index, "] must be contiguous");
  const auto dtype = m.scalar_type();
  TORCH_CHECK(dtype == at::kBool || dtype == at::kByte || dtype == at::kChar || at::isFloatingType(dtype), op,
              ": masks[", index, "] must be bool, uint8, int8 or floating, got ", dtype);
  return static_cast<int>(m.element_size());
}

// --- Element helpers ---------------------------------------------------------

// GCC does not if-convert `keep ? new : old` when `new` is floating-point
// arithmetic it could sink into a branch (with the default -ftrapping-math
// it may not then speculate it back): the loop stops vectorising with
// "control flow in loop". A select on the bits (AND with all-ones or
// all-zeros) is plain integer data flow, vectorises, and keeps the old bits
// exactly.
template <size_t kBytes> struct UIntOfSize;
template <> struct UIntOfSize<2> { using type = uint16_t; };
template <> struct UIntOfSize<4> { using type = uint32_t; };
template <> struct UIntOfSize<8> { using type = uint64_t; };

template <typename T>
inline T select(bool keep, T if_kept, T if_pruned) {
  using bits_t = typename UIntOfSize<sizeof(T)>::type;
  const bits_t all = bits_t(0) - static_cast<bits_t>(keep);
  return std::bit_cast<T>(static_cast<bits_t>((std::bit_cast<bits_t>(if_kept) & all) |
                                              (std::bit_cast<bits_t>(if_pruned) & ~all)));
}

// Storage <-> compute type. c10's BFloat16 rounding branches on isnan,
// which blocks vectorisation; these are the same functions (bit for bit:
// round to nearest even, every NaN to 0x7FC0) written as data flow.
template <typename scalar_t>
inline at::opmath_type<scalar_t> load(scalar_t x) {
  return static_cast<at::opmath_type<scalar_t>>(x);
}
template <>
inline float load(c10::BFloat16 x) {
  return std::bit_cast<float>(static_cast<uint32_t>(x.x) << 16);
}

template <typename scalar_t>
inline scalar_t store(at::opmath_type<scalar_t> v) {
  return static_cast<scalar_t>(v);
}
template <>
inline c10::BFloat16 store<c10::BFloat16>(float v) {
  const uint32_t u = std::bit_cast<uint32_t>(v);
  const uint32_t rounded = (u + ((u >> 16) & 1u) + 0x7FFFu) >> 16;
  const bool nan = (u & 0x7FFFFFFFu) > 0x7F800000u;
  return c10::BFloat16(static_cast<uint16_t>(nan ? 0x7FC0u : rounded), c10::BFloat16::from_bits());
}

// --- The chunk plan ------------------------------------------------------------

// Tensor t owns the global chunks [first[t], first[t + 1]).
class ChunkPlan {
 public:
  explicit ChunkPlan(const std::vector<int64_t>& numels) : numels_(numels), first_(numels.size() + 1, 0) {
    for (size_t t = 0; t < numels.size(); ++t) first_[t + 1] = first_[t] + (numels[t] + kChunk - 1) / kChunk;
  }

  int64_t chunks() const { return first_.back(); }

  // f(tensor, global chunk, begin, end) for every chunk, in one parallel
  // region. A task gets a contiguous run of chunks: it finds its first
  // tensor by binary search, then walks forward.
  template <typename F>
  void for_each_chunk(const F& f) const {
    at::parallel_for(0, chunks(), kGrainChunks, [&](int64_t chunk_begin, int64_t chunk_end) {
      // The last tensor whose first chunk is <= chunk_begin (empty tensors
      // own no chunk and are stepped over).
      size_t t = std::upper_bound(first_.begin(), first_.end(), chunk_begin) - first_.begin() - 1;
      for (int64_t c = chunk_begin; c < chunk_end; ++c) {
        while (first_[t + 1] <= c) ++t;
        const int64_t begin = (c - first_[t]) * kChunk;
        f(t, c, begin, std::min(begin + kChunk, numels_[t]));
      }
    });
  }

 private:
  std::vector<int64_t> numels_;
  std::vector<int64_t> first_;
};

// --- Shared checks -------------------------------------------------------------

void check_floating(const at::Tensor& t, const char* op, const char* name, size_t index) {
  TORCH_CHECK(t.defined(), op, ": ", name, "[", index, "] is undefined");
  TORCH_CHECK(t.device().is_cpu(), op, ": ", name, "[", index, "] must be on the CPU, got ", t.device());
  TORCH_CHECK(t.is_contiguous(), op, ": ", name, "[", index, "] must be contiguous");
  const auto dtype = t.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kDouble || dtype == at::kBFloat16 || dtype == at::kHalf, op, ": ",
              name, "[", index, "] must be float32, float64, bfloat16 or float16, got ", dtype);
}

// `other` must be `like`'s partner: same shape and dtype.
void check_partner(const at::Tensor& other, const at::Tensor& like, const char* op, const char* name,
                   const char* like_name, size_t index) {
  check_floating(other, op, name, index);
  TORCH_CHECK(other.sizes() == like.sizes(), op, ": ", name, "[", index, "] has shape ", other.sizes(), ", ",
              like_name, "[", index, "] has ", like.sizes());
  TORCH_CHECK(other.scalar_type() == like.scalar_type(), op, ": ", name, "[", index, "] is ", other.scalar_type(),
              ", ", like_name, "[", index, "] is ", like.scalar_type());
}

// A tensor the op writes must share no memory with another it reads or
// writes (the kernels promise __restrict to the compiler).
void check_no_overlap(const at::Tensor& written, const at::Tensor& other, const char* op, const char* written_name,
                      const char* other_name, size_t index) {
  TORCH_CHECK(at::get_overlap_status(written, other) == at::MemOverlapStatus::No, op, ": ", written_name, "[",
              index, "] and ", other_name, "[", index, "] overlap in memory; pass separate tensors");
}

// One value of a small CPU tensor (rho, sq_norm) as double, without a
// dispatcher call per read (62 item() calls would cost more than a pass).
double value_at(const at::Tensor& t, int64_t k) {
  double v = 0.0;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, t.scalar_type(), "sam_step_value_at", [&] {
    v = static_cast<double>(t.const_data_ptr<scalar_t>()[k * (t.dim() == 0 ? 0 : t.stride(0))]);
  });
  return v;
}

// =============================================================================
// sam_grad_sq_norm
// =============================================================================

// A sum of squares in double, element by element, is compute-bound (~9
// GB/s). Instead each chunk is summed in sub-blocks of kSumBlock elements in
// the compute type, over kLanes independent accumulators (a fixed-width
// array the vectoriser maps onto SIMD registers, with no reassociation
// needed); the lanes are combined in a fixed tree, each sub-block's sum is
// added to the chunk's double partial, and the chunk partials are added in
// chunk order. Every rounding happens at a place fixed by the tensor sizes,
// so the bits do not depend on the thread count. Float error: each lane adds
// only kSumBlock / kLanes = 128 terms.
constexpr int kLanes = 16;
constexpr int64_t kSumBlock = 2048;

struct NormJob {
  const void* grad;
  const void* weight;
  const void* mask;
  double (*fn)(const NormJob&, int64_t, int64_t);
};

template <typename scalar_t, int kMaskBytes, bool kAdaptive>
double sq_norm_range(const NormJob& job, int64_t begin, int64_t end) {
  using acc_t = at::opmath_type<scalar_t>;
  const scalar_t* __restrict g = static_cast<const scalar_t*>(job.grad);
  const scalar_t* __restrict w = static_cast<const scalar_t*>(job.weight);
  const mask_word_t<kMaskBytes>* __restrict m = static_cast<const mask_word_t<kMaskBytes>*>(job.mask);
  // (s*g)^2 at a kept entry, 0 at a pruned one (a select: a NaN gradient at
  // a pruned entry does not leak into the norm).
  auto term = [&](int64_t i) -> acc_t {
    acc_t x = load(g[i]);
    if constexpr (kAdaptive) x = x * load(w[i]);
    x = x * x;
    return select(kept<kMaskBytes>(m, i), x, acc_t(0));
  };
  double sum = 0.0;
  for (int64_t block = begin; block < end; block += kSumBlock) {
    const int64_t len = std::min(kSumBlock, end - block);
    const int64_t rows = len / kLanes;
    acc_t acc[kLanes] = {};
    // Unit-step loops: with -fwrapv (in Python's build flags) GCC cannot
    // bound a loop stepping `i += kLanes` and vectorises it badly.
    for (int64_t r = 0; r < rows; ++r) {
      for (int l = 0; l < kLanes; ++l) acc[l] += term(block + r * kLanes + l);
    }
    for (int64_t l = 0; l < len - rows * kLanes; ++l) acc[l] += term(block + rows * kLanes + l);
    for (int width = kLanes / 2; width > 0; width /= 2) {
      for (int l = 0; l < width; ++l) acc[l] += acc[l + width];
    }
    sum += static_cast<double>(acc[0]);
  }
  return sum;
}

template <int kMaskBytes>
struct SqNormKernel {
  template <typename scalar_t>
  static auto get(bool adaptive) {
    return adaptive ? &sq_norm_range<scalar_t, kMaskBytes, true> : &sq_norm_range<scalar_t, kMaskBytes, false>;
  }
};

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

  const ChunkPlan plan(numels);
  std::vector<double> partials(plan.chunks());
  plan.for_each_chunk([&](size_t t, int64_t chunk, int64_t begin, int64_t end) {
    partials[chunk] = jobs[t].fn(jobs[t], begin, end);
  });
  double total = 0.0;
  for (const double p : partials) total += p;

  at::Tensor out = at::empty({}, at::TensorOptions().dtype(at::kDouble));
  *out.mutable_data_ptr<double>() = total;
  return out;
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
    for (size_t c = 0; c < coef.size(); ++c) coef[c] = value_at(rho, static_cast<int64_t>(c)) * scale;

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
