// The inner kernels of bsr_linear on CPU (contracts in bsr_linear_simd.h).
//
// Like csr_linear_kernels.h, this header is included INSIDE a namespace by
// each instruction-set translation unit, after csr_linear_simd.h,
// bsr_linear_simd.h and csr_linear_kernels.h (whose Simd helpers and
// pack / unpack kernels it reuses, read-only), and includes nothing itself.
//
// Why blocks are faster than CSR here: a CSR entry costs one broadcast of its
// value and one load of the activations it multiplies, per FMA. A kept bh x bw
// block is a small dense product: the micro-kernel holds an R x V register
// tile (R outputs of the block, V vectors of batch lanes) while the block
// line's blocks stream by, so each activation vector loaded serves R
// outputs, and one index entry serves bh * bw weights. R x V is 4 x 2 (8
// independent FMA chains) where the block has 4 or more rows, else 1 x
// kVecs (the CSR shape, for 1 x bw blocks). The weight gradient is a
// 2 x 4 (or 1 x 4, 1 x 1) tile of dot products over the batch, reduced
// across lanes once per block with an in-register lane reduction.

// R outputs [o0, o0 + R) of block line `line`, batch vectors [v0, v0 + V)
// of the tile, summed over every block of the line.
template <typename acc_t, int kVecBytes, int kVecs, int R, int V>
inline void block_spmm_micro(const BlockSpmmTask<acc_t>& t, int64_t line, int64_t o0, int v0) {
  using S = Simd<acc_t, kVecBytes>;
  using vec = typename S::vec;
  constexpr int L = S::kLanes;
  constexpr int64_t T = int64_t(L) * kVecs;
  const int64_t bs = t.out_block * t.red_block, red = t.red_block;
  const int64_t so = t.w_out_stride, sr = t.w_red_stride;
  const acc_t* __restrict val = t.val;
  const acc_t* __restrict in = t.in + v0 * L;
  vec acc[R][V];
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r) {
    const vec init = S::splat(t.bias != nullptr ? t.bias[line * t.out_block + o0 + r] : acc_t(0));
#pragma GCC unroll 8
    for (int v = 0; v < V; ++v) acc[r][v] = init;
  }
  const int64_t end = t.ptr[line + 1];
  for (int64_t j = t.ptr[line]; j < end; ++j) {
    const int64_t blk = t.pos != nullptr ? int64_t(t.pos[j]) : j;
    const acc_t* __restrict w = val + blk * bs + o0 * so;
    const acc_t* __restrict x = in + int64_t(t.idx[j]) * red * T;
    for (int64_t k = 0; k < red; ++k) {
      vec xv[V];
#pragma GCC unroll 8
      for (int v = 0; v < V; ++v) xv[v] = S::load(x + k * T + v * L);
#pragma GCC unroll 8
      for (int r = 0; r < R; ++r) {
        const vec wr = S::splat(w[r * so + k * sr]);
#pragma GCC unroll 8
        for (int v = 0; v < V; ++v) acc[r][v] += wr * xv[v];
      }
    }
  }
  acc_t* out = t.out + ((line - t.line_begin) * t.out_block + o0) * T + v0 * L;
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r) {
#pragma GCC unroll 8
    for (int v = 0; v < V; ++v) S::store(out + r * T + v * L, acc[r][v]);
  }
}

template <typename acc_t, int kVecBytes, int kVecs>
void block_spmm(const BlockSpmmTask<acc_t>& t) {
  // Register tiles of R rows x 2 vectors: 6 x 2 (12 chains, 8 loads per 12
  // FMAs, the shape of the classic 6x16 GEMM kernel) while 10 or more rows
  // (or exactly 6) remain, then 4 x 2, then one row at a time over the whole
  // tile (the CSR shape): 16 rows go 6 + 6 + 4, 32 go 6 x 4 + 4 + 4, 8 go 4 + 4.
  // A 1-vector tile takes 8 (then 4) rows at once instead.
  constexpr int kV = kVecs >= 2 ? 2 : 1;
  constexpr int kR = kVecs >= 2 ? 4 : 8;
  for (int64_t line = t.line_begin; line < t.line_end; ++line) {
    int64_t o0 = 0;
    if constexpr (kVecs >= 2) {
      for (; t.out_block - o0 >= 10 || t.out_block - o0 == 6; o0 += 6) {
        for (int v0 = 0; v0 < kVecs; v0 += kV) block_spmm_micro<acc_t, kVecBytes, kVecs, 6, kV>(t, line, o0, v0);
      }
    }
    for (; o0 + kR <= t.out_block; o0 += kR) {
      for (int v0 = 0; v0 < kVecs; v0 += kV) block_spmm_micro<acc_t, kVecBytes, kVecs, kR, kV>(t, line, o0, v0);
    }
    if constexpr (kR > 4) {
      for (; o0 + 4 <= t.out_block; o0 += 4) block_spmm_micro<acc_t, kVecBytes, kVecs, 4, kV>(t, line, o0, 0);
    }
    for (; o0 < t.out_block; ++o0) block_spmm_micro<acc_t, kVecBytes, kVecs, 1, kVecs>(t, line, o0, 0);
  }
}

