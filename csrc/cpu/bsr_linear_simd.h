// The interface between the bsr_linear CPU op (bsr_linear_cpu.cpp) and its
// inner kernels, compiled once per instruction set like csr_linear's: for
// the baseline ISA in bsr_linear_cpu.cpp and, on x86-64, for AVX2+FMA in
// sparse_formats_avx2.cpp; the op picks one at run time. Only plain structs and
// function pointers cross that boundary.
//
// Layout: the dense operands (x, grad_out) are packed batch-contiguous in
// tiles of T batch rows exactly as for csr_linear (PackTask / UnpackTask
// of csr_linear_simd.h, whose pack and unpack kernels are reused), so a
// block's bw (or bh) consecutive features are one contiguous [bw][T] run.
#pragma once

#include <cstdint>

#include "csr_linear_simd.h"

namespace sparsesam::cpu {

// One block-sparse-times-tile product over a range of block lines:
//   out[l*out_block + o][:] = init + sum over line l's blocks j, over k < red_block of
//                             w_j[o*w_out_stride + k*w_red_stride] * in[idx[j]*red_block + k][:]
// for the lines l in [line_begin, line_end), where w_j is the block at
// val + (pos ? pos[j] : j) * out_block * red_block. The forward runs it over
// the BSR (lines = block rows, out_block = bh, red_block = bw, strides
// (bw, 1), operand x); dx over the transposed block index (lines = block
// columns, out_block = bw, red_block = bh, strides (1, bw), operand grad_out,
// blocks read through bsr_positions). init is bias[l*out_block + o] (or 0).
template <typename acc_t>
struct BlockSpmmTask {
  const acc_t* in;   // packed tile, [features][T]
  const int32_t* ptr;  // block offsets per line (indexed by the absolute line)
  const int32_t* idx;  // the other block coordinate of each block
  const int32_t* pos;  // where each block sits in val, or nullptr (in order)
  const acc_t* val;    // (nblocks, bh, bw) contiguous
  const acc_t* bias;   // per output feature, or nullptr
  int64_t line_begin, line_end;
  int64_t out_block, red_block;
  int64_t w_out_stride, w_red_stride;
  acc_t* out;  // [(line_end - line_begin) * out_block][T]
};

// The weight gradient at kept blocks only (a block SDDMM): for every block j
// of the block rows in [row_begin, row_end), at block column idx[j],
//   dval[j][i][c] = sum over all batch tiles t and lanes b of
//                   left_t[row*bh + i][b] * right_t[idx[j]*bw + c][b].
// Every tile is summed inside the task, so each value is written once.
template <typename acc_t>
struct BlockSddmmTask {
  const acc_t* left;   // packed grad_out, tiles of [out_features][T]
  const acc_t* right;  // packed x, tiles of [in_features][T]
  int64_t tiles;
  int64_t left_tile_stride, right_tile_stride;  // elements between tiles
  const int32_t* ptr;
  const int32_t* idx;
  int64_t row_begin, row_end;
  int64_t bh, bw;
  acc_t* dval;  // (nblocks, bh, bw)
};

// One instruction set's kernels for one accumulation type; index k of each
// array is the variant with kVecs = 1 << k vectors per tile.
template <typename acc_t>
struct BsrLinearKernels {
  const char* isa;
  int lanes;
  void (*spmm[4])(const BlockSpmmTask<acc_t>&);
  void (*sddmm[4])(const BlockSddmmTask<acc_t>&);
  void (*pack[4])(const PackTask<acc_t>&);
  void (*unpack[4])(const UnpackTask<acc_t>&);
};

// The AVX2+FMA kernels (nullptr where they are not compiled).
const BsrLinearKernels<float>* bsr_linear_kernels_avx2_f32();
const BsrLinearKernels<double>* bsr_linear_kernels_avx2_f64();

}  // namespace sparsesam::cpu
