// The inner kernels of csr_linear on CPU, written once for any vector
// width with GCC/Clang vector extensions (`a * b + c` on vectors becomes an
// FMA where the target has one).
//
// This header is meant to be included INSIDE a namespace by each
// instruction-set translation unit (csr_linear_cpu.cpp for the baseline
// ISA, sparse_formats_avx2.cpp under a target("avx2,fma") pragma). Each ISA
// so gets its own copies under its own names, and the header includes
// nothing and calls no library function: only compiler builtins, so no
// inline function of a shared header is ever compiled for AVX2. The includer
// provides <cstdint>, <utility> and csr_linear_simd.h first, and defines
// SPARSESAM_SPARSE_LINEAR_ISA (the name of the ISA, for messages).
//
// The kernels' contracts are in csr_linear_simd.h. The speed comes from:
//  * register blocking over the batch: a tile of T = kVecs vectors of
//    accumulators stays in registers while a row's entries stream by, each
//    entry reading one contiguous run of the packed operand;
//  * at least 8 independent FMA chains (narrow tiles take several entries at
//    once into separate accumulator sets);
//  * cache blocking over the packed operand's rows (col_block), so the slice
//    a block reads stays in L2 while every row of the task passes over it;
//  * whole-vector transposes (log2(lanes) rounds of interleaves) for packing
//    and unpacking, and an in-register lane reduction that turns one
//    vector per entry into one vector of `lanes` entries' sums in the SDDMM.

template <typename acc_t, int kVecBytes>
struct Simd {
  static constexpr int kLanes = kVecBytes / int(sizeof(acc_t));
  static_assert(kLanes >= 2 && (kLanes & (kLanes - 1)) == 0, "lanes must be a power of two");
  typedef acc_t vec __attribute__((vector_size(kVecBytes)));

  // memcpy: unaligned, and free of strict-aliasing questions; compiles to one move.
  static inline vec load(const acc_t* p) {
    vec v;
    __builtin_memcpy(&v, p, sizeof(vec));
    return v;
  }
  static inline void store(acc_t* p, vec v) { __builtin_memcpy(p, &v, sizeof(vec)); }
  // Lane 0 copied to every lane: one broadcast. (Not `vec{} + a`: adding
  // +0.0 is not an identity for -0.0, so the add would stay in front of it.)
  template <int... I>
  static inline vec broadcast(vec v, std::integer_sequence<int, I...>) {
    return __builtin_shufflevector(v, v, (I * 0)...);
  }
  static inline vec splat(acc_t a) { return broadcast(vec{a}, std::make_integer_sequence<int, kLanes>{}); }
  static inline acc_t sum(vec v) {
    acc_t s = v[0];
    for (int i = 1; i < kLanes; ++i) s += v[i];
    return s;
  }

  // [a0 b0 a1 b1 ...] and the same from the upper halves.
  template <int... I>
  static inline vec interleave_lo(vec a, vec b, std::integer_sequence<int, I...>) {
    return __builtin_shufflevector(a, b, ((I % 2 == 0) ? I / 2 : kLanes + I / 2)...);
  }
  template <int... I>
  static inline vec interleave_hi(vec a, vec b, std::integer_sequence<int, I...>) {
    return __builtin_shufflevector(a, b, ((I % 2 == 0) ? kLanes / 2 + I / 2 : kLanes + kLanes / 2 + I / 2)...);
  }
  // Even lanes of a then of b; odd lanes of a then of b.
  template <int... I>
  static inline vec evens(vec a, vec b, std::integer_sequence<int, I...>) {
    return __builtin_shufflevector(a, b, (I < kLanes / 2 ? 2 * I : kLanes + 2 * (I - kLanes / 2))...);
  }
  template <int... I>
  static inline vec odds(vec a, vec b, std::integer_sequence<int, I...>) {
    return __builtin_shufflevector(a, b, (I < kLanes / 2 ? 2 * I + 1 : kLanes + 2 * (I - kLanes / 2) + 1)...);
  }
  using Lanes = std::make_integer_sequence<int, kLanes>;

