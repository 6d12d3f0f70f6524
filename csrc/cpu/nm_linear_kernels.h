// The inner kernels of nm_linear on CPU, written once for any vector width
// with GCC/Clang vector extensions. Included INSIDE a namespace by each
// instruction-set translation unit (nm_linear_cpu.cpp for the baseline ISA,
// sparse_formats_avx2.cpp under a target("avx2,fma") pragma), AFTER
// csr_linear_kernels.h, whose Simd<> helpers and pack/unpack kernels it
// uses; like that header it includes nothing and calls no library function.
// Contracts: nm_linear_simd.h.
//
// Compared with the CSR kernels an N:M row needs no offsets and no column
// index: the column of an entry is its group's first column plus a byte, and
// every row and group has the same length, so the loops are regular (and
// unrolled over the n entries of a group for n = 1, 2, 4).

// Forward: a tile of T = kVecs vectors of accumulators per row stays in
// registers while the row's entries stream by (as in spmm).
template <typename acc_t, int kVecBytes, int kVecs, int kN>
void nm_forward(const NMForwardTask<acc_t>& t) {
  using S = Simd<acc_t, kVecBytes>;
  using vec = typename S::vec;
  constexpr int L = S::kLanes;
  constexpr int64_t T = int64_t(L) * kVecs;
  // About 8 independent FMA chains (latency x ports): narrow tiles spread
  // consecutive entries over several accumulator sets.
  constexpr int kSets = kVecs >= 8 ? 1 : 8 / kVecs;
  // Groups per unrolled step when n is known: enough entries to feed every set.
  constexpr int kU = (kN > 0 && kSets > kN) ? kSets / kN : 1;
  const int n = kN > 0 ? kN : t.n;
  const int64_t m = t.m;
  const int64_t K = t.groups * n;
  const acc_t* __restrict in = t.in;
  const int64_t rows = t.row_end - t.row_begin;
  int64_t g0 = 0;
  do {
    const int64_t g1 = t.groups - g0 > t.group_block ? g0 + t.group_block : t.groups;
    for (int64_t i = 0; i < rows; ++i) {
      const int64_t r = t.row_begin + i;
      const acc_t* __restrict val = t.val + r * K;
      const uint8_t* __restrict idx = t.idx + r * K;
      acc_t* __restrict out = t.out + i * T;
      vec acc[kSets][kVecs];
      const vec init = S::splat(t.bias != nullptr ? t.bias[r] : acc_t(0));
#pragma GCC unroll 8
      for (int v = 0; v < kVecs; ++v) {
        acc[0][v] = g0 == 0 ? init : S::load(out + v * L);
        for (int s = 1; s < kSets; ++s) acc[s][v] = vec{};
      }
      int64_t g = g0;
      if constexpr (kN > 0) {
        for (; g + kU <= g1; g += kU) {
#pragma GCC unroll 8
          for (int u = 0; u < kU; ++u) {
            const acc_t* xg = in + (g + u) * m * T;
#pragma GCC unroll 4
            for (int s = 0; s < kN; ++s) {
              const int64_t e = (g + u) * kN + s;
              const vec w = S::splat(val[e]);
              const acc_t* x = xg + int64_t(idx[e]) * T;
              constexpr int kSetsMask = kSets - 1;
#pragma GCC unroll 8
              for (int v = 0; v < kVecs; ++v) acc[(u * kN + s) & kSetsMask][v] += w * S::load(x + v * L);
            }
          }
        }
      }
      for (; g < g1; ++g) {
        const acc_t* xg = in + g * m * T;
        for (int s = 0; s < n; ++s) {
          const int64_t e = g * n + s;
          const vec w = S::splat(val[e]);
          const acc_t* x = xg + int64_t(idx[e]) * T;
#pragma GCC unroll 8
          for (int v = 0; v < kVecs; ++v) acc[s & (kSets - 1)][v] += w * S::load(x + v * L);
        }
      }
#pragma GCC unroll 8
      for (int v = 0; v < kVecs; ++v) {
        for (int s = 1; s < kSets; ++s) acc[0][v] += acc[s][v];
        S::store(out + v * L, acc[0][v]);
      }
    }
    g0 = g1;
  } while (g0 < t.groups);
}

