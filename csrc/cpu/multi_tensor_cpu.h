// The multi-tensor machinery of the CPU kernels that walk many tensors in
// one call (sam_step_cpu.cpp, mask_scoring_cpu.cpp): the chunk plan (one
// parallel region over fixed-size chunks of all tensors, apex-style), mask
// tests on raw bits, branch-free selects, vectorisable bf16 load/store, the
// deterministic blocked sum and the shared argument checks.
//
// Determinism: chunk boundaries, sum blocks and lanes depend only on the
// tensor sizes, and partials are combined in a fixed order, so every
// reduction built from these pieces has the same bits for any thread count.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/MemoryOverlap.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <bit>
#include <cstdint>
#include <optional>
#include <vector>

namespace sparsesam::cpu::multi_tensor {

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
inline int mask_bytes(const std::optional<at::Tensor>& mask, const at::Tensor& like, const char* op, size_t index) {
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
  // Tensor t's chunks are [first_chunk(t), first_chunk(t + 1)).
  int64_t first_chunk(size_t t) const { return first_[t]; }

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

inline void check_floating(const at::Tensor& t, const char* op, const char* name, size_t index) {
  TORCH_CHECK(t.defined(), op, ": ", name, "[", index, "] is undefined");
  TORCH_CHECK(t.device().is_cpu(), op, ": ", name, "[", index, "] must be on the CPU, got ", t.device());
  TORCH_CHECK(t.is_contiguous(), op, ": ", name, "[", index, "] must be contiguous");
  const auto dtype = t.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kDouble || dtype == at::kBFloat16 || dtype == at::kHalf, op, ": ",
              name, "[", index, "] must be float32, float64, bfloat16 or float16, got ", dtype);
}

// `other` must be `like`'s partner: same shape and dtype.
inline void check_partner(const at::Tensor& other, const at::Tensor& like, const char* op, const char* name,
                   const char* like_name, size_t index) {
  check_floating(other, op, name, index);
  TORCH_CHECK(other.sizes() == like.sizes(), op, ": ", name, "[", index, "] has shape ", other.sizes(), ", ",
              like_name, "[", index, "] has ", like.sizes());
  TORCH_CHECK(other.scalar_type() == like.scalar_type(), op, ": ", name, "[", index, "] is ", other.scalar_type(),
              ", ", like_name, "[", index, "] is ", like.scalar_type());
}

// A tensor the op writes must share no memory with another it reads or
// writes (the kernels promise __restrict to the compiler).
inline void check_no_overlap(const at::Tensor& written, const at::Tensor& other, const char* op, const char* written_name,
                      const char* other_name, size_t index) {
  TORCH_CHECK(at::get_overlap_status(written, other) == at::MemOverlapStatus::No, op, ": ", written_name, "[",
              index, "] and ", other_name, "[", index, "] overlap in memory; pass separate tensors");
}

// One value of a small CPU tensor (rho, sq_norm) as double, without a
// dispatcher call per read (62 item() calls would cost more than a pass).
inline double value_at(const at::Tensor& t, int64_t k) {
  double v = 0.0;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, t.scalar_type(), "multi_tensor_value_at", [&] {
    v = static_cast<double>(t.const_data_ptr<scalar_t>()[k * (t.dim() == 0 ? 0 : t.stride(0))]);
  });
  return v;
}

// --- The deterministic blocked sum ---------------------------------------------

// A sum in double, element by element, is compute-bound (~9 GB/s). Instead
// a range is summed in sub-blocks of kSumBlock elements in acc_t, over
// kLanes independent accumulators (a fixed-width array the vectoriser maps
// onto SIMD registers, with no reassociation needed); the lanes are combined
// in a fixed tree and each sub-block's sum is added to the range's double
// partial. Callers sum chunk ranges and add the chunk partials in chunk
// order: every rounding happens at a place fixed by the tensor sizes, so the
// bits do not depend on the thread count. Float error: each lane adds only
// kSumBlock / kLanes = 128 terms.
constexpr int kLanes = 16;
constexpr int64_t kSumBlock = 2048;

// sum of term(i) over [begin, end); term returns acc_t.
template <typename acc_t, typename Term>
inline double blocked_sum(int64_t begin, int64_t end, const Term& term) {
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

// --- Sum of squares (s*g)^2, shared by sam_grad_sq_norm and mask_grad_sq_norm --

// s = w when kScaled (ASAM's |w|*g, or the mask gradient g*w: the square
// drops the sign), else 1. `weight` is read only when kScaled.
struct NormJob {
  const void* grad;
  const void* weight;
  const void* mask;
  double (*fn)(const NormJob&, int64_t, int64_t);
};

template <typename scalar_t, int kMaskBytes, bool kScaled>
double sq_norm_range(const NormJob& job, int64_t begin, int64_t end) {
  using acc_t = at::opmath_type<scalar_t>;
  const scalar_t* __restrict g = static_cast<const scalar_t*>(job.grad);
  const scalar_t* __restrict w = static_cast<const scalar_t*>(job.weight);
  const mask_word_t<kMaskBytes>* __restrict m = static_cast<const mask_word_t<kMaskBytes>*>(job.mask);
  // (s*g)^2 at a kept entry, 0 at a pruned one (a select: a NaN gradient at
  // a pruned entry does not leak into the norm).
  return blocked_sum<acc_t>(begin, end, [&](int64_t i) -> acc_t {
    acc_t x = load(g[i]);
    if constexpr (kScaled) x = x * load(w[i]);
    x = x * x;
    return select(kept<kMaskBytes>(m, i), x, acc_t(0));
  });
}

template <int kMaskBytes>
struct SqNormKernel {
  template <typename scalar_t>
  static auto get(bool scaled) {
    return scaled ? &sq_norm_range<scalar_t, kMaskBytes, true> : &sq_norm_range<scalar_t, kMaskBytes, false>;
  }
};

// The norm jobs' chunk partials, added in chunk order, as a float64 0-d tensor.
inline at::Tensor sum_of_squares(const std::vector<NormJob>& jobs, const std::vector<int64_t>& numels) {
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

}  // namespace sparsesam::cpu::multi_tensor