  // r[i][j] -> r[j][i] for a kLanes x kLanes block. Eight lanes (AVX2
  // float): the classic unpack / shuffle / 128-bit-swap sequence, in-lane
  // shuffles but for the last round. Otherwise: log2(kLanes) rounds of the
  // perfect shuffle (row i with row i + kLanes/2).
  static inline void transpose(vec* r) {
    if constexpr (kLanes == 8) {
      vec t[8], u[8];
#pragma GCC unroll 4
      for (int i = 0; i < 4; ++i) {
        t[2 * i] = __builtin_shufflevector(r[2 * i], r[2 * i + 1], 0, 8, 1, 9, 4, 12, 5, 13);
        t[2 * i + 1] = __builtin_shufflevector(r[2 * i], r[2 * i + 1], 2, 10, 3, 11, 6, 14, 7, 15);
      }
#pragma GCC unroll 2
      for (int h = 0; h < 2; ++h) {  // rows 0-3, then 4-7
        vec* o = u + 4 * h;
        const vec* q = t + 4 * h;
        o[0] = __builtin_shufflevector(q[0], q[2], 0, 1, 8, 9, 4, 5, 12, 13);
        o[1] = __builtin_shufflevector(q[0], q[2], 2, 3, 10, 11, 6, 7, 14, 15);
        o[2] = __builtin_shufflevector(q[1], q[3], 0, 1, 8, 9, 4, 5, 12, 13);
        o[3] = __builtin_shufflevector(q[1], q[3], 2, 3, 10, 11, 6, 7, 14, 15);
      }
#pragma GCC unroll 4
      for (int i = 0; i < 4; ++i) {
        r[i] = __builtin_shufflevector(u[i], u[i + 4], 0, 1, 2, 3, 8, 9, 10, 11);
        r[i + 4] = __builtin_shufflevector(u[i], u[i + 4], 4, 5, 6, 7, 12, 13, 14, 15);
      }
    } else {
      for (int round = 1; round < kLanes; round *= 2) {
        vec t[kLanes];
#pragma GCC unroll 8
        for (int i = 0; i < kLanes / 2; ++i) {
          t[2 * i] = interleave_lo(r[i], r[i + kLanes / 2], Lanes{});
          t[2 * i + 1] = interleave_hi(r[i], r[i + kLanes / 2], Lanes{});
        }
#pragma GCC unroll 8
        for (int i = 0; i < kLanes; ++i) r[i] = t[i];
      }
    }
  }

  // [sum(a[0]), sum(a[1]), ...] for kLanes vectors (a is overwritten):
  // each round adds neighbouring lanes of two vectors into one. Eight lanes:
  // two rounds of in-lane shuffles, then one 128-bit swap.
  static inline vec lane_sums(vec* a) {
    if constexpr (kLanes == 8) {
#pragma GCC unroll 4
      for (int i = 0; i < 4; ++i) {
        a[i] = __builtin_shufflevector(a[2 * i], a[2 * i + 1], 0, 2, 8, 10, 4, 6, 12, 14) +
               __builtin_shufflevector(a[2 * i], a[2 * i + 1], 1, 3, 9, 11, 5, 7, 13, 15);
      }
#pragma GCC unroll 2
      for (int i = 0; i < 2; ++i) {
        a[i] = __builtin_shufflevector(a[2 * i], a[2 * i + 1], 0, 2, 8, 10, 4, 6, 12, 14) +
               __builtin_shufflevector(a[2 * i], a[2 * i + 1], 1, 3, 9, 11, 5, 7, 13, 15);
      }
      // a[0] = [sums 0-3 of the low halves | of the high halves], a[1] likewise for 4-7.
      return __builtin_shufflevector(a[0], a[1], 0, 1, 2, 3, 8, 9, 10, 11) +
             __builtin_shufflevector(a[0], a[1], 4, 5, 6, 7, 12, 13, 14, 15);
    } else {
      for (int n = kLanes; n > 1; n /= 2) {
#pragma GCC unroll 8
        for (int i = 0; i < n / 2; ++i) {
          a[i] = evens(a[2 * i], a[2 * i + 1], Lanes{}) + odds(a[2 * i], a[2 * i + 1], Lanes{});
        }
      }
      return a[0];
    }
  }
};

// The end of the column block that starts at k0.
inline int64_t block_end(int64_t k0, int64_t col_block, int64_t n) {
  return n - k0 > col_block ? k0 + col_block : n;
}

// Where row i's entries of the block [.., k1) end (cursor: where they start).
inline int64_t segment_end(const int32_t* __restrict idx, int64_t j, int64_t end, int64_t k1) {
  while (j < end && idx[j] < k1) ++j;
  return j;
}