// dx: every output row's grad_out tile row stays in registers while its
// entries in this task's groups add into their columns of `out` (a small
// scratch, in cache). Each column is summed in one fixed order (rows, then
// entries), whatever the thread count.
template <typename acc_t, int kVecBytes, int kVecs, int kN>
void nm_grad_input(const NMGradInputTask<acc_t>& t) {
  using S = Simd<acc_t, kVecBytes>;
  using vec = typename S::vec;
  constexpr int L = S::kLanes;
  constexpr int64_t T = int64_t(L) * kVecs;
  const int n = kN > 0 ? kN : t.n;
  const int64_t m = t.m;
  const int64_t K = t.groups * n;
  const int64_t groups = t.group_end - t.group_begin;
  acc_t* __restrict out = t.out;
  for (int64_t c = 0; c < groups * m * T; ++c) out[c] = acc_t(0);
  for (int64_t r = 0; r < t.rows; ++r) {
    vec gv[kVecs];
#pragma GCC unroll 8
    for (int v = 0; v < kVecs; ++v) gv[v] = S::load(t.grad + r * T + v * L);
    const acc_t* __restrict val = t.val + r * K + t.group_begin * n;
    const uint8_t* __restrict idx = t.idx + r * K + t.group_begin * n;
    for (int64_t g = 0; g < groups; ++g) {
      acc_t* og = out + g * m * T;
      if constexpr (kN > 0) {
#pragma GCC unroll 4
        for (int s = 0; s < kN; ++s) {
          const vec w = S::splat(val[g * kN + s]);
          acc_t* o = og + int64_t(idx[g * kN + s]) * T;
#pragma GCC unroll 8
          for (int v = 0; v < kVecs; ++v) S::store(o + v * L, S::load(o + v * L) + w * gv[v]);
        }
      } else {
        for (int s = 0; s < n; ++s) {
          const vec w = S::splat(val[g * n + s]);
          acc_t* o = og + int64_t(idx[g * n + s]) * T;
#pragma GCC unroll 8
          for (int v = 0; v < kVecs; ++v) S::store(o + v * L, S::load(o + v * L) + w * gv[v]);
        }
      }
    }
  }
}

// dW at kept entries: per row and block of groups the entries' columns are
// decoded once into `columns`, then L entries at a time give one dot-product
// vector each, reduced together into one vector of L sums (as in sddmm).
template <typename acc_t, int kVecBytes, int kVecs>
void nm_grad_values(const NMGradValuesTask<acc_t>& t) {
  using S = Simd<acc_t, kVecBytes>;
  using vec = typename S::vec;
  constexpr int L = S::kLanes;
  constexpr int64_t T = int64_t(L) * kVecs;
  const int n = t.n;
  const int64_t m = t.m;
  const int64_t K = t.groups * n;
  const acc_t* __restrict right = t.right;
  // columns = [group_block * n relative starts | group_block * n columns]:
  // an entry's column is its block's first column + rel[j] + its byte, a
  // loop the compiler vectorises (no division per entry, no branch).
  int32_t* __restrict rel = t.columns;
  int32_t* __restrict columns = t.columns + t.group_block * n;
  for (int64_t j = 0; j < t.group_block * n; ++j) rel[j] = int32_t((j / n) * m);
  int64_t g0 = 0;
  do {
    const int64_t g1 = t.groups - g0 > t.group_block ? g0 + t.group_block : t.groups;
    const int64_t e0 = g0 * n, count = (g1 - g0) * n;
    for (int64_t r = t.row_begin; r < t.row_end; ++r) {
      const uint8_t* __restrict idx = t.idx + r * K + e0;
      const int32_t first = int32_t(g0 * m);
      for (int64_t j = 0; j < count; ++j) columns[j] = first + rel[j] + int32_t(idx[j]);
      // grad_out's row is read from memory (L1) at every use, not held in
      // registers: with L dot-product vectors live, kVecs more would spill.
      const acc_t* __restrict gr = t.left + r * T;
      acc_t* __restrict dval = t.dval + r * K + e0;
      int64_t j = 0;
      for (; j + L <= count; j += L) {
        vec d[L];
#pragma GCC unroll 8
        for (int u = 0; u < L; ++u) {
          const acc_t* x = right + int64_t(columns[j + u]) * T;
          vec s = S::load(gr) * S::load(x);
#pragma GCC unroll 8
          for (int v = 1; v < kVecs; ++v) s += S::load(gr + v * L) * S::load(x + v * L);
          d[u] = s;
        }
        const vec sums = S::lane_sums(d);
        S::store(dval + j, t.accumulate ? S::load(dval + j) + sums : sums);
      }
      for (; j < count; ++j) {
        const acc_t* x = right + int64_t(columns[j]) * T;
        vec s = S::load(gr) * S::load(x);
#pragma GCC unroll 8
        for (int v = 1; v < kVecs; ++v) s += S::load(gr + v * L) * S::load(x + v * L);
        dval[j] = t.accumulate ? dval[j] + S::sum(s) : S::sum(s);
      }
    }
    g0 = g1;
  } while (g0 < t.groups);
}

