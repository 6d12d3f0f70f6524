// The interface between the nm_linear CPU op (nm_linear_cpu.cpp) and its
// inner kernels (nm_linear_kernels.h), compiled once per instruction set
// like csr_linear's (see csr_linear_simd.h, whose packed layout, pack
// and unpack kernels this reuses): the baseline ISA in nm_linear_cpu.cpp,
// AVX2+FMA in sparse_formats_avx2.cpp. Only plain structs and function pointers
// cross the boundary.
//
// Weight layout (sparsesam/sparse/nm.py): row r holds K = groups * n entries,
// group after group; entry e of row r is at input column (e / n) * m +
// idx[r * K + e]. Dense operands are packed batch-contiguous in tiles of T
// batch rows ([features][T] per tile; csr_linear_simd.h).
#pragma once

#include <cstdint>

#include "csr_linear_simd.h"

namespace sparsesam::cpu {

// Forward for output rows [row_begin, row_end) and one batch tile:
// out[i][:] = init_i + sum over row i's entries of val * in[column][:],
// init_i = bias[row] (or 0). Groups are visited in blocks of group_block
// (the packed slice a block reads stays in cache while all rows pass).
template <typename acc_t>
struct NMForwardTask {
  const acc_t* in;       // packed x tile, [in_features][T]
  const uint8_t* idx;    // [out_features][K]
  const acc_t* val;      // [out_features][K]
  const acc_t* bias;     // or nullptr
  int64_t row_begin, row_end;
  int64_t groups;
  int n, m;
  int64_t group_block;
  acc_t* out;            // [row_end - row_begin][T]
};

// dx for the input groups [group_begin, group_end) and one batch tile:
// out[c][:] = sum over every output row r and its entries in those groups at
// column c of val * grad[r][:]. A task owns its columns, so no atomics.
template <typename acc_t>
struct NMGradInputTask {
  const acc_t* grad;     // packed grad_out tile, [out_features][T]
  const uint8_t* idx;
  const acc_t* val;
  int64_t rows;          // out_features
  int64_t groups;
  int64_t group_begin, group_end;
  int n, m;
  acc_t* out;            // [(group_end - group_begin) * m][T], overwritten
};

// The weight gradient at kept entries only (an SDDMM) for output rows
// [row_begin, row_end) and one batch tile: dval[r][e] (+)= sum_b
// left[r][b] * right[column(r, e)][b]. `accumulate` false overwrites.
template <typename acc_t>
struct NMGradValuesTask {
  const acc_t* left;     // packed grad_out tile, [out_features][T]
  const acc_t* right;    // packed x tile, [in_features][T]
  const uint8_t* idx;
  int64_t row_begin, row_end;
  int64_t groups;
  int n, m;
  int64_t group_block;
  int32_t* columns;      // scratch: 2 * group_block * n ints
  acc_t* dval;           // [out_features][K]
  bool accumulate;
};

// One ISA's kernels for one accumulation type. Index [k] is the variant with
// kVecs = 1 << k vectors per tile; forward and grad_input have one variant
// per n in {any, 1, 2, 4} ([k][nm_variant(n)]): their group loops are
// unrolled over the n entries of a group where n is known at compile time.
template <typename acc_t>
struct NMLinearKernels {
  const char* isa;
  int lanes;
  void (*forward[4][4])(const NMForwardTask<acc_t>&);
  void (*grad_input[4][4])(const NMGradInputTask<acc_t>&);
  void (*grad_values[4])(const NMGradValuesTask<acc_t>&);
  void (*pack[4])(const PackTask<acc_t>&);
  void (*unpack[4])(const UnpackTask<acc_t>&);
};

inline int nm_variant(int n) { return n == 1 ? 1 : n == 2 ? 2 : n == 4 ? 3 : 0; }

// The AVX2+FMA kernels, or nullptr where they are not compiled.
const NMLinearKernels<float>* nm_linear_kernels_avx2_f32();
const NMLinearKernels<double>* nm_linear_kernels_avx2_f64();

}  // namespace sparsesam::cpu