template <typename acc_t, int kVecBytes, int kVecs>
void spmm(const SpmmTask<acc_t>& t) {
  using S = Simd<acc_t, kVecBytes>;
  using vec = typename S::vec;
  constexpr int L = S::kLanes;
  constexpr int64_t T = int64_t(L) * kVecs;
  // FMA latency x ports is about 8 on current x86: narrow tiles take
  // several entries at once into independent accumulator sets.
  constexpr int kSets = kVecs >= 8 ? 1 : 8 / kVecs;
  const int32_t* __restrict idx = t.idx;
  const acc_t* __restrict val = t.val;
  const acc_t* __restrict in = t.in;
  const int64_t rows = t.row_end - t.row_begin;
  for (int64_t i = 0; i < rows; ++i) t.cursor[i] = t.ptr[t.row_begin + i];
  int64_t k0 = 0;
  do {
    const int64_t k1 = block_end(k0, t.col_block, t.in_rows);
    for (int64_t i = 0; i < rows; ++i) {
      acc_t* __restrict out = t.out + i * T;
      vec acc[kSets][kVecs];
      const vec init = S::splat(t.bias != nullptr ? t.bias[t.row_begin + i] : acc_t(0));
#pragma GCC unroll 8
      for (int v = 0; v < kVecs; ++v) {
        acc[0][v] = k0 == 0 ? init : S::load(out + v * L);
        for (int s = 1; s < kSets; ++s) acc[s][v] = vec{};
      }
      int64_t j = t.cursor[i];
      const int64_t e = segment_end(idx, j, t.ptr[t.row_begin + i + 1], k1);
      t.cursor[i] = static_cast<int32_t>(e);
      for (; j + kSets <= e; j += kSets) {
#pragma GCC unroll 8
        for (int s = 0; s < kSets; ++s) {
          const vec w = S::splat(val[j + s]);
          const acc_t* x = in + int64_t(idx[j + s]) * T;
#pragma GCC unroll 8
          for (int v = 0; v < kVecs; ++v) acc[s][v] += w * S::load(x + v * L);
        }
      }
      for (; j < e; ++j) {
        const vec w = S::splat(val[j]);
        const acc_t* x = in + int64_t(idx[j]) * T;
#pragma GCC unroll 8
        for (int v = 0; v < kVecs; ++v) acc[0][v] += w * S::load(x + v * L);
      }
#pragma GCC unroll 8
      for (int v = 0; v < kVecs; ++v) {
        for (int s = 1; s < kSets; ++s) acc[0][v] += acc[s][v];
        S::store(out + v * L, acc[0][v]);
      }
    }
    k0 = k1;
  } while (k0 < t.in_rows);
}

template <typename acc_t, int kVecBytes, int kVecs>
void sddmm(const SddmmTask<acc_t>& t) {
  using S = Simd<acc_t, kVecBytes>;
  using vec = typename S::vec;
  constexpr int L = S::kLanes;
  constexpr int64_t T = int64_t(L) * kVecs;
  const int32_t* __restrict idx = t.idx;
  const acc_t* __restrict right = t.right;
  acc_t* __restrict dval = t.dval;
  const int64_t rows = t.row_end - t.row_begin;
  for (int64_t i = 0; i < rows; ++i) t.cursor[i] = t.ptr[t.row_begin + i];
  int64_t k0 = 0;
  do {
    const int64_t k1 = block_end(k0, t.col_block, t.in_rows);
    for (int64_t i = 0; i < rows; ++i) {
      const acc_t* __restrict g = t.left + (t.row_begin + i) * T;
      int64_t j = t.cursor[i];
      const int64_t e = segment_end(idx, j, t.ptr[t.row_begin + i + 1], k1);
      t.cursor[i] = static_cast<int32_t>(e);
      // L entries at a time: one dot-product vector each, reduced together
      // into one vector of L sums that lands on L consecutive values.
      for (; j + L <= e; j += L) {
        vec d[L];
#pragma GCC unroll 8
        for (int u = 0; u < L; ++u) {
          const acc_t* x = right + int64_t(idx[j + u]) * T;
          vec s = S::load(g) * S::load(x);
#pragma GCC unroll 8
          for (int v = 1; v < kVecs; ++v) s += S::load(g + v * L) * S::load(x + v * L);
          d[u] = s;
        }
        const vec sums = S::lane_sums(d);
        S::store(dval + j, t.accumulate ? S::load(dval + j) + sums : sums);
      }
      for (; j < e; ++j) {
        const acc_t* x = right + int64_t(idx[j]) * T;
        vec s = S::load(g) * S::load(x);
#pragma GCC unroll 8
        for (int v = 1; v < kVecs; ++v) s += S::load(g + v * L) * S::load(x + v * L);
        dval[j] = t.accumulate ? dval[j] + S::sum(s) : S::sum(s);
      }
    }
    k0 = k1;
  } while (k0 < t.in_rows);
}