// The table of this ISA's kernels (constexpr data: reading it runs no code of this ISA).
template <typename acc_t, int kVecBytes>
inline constexpr NMLinearKernels<acc_t> kNMLinearKernels = {
    SPARSESAM_SPARSE_LINEAR_ISA,
    Simd<acc_t, kVecBytes>::kLanes,
    {{&nm_forward<acc_t, kVecBytes, 1, 0>, &nm_forward<acc_t, kVecBytes, 1, 1>, &nm_forward<acc_t, kVecBytes, 1, 2>,
      &nm_forward<acc_t, kVecBytes, 1, 4>},
     {&nm_forward<acc_t, kVecBytes, 2, 0>, &nm_forward<acc_t, kVecBytes, 2, 1>, &nm_forward<acc_t, kVecBytes, 2, 2>,
      &nm_forward<acc_t, kVecBytes, 2, 4>},
     {&nm_forward<acc_t, kVecBytes, 4, 0>, &nm_forward<acc_t, kVecBytes, 4, 1>, &nm_forward<acc_t, kVecBytes, 4, 2>,
      &nm_forward<acc_t, kVecBytes, 4, 4>},
     {&nm_forward<acc_t, kVecBytes, 8, 0>, &nm_forward<acc_t, kVecBytes, 8, 1>, &nm_forward<acc_t, kVecBytes, 8, 2>,
      &nm_forward<acc_t, kVecBytes, 8, 4>}},
    {{&nm_grad_input<acc_t, kVecBytes, 1, 0>, &nm_grad_input<acc_t, kVecBytes, 1, 1>,
      &nm_grad_input<acc_t, kVecBytes, 1, 2>, &nm_grad_input<acc_t, kVecBytes, 1, 4>},
     {&nm_grad_input<acc_t, kVecBytes, 2, 0>, &nm_grad_input<acc_t, kVecBytes, 2, 1>,
      &nm_grad_input<acc_t, kVecBytes, 2, 2>, &nm_grad_input<acc_t, kVecBytes, 2, 4>},
     {&nm_grad_input<acc_t, kVecBytes, 4, 0>, &nm_grad_input<acc_t, kVecBytes, 4, 1>,
      &nm_grad_input<acc_t, kVecBytes, 4, 2>, &nm_grad_input<acc_t, kVecBytes, 4, 4>},
     {&nm_grad_input<acc_t, kVecBytes, 8, 0>, &nm_grad_input<acc_t, kVecBytes, 8, 1>,
      &nm_grad_input<acc_t, kVecBytes, 8, 2>, &nm_grad_input<acc_t, kVecBytes, 8, 4>}},
    {&nm_grad_values<acc_t, kVecBytes, 1>, &nm_grad_values<acc_t, kVecBytes, 2>, &nm_grad_values<acc_t, kVecBytes, 4>,
     &nm_grad_values<acc_t, kVecBytes, 8>},
    {&pack<acc_t, kVecBytes, 1>, &pack<acc_t, kVecBytes, 2>, &pack<acc_t, kVecBytes, 4>, &pack<acc_t, kVecBytes, 8>},
    {&unpack<acc_t, kVecBytes, 1>, &unpack<acc_t, kVecBytes, 2>, &unpack<acc_t, kVecBytes, 4>,
     &unpack<acc_t, kVecBytes, 8>},
};