// dval of block j, rows [i0, i0 + RI), columns [c0, c0 + CJ): dot products
// over every tile's lanes, then one lane reduction.
template <typename acc_t, int kVecBytes, int kVecs, int RI, int CJ>
inline void block_sddmm_micro(const BlockSddmmTask<acc_t>& t, int64_t j, int64_t row, int64_t i0, int64_t c0) {
  using S = Simd<acc_t, kVecBytes>;
  using vec = typename S::vec;
  constexpr int L = S::kLanes;
  constexpr int64_t T = int64_t(L) * kVecs;
  const acc_t* __restrict g = t.left + (row * t.bh + i0) * T;
  const acc_t* __restrict x = t.right + (int64_t(t.idx[j]) * t.bw + c0) * T;
  vec acc[RI * CJ];
#pragma GCC unroll 8
  for (int a = 0; a < RI * CJ; ++a) acc[a] = vec{};
  for (int64_t tile = 0; tile < t.tiles; ++tile) {
    const acc_t* __restrict gt = g + tile * t.left_tile_stride;
    const acc_t* __restrict xt = x + tile * t.right_tile_stride;
#pragma GCC unroll 8
    for (int v = 0; v < kVecs; ++v) {
      vec gv[RI], xv[CJ];
#pragma GCC unroll 8
      for (int r = 0; r < RI; ++r) gv[r] = S::load(gt + r * T + v * L);
#pragma GCC unroll 8
      for (int c = 0; c < CJ; ++c) xv[c] = S::load(xt + c * T + v * L);
#pragma GCC unroll 8
      for (int r = 0; r < RI; ++r) {
#pragma GCC unroll 8
        for (int c = 0; c < CJ; ++c) acc[r * CJ + c] += gv[r] * xv[c];
      }
    }
  }
  acc_t* __restrict out = t.dval + j * t.bh * t.bw + i0 * t.bw + c0;
  if constexpr (RI * CJ == L) {
    const vec sums = S::lane_sums(acc);
#pragma GCC unroll 8
    for (int r = 0; r < RI; ++r) {
#pragma GCC unroll 8
      for (int c = 0; c < CJ; ++c) out[r * t.bw + c] = sums[r * CJ + c];
    }
  } else {
#pragma GCC unroll 8
    for (int r = 0; r < RI; ++r) {
#pragma GCC unroll 8
      for (int c = 0; c < CJ; ++c) out[r * t.bw + c] = S::sum(acc[r * CJ + c]);
    }
  }
}

template <typename acc_t, int kVecBytes, int kVecs>
void block_sddmm(const BlockSddmmTask<acc_t>& t) {
  for (int64_t row = t.row_begin; row < t.row_end; ++row) {
    for (int64_t j = t.ptr[row]; j < t.ptr[row + 1]; ++j) {
      int64_t i0 = 0;
      for (; i0 + 2 <= t.bh; i0 += 2) {
        int64_t c0 = 0;
        for (; c0 + 4 <= t.bw; c0 += 4) block_sddmm_micro<acc_t, kVecBytes, kVecs, 2, 4>(t, j, row, i0, c0);
        for (; c0 < t.bw; ++c0) block_sddmm_micro<acc_t, kVecBytes, kVecs, 2, 1>(t, j, row, i0, c0);
      }
      for (; i0 < t.bh; ++i0) {  // an odd last row (or 1 x bw blocks)
        int64_t c0 = 0;
        for (; c0 + 8 <= t.bw; c0 += 8) block_sddmm_micro<acc_t, kVecBytes, kVecs, 1, 8>(t, j, row, i0, c0);
        for (; c0 + 4 <= t.bw; c0 += 4) block_sddmm_micro<acc_t, kVecBytes, kVecs, 1, 4>(t, j, row, i0, c0);
        for (; c0 < t.bw; ++c0) block_sddmm_micro<acc_t, kVecBytes, kVecs, 1, 1>(t, j, row, i0, c0);
      }
    }
  }
}

// The table of this ISA's kernels (constexpr data: reading it runs no code of this ISA).
template <typename acc_t, int kVecBytes>
inline constexpr BsrLinearKernels<acc_t> kBsrLinearKernels = {
    SPARSESAM_SPARSE_LINEAR_ISA,
    Simd<acc_t, kVecBytes>::kLanes,
    {&block_spmm<acc_t, kVecBytes, 1>, &block_spmm<acc_t, kVecBytes, 2>, &block_spmm<acc_t, kVecBytes, 4>,
     &block_spmm<acc_t, kVecBytes, 8>},
    {&block_sddmm<acc_t, kVecBytes, 1>, &block_sddmm<acc_t, kVecBytes, 2>, &block_sddmm<acc_t, kVecBytes, 4>,
     &block_sddmm<acc_t, kVecBytes, 8>},
    {&pack<acc_t, kVecBytes, 1>, &pack<acc_t, kVecBytes, 2>, &pack<acc_t, kVecBytes, 4>, &pack<acc_t, kVecBytes, 8>},
    {&unpack<acc_t, kVecBytes, 1>, &unpack<acc_t, kVecBytes, 2>, &unpack<acc_t, kVecBytes, 4>,
     &unpack<acc_t, kVecBytes, 8>},
};
