// The interface between the csr_linear CPU op (csr_linear_cpu.cpp) and
// its inner kernels, which are compiled once per instruction set: for the
// baseline x86-64 ISA (SSE2, the wheel runs anywhere) in csr_linear_cpu.cpp
// and, on x86-64, for AVX2+FMA in sparse_formats_avx2.cpp; the op picks one at
// run time. Only plain structs and function pointers cross that boundary, so
// no inline function is ever compiled for two instruction sets under one name.
//
// Layout. A dense operand (x, grad_out) is packed "batch-contiguous" in tiles
// of T batch rows: tile t holds rows [t*T, t*T+T) as a [features][T] matrix
// (rows past the batch are zero), so each nonzero of the weight reads one
// contiguous run of T values and T accumulators stay in vector registers.
// T is kVecs vectors of the accumulation type (float for float/bf16/half,
// double for double); the op picks kVecs in {1, 2, 4, 8} from the batch.
#pragma once

#include <cstdint>

namespace sparsesam::cpu {

// One sparse-times-tile product, out[i][:] = init_i + sum_j val[j] * in[idx[j]][:]
// for the rows i in [row_begin, row_end) of a compressed-row matrix (CSR for
// the forward, the transposed index for dx). init_i is bias[i] (or 0 when
// bias is null). Entries are visited in blocks of col_block columns (of the
// `in` tile), so the part of the tile one block reads stays in cache while
// every row of the range passes over it; cursor (row_end - row_begin ints)
// is scratch for where each row stands. Rows whose columns are not sorted
// are still summed exactly once, only less cache-friendly.
template <typename acc_t>
struct SpmmTask {
  const acc_t* in;        // packed tile, [in_rows][T]
  const int32_t* ptr;     // row offsets (indexed by the absolute row)
  const int32_t* idx;     // column of each entry, i.e. a row of `in`
  const acc_t* val;       // value of each entry (same order as idx)
  const acc_t* bias;      // per-row start value, or nullptr
  int64_t row_begin, row_end;
  int64_t in_rows;
  int64_t col_block;
  int32_t* cursor;
  acc_t* out;             // [row_end - row_begin][T]
};

// The sampled dense-dense product that gives the weight gradient at kept
// entries only: for every entry j of the rows in [row_begin, row_end),
// dval[j] (+)= sum_b left[row(j)][b] * right[idx[j]][b] over one tile's T
// batch lanes. `accumulate` false overwrites (the first tile).
template <typename acc_t>
struct SddmmTask {
  const acc_t* left;      // packed grad_out tile, [rows][T]
  const acc_t* right;     // packed x tile, [in_rows][T]
  const int32_t* ptr;
  const int32_t* idx;
  int64_t row_begin, row_end;
  int64_t in_rows;
  int64_t col_block;
  int32_t* cursor;
  acc_t* dval;            // indexed by entry position
  bool accumulate;
};

// Packing a [rows][cols] row-major block (row stride ld, unit column stride)
// into one tile: dst[c][r] = src[r][c] for r < rows (<= T), 0 for rows <= r < T,
// c in [col_begin, col_end); dst is the tile base ([cols][T]).
template <typename acc_t>
struct PackTask {
  const acc_t* src;
  int64_t ld;
  int64_t rows;
  int64_t col_begin, col_end;
  acc_t* dst;
};

// The inverse for results: dst[b][c] = src[c][b] for b < rows, c < cols,
// where src is [cols][T] (a task's scratch) and dst has row stride ld.
template <typename acc_t>
struct UnpackTask {
  const acc_t* src;
  int64_t rows;
  int64_t cols;
  acc_t* dst;
  int64_t ld;
};

// One instruction set's kernels for one accumulation type; index k of each
// array is the variant with kVecs = 1 << k vectors per tile.
template <typename acc_t>
struct CSRLinearKernels {
  const char* isa;
  int lanes;  // acc_t values per vector
  void (*spmm[4])(const SpmmTask<acc_t>&);
  void (*sddmm[4])(const SddmmTask<acc_t>&);
  void (*pack[4])(const PackTask<acc_t>&);
  void (*unpack[4])(const UnpackTask<acc_t>&);
};

// The AVX2+FMA kernels (nullptr where they are not compiled: not x86-64, or
// a compiler without target pragmas). Whether the CPU runs them is the
// caller's question.
const CSRLinearKernels<float>* csr_linear_kernels_avx2_f32();
const CSRLinearKernels<double>* csr_linear_kernels_avx2_f64();

}  // namespace sparsesam::cpu