template <typename acc_t, int kVecBytes, int kVecs>
void pack(const PackTask<acc_t>& t) {
  using S = Simd<acc_t, kVecBytes>;
  using vec = typename S::vec;
  constexpr int L = S::kLanes;
  constexpr int64_t T = int64_t(L) * kVecs;
  const acc_t* __restrict src = t.src;
  acc_t* __restrict dst = t.dst;
  for (int64_t b0 = 0; b0 < T; b0 += L) {
    int64_t c = t.col_begin;
    if (b0 + L <= t.rows) {
      for (; c + L <= t.col_end; c += L) {
        vec r[L];
#pragma GCC unroll 8
        for (int i = 0; i < L; ++i) r[i] = S::load(src + (b0 + i) * t.ld + c);
        S::transpose(r);
#pragma GCC unroll 8
        for (int i = 0; i < L; ++i) S::store(dst + (c + i) * T + b0, r[i]);
      }
    }
    // Column tail, and the lanes of a partial (or padding) group of rows.
    for (; c < t.col_end; ++c) {
      for (int64_t b = b0; b < b0 + L; ++b) dst[c * T + b] = b < t.rows ? src[b * t.ld + c] : acc_t(0);
    }
  }
}

template <typename acc_t, int kVecBytes, int kVecs>
void unpack(const UnpackTask<acc_t>& t) {
  using S = Simd<acc_t, kVecBytes>;
  using vec = typename S::vec;
  constexpr int L = S::kLanes;
  constexpr int64_t T = int64_t(L) * kVecs;
  const acc_t* __restrict src = t.src;
  acc_t* __restrict dst = t.dst;
  for (int64_t b0 = 0; b0 < t.rows; b0 += L) {
    int64_t c = 0;
    if (b0 + L <= t.rows) {
      for (; c + L <= t.cols; c += L) {
        vec r[L];
#pragma GCC unroll 8
        for (int i = 0; i < L; ++i) r[i] = S::load(src + (c + i) * T + b0);
        S::transpose(r);
#pragma GCC unroll 8
        for (int i = 0; i < L; ++i) S::store(dst + (b0 + i) * t.ld + c, r[i]);
      }
    }
    const int64_t b1 = b0 + L < t.rows ? b0 + L : t.rows;
    for (int64_t b = b0; b < b1; ++b) {
      for (int64_t cc = c; cc < t.cols; ++cc) dst[b * t.ld + cc] = src[cc * T + b];
    }
  }
}

// The table of this ISA's kernels; constexpr, so it is built at compile time
// and reading it runs no code of this ISA.
template <typename acc_t, int kVecBytes>
inline constexpr CSRLinearKernels<acc_t> kCSRLinearKernels = {
    SPARSESAM_SPARSE_LINEAR_ISA,
    Simd<acc_t, kVecBytes>::kLanes,
    {&spmm<acc_t, kVecBytes, 1>, &spmm<acc_t, kVecBytes, 2>, &spmm<acc_t, kVecBytes, 4>, &spmm<acc_t, kVecBytes, 8>},
    {&sddmm<acc_t, kVecBytes, 1>, &sddmm<acc_t, kVecBytes, 2>, &sddmm<acc_t, kVecBytes, 4>,
     &sddmm<acc_t, kVecBytes, 8>},
    {&pack<acc_t, kVecBytes, 1>, &pack<acc_t, kVecBytes, 2>, &pack<acc_t, kVecBytes, 4>, &pack<acc_t, kVecBytes, 8>},
    {&unpack<acc_t, kVecBytes, 1>, &unpack<acc_t, kVecBytes, 2>, &unpack<acc_t, kVecBytes, 4>,
     &unpack<acc_t, kVecBytes, 8>},
};
