// bsr_linear on CPU: y = x W^T + b with W kept only at whole bh x bw blocks
// (BSR, a fixed block-structured mask), and its backward: dx through the
// precomputed transposed block index (no atomics, no scatter-add) and dW at
// kept blocks only (a block SDDMM).
//
// The passes have csr_linear's shape (csr_linear_cpu.cpp): the dense
// operands are packed batch-contiguous in tiles of T batch rows (reusing
// csr_linear's pack / unpack kernels); the block lines (block rows for the
// forward and dW, block columns for dx) are cut into tasks of about equal
// cost (kept blocks), and one parallel region runs first the packing tasks,
// then the compute tasks, threads taking each next task from a shared
// counter. A forward / dx task runs the block micro-kernel
// (bsr_linear_kernels.h) for every batch tile into a per-thread scratch and
// writes its outputs straight back to row-major order. A dW task sums every
// tile for each of its blocks, so each gradient value is written once.
//
// float, bfloat16 and half accumulate in float (bf16/half widened on the way
// in, rounded once on the way out); double in double. Results do not depend
// on the thread count: every output value is summed by one task in a fixed
// order. Offsets are checked before anything runs; each task checks the
// block indices it reads through, and the op raises afterwards if any was
// out of range.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <thread>
#include <type_traits>
#include <utility>
#include <vector>

#include "../common/masked_layers.h"
#include "sparse_matmul_common.h"
#include "bsr_linear_simd.h"
#include "csr_linear_simd.h"

namespace sparsesam::cpu {

// The baseline-ISA build of the kernels (SSE2 on x86-64, 16-byte vectors).
namespace bsr_baseline {
#define SPARSESAM_SPARSE_LINEAR_ISA "baseline"
#include "csr_linear_kernels.h"
#include "bsr_linear_kernels.h"
#undef SPARSESAM_SPARSE_LINEAR_ISA
}  // namespace bsr_baseline

namespace {

// Output features of one task at most (its scratch is that many x T
// accumulators), unless a single block line is longer.
constexpr int64_t kMaxTaskRows = 512;
// Tasks per thread (about): enough for the shared counter to even out a
// noisy machine.
constexpr int64_t kTasksPerThread = 4;
// The fixed cost of one output feature (start value, store, unpack), in weights.
constexpr int64_t kRowCost = 4;
// Features per packing task.
constexpr int64_t kPackColumns = 256;

template <typename acc_t>
const BsrLinearKernels<acc_t>& kernels() {
  const BsrLinearKernels<acc_t>* avx2 = nullptr;
  if constexpr (std::is_same_v<acc_t, float>) {
    avx2 = bsr_linear_kernels_avx2_f32();
  } else {
    avx2 = bsr_linear_kernels_avx2_f64();
  }
  if (avx2 != nullptr && cpu_runs_avx2()) return *avx2;
  return bsr_baseline::kBsrLinearKernels<acc_t, 16>;
}

// --- Checks -------------------------------------------------------------------

struct Pattern {
  int64_t block_rows, block_cols, nblocks, bh, bw;
  int64_t out_features() const { return block_rows * bh; }
  int64_t in_features() const { return block_cols * bw; }
};

// Shapes and dtypes of the values and the index, offsets of the halves a pass reads.
Pattern check_pattern(const at::Tensor& values, const at::Tensor& crow, const at::Tensor& col,
                      const at::Tensor& ccol, const at::Tensor& row, const at::Tensor& pos, bool bsr,
                      bool transposed) {
  TORCH_CHECK_VALUE(values.dim() == 3 && values.size(1) >= 1 && values.size(2) >= 1,
                    "bsr_linear: values must be 3-D (nblocks, bh, bw) with bh, bw >= 1, got shape ", values.sizes());
  TORCH_CHECK_VALUE(crow.dim() == 1 && crow.numel() >= 1, "bsr_linear: crow_indices must be 1-D and non-empty");
  TORCH_CHECK_VALUE(ccol.dim() == 1 && ccol.numel() >= 1, "bsr_linear: ccol_indices must be 1-D and non-empty");
  const Pattern p{crow.numel() - 1, ccol.numel() - 1, values.size(0), values.size(1), values.size(2)};
  TORCH_CHECK_VALUE(p.nblocks < (int64_t(1) << 31) && p.out_features() < (int64_t(1) << 31) &&
                        p.in_features() < (int64_t(1) << 31),
                    "bsr_linear: int32 indices need fewer than 2^31 blocks and features");
  check_index_tensor("bsr_linear", crow, "crow_indices", p.block_rows + 1);
  check_index_tensor("bsr_linear", col, "col_indices", p.nblocks);
  check_index_tensor("bsr_linear", ccol, "ccol_indices", p.block_cols + 1);
  check_index_tensor("bsr_linear", row, "row_indices", p.nblocks);
  check_index_tensor("bsr_linear", pos, "bsr_positions", p.nblocks);
  if (bsr) check_offsets("bsr_linear", crow, "crow_indices", p.nblocks, "nblocks");
  if (transposed) check_offsets("bsr_linear", ccol, "ccol_indices", p.nblocks, "nblocks");
  return p;
}

// --- Planning -----------------------------------------------------------------

// The tile: kVecs = 1 << vecs_log2 vectors, the smallest that covers the batch, at most 8.
struct Tiling {
  int vecs_log2;
  int64_t width;  // T
  int64_t count;  // batch tiles
};

Tiling plan_tiles(int64_t batch, int lanes) {
  int lg = 0;
  while (lg < 3 && (int64_t(lanes) << lg) < batch) ++lg;
  const int64_t width = int64_t(lanes) << lg;
  return {lg, width, (batch + width - 1) / width};
}

// Boundaries of consecutive block-line ranges of about equal cost (kept
// weights plus kRowCost per output feature), at most kMaxTaskRows output
// features each (but at least one line).
std::vector<int64_t> split_lines(const int32_t* ptr, int64_t lines, int64_t block_elems, int64_t out_block) {
  std::vector<int64_t> bounds{0};
  if (lines == 0) return bounds;
  const auto cost = [&](int64_t a, int64_t b) {
    return (int64_t(ptr[b]) - ptr[a]) * block_elems + kRowCost * out_block * (b - a);
  };
  const int64_t parts = std::max<int64_t>(1, int64_t(at::get_num_threads()) * kTasksPerThread);
  const int64_t target = std::max<int64_t>(1, (cost(0, lines) + parts - 1) / parts);
  const int64_t max_lines = std::max<int64_t>(1, kMaxTaskRows / out_block);
  int64_t start = 0;
  for (int64_t l = 1; l <= lines; ++l) {
    if (l == lines || cost(start, l) >= target || l - start >= max_lines) {
      bounds.push_back(l);
      start = l;
    }
  }
  return bounds;
}

int64_t widest_task(const std::vector<int64_t>& bounds) {
  int64_t widest = 0;
  for (size_t i = 0; i + 1 < bounds.size(); ++i) widest = std::max(widest, bounds[i + 1] - bounds[i]);
  return widest;
}

// Packing tasks: a [batch][cols] row-major matrix (row stride ld) into tiles
// packed[t] = [cols][T]; one task per tile and kPackColumns columns.
template <typename acc_t>
struct Packing {
  const BsrLinearKernels<acc_t>* k;
  Tiling tiling;
  const acc_t* src;
  int64_t ld, batch, cols;
  acc_t* packed;

  int64_t chunks() const { return (cols + kPackColumns - 1) / kPackColumns; }
  int64_t tasks() const { return packed == nullptr ? 0 : tiling.count * chunks(); }
  void run(int64_t i) const {
    const int64_t tile = i / chunks(), c0 = (i % chunks()) * kPackColumns;
    const int64_t b0 = tile * tiling.width;
    k->pack[tiling.vecs_log2](PackTask<acc_t>{src + b0 * ld, ld, std::min(tiling.width, batch - b0), c0,
                                              std::min(cols, c0 + kPackColumns), packed + tile * cols * tiling.width});
  }
};

const int32_t* index(const at::Tensor& t) { return t.const_data_ptr<int32_t>(); }

// --- Forward ----------------------------------------------------------------------

template <typename acc_t>
void forward(const at::Tensor& x2, const at::Tensor& values, const at::Tensor& crow, const at::Tensor& col,
             const acc_t* bias, const Pattern& p, at::Tensor& y2) {
  const BsrLinearKernels<acc_t>& k = kernels<acc_t>();
  const int64_t batch = x2.size(0), n_in = p.in_features(), n_out = p.out_features();
  const Tiling tiling = plan_tiles(batch, k.lanes);
  const int64_t T = tiling.width;
  at::Tensor packed = at::empty({tiling.count * n_in * T}, y2.options());
  const Packing<acc_t> pack{&k, tiling, data<acc_t>(x2), row_stride(x2), batch, n_in,
                            packed.mutable_data_ptr<acc_t>()};
  const std::vector<int64_t> bounds = split_lines(index(crow), p.block_rows, p.bh * p.bw, p.bh);
  acc_t* y = y2.mutable_data_ptr<acc_t>();
  const int32_t* offsets = index(crow);
  const int32_t* cols = index(col);
  const acc_t* val = data<acc_t>(values);
  const acc_t* x_base = data<acc_t>(packed);
  std::atomic<bool> failed{false}, bad_index{false};
  run_phases<acc_t>(
      pack.tasks(), [&](int64_t i) { pack.run(i); }, int64_t(bounds.size()) - 1, widest_task(bounds) * p.bh * T,
      [&](int64_t task, acc_t* scratch) {
        const int64_t l0 = bounds[task], l1 = bounds[task + 1];
        if (!indices_below(cols, offsets[l0], offsets[l1], p.block_cols)) {
          bad_index = true;
          return;
        }
        for (int64_t tile = 0; tile < tiling.count; ++tile) {
          k.spmm[tiling.vecs_log2](BlockSpmmTask<acc_t>{x_base + tile * n_in * T, offsets, cols, nullptr, val, bias,
                                                        l0, l1, p.bh, p.bw, p.bw, 1, scratch});
          const int64_t b0 = tile * T;
          k.unpack[tiling.vecs_log2](
              UnpackTask<acc_t>{scratch, std::min(T, batch - b0), (l1 - l0) * p.bh, y + b0 * n_out + l0 * p.bh, n_out});
        }
      },
      failed);
  TORCH_CHECK_VALUE(!bad_index, "bsr_linear: every entry of col_indices must lie in [0, in_features / bw = ",
                    p.block_cols, ")");
  TORCH_CHECK(!failed, "bsr_linear: a CPU task failed");
}

// --- Backward ---------------------------------------------------------------------

template <typename acc_t>
void backward(const at::Tensor& g2, const at::Tensor& x, const at::Tensor& values, const at::Tensor& crow,
              const at::Tensor& col, const at::Tensor& ccol, const at::Tensor& row, const at::Tensor& pos,
              const Pattern& p, at::Tensor& dx2, at::Tensor& dval) {
  const bool want_dx = dx2.defined(), want_dval = dval.defined();
  const BsrLinearKernels<acc_t>& k = kernels<acc_t>();
  const at::ScalarType acc = c10::CppTypeToScalarType<acc_t>::value;
  const at::TensorOptions opts = g2.options();
  const int64_t batch = g2.size(0), n_in = p.in_features(), n_out = p.out_features();
  const Tiling tiling = plan_tiles(batch, k.lanes);
  const int64_t T = tiling.width;

  // Phase 1: pack grad_out (read by both gradients) and x (by dW only).
  at::Tensor packed_g = at::empty({tiling.count * n_out * T}, opts);
  const Packing<acc_t> pack_g{&k, tiling, data<acc_t>(g2), row_stride(g2), batch, n_out,
                              packed_g.mutable_data_ptr<acc_t>()};
  at::Tensor x2, packed_x;
  Packing<acc_t> pack_x{&k, tiling, nullptr, 0, batch, n_in, nullptr};
  if (want_dval) {
    x2 = rows_in(x, acc);
    packed_x = at::empty({tiling.count * n_in * T}, opts);
    pack_x.src = data<acc_t>(x2);
    pack_x.ld = row_stride(x2);
    pack_x.packed = packed_x.mutable_data_ptr<acc_t>();
  }
  const int64_t n_pack = pack_g.tasks() + pack_x.tasks();

  // Phase 2: dx tasks own ranges of block columns (lines of the transposed
  // index: each dx value is summed by one task, no atomics); dW tasks own
  // ranges of block rows.
  const int64_t bs = p.bh * p.bw;
  const std::vector<int64_t> dx_bounds =
      want_dx ? split_lines(index(ccol), p.block_cols, bs, p.bw) : std::vector<int64_t>{0};
  const std::vector<int64_t> dw_bounds =
      want_dval ? split_lines(index(crow), p.block_rows, bs, p.bh) : std::vector<int64_t>{0};
  const int64_t dx_tasks = int64_t(dx_bounds.size()) - 1, dw_tasks = int64_t(dw_bounds.size()) - 1;
  const acc_t* val = want_dx ? data<acc_t>(values) : nullptr;
  acc_t* dx = want_dx ? dx2.mutable_data_ptr<acc_t>() : nullptr;
  acc_t* dv = want_dval ? dval.mutable_data_ptr<acc_t>() : nullptr;
  const int32_t *crow_p = index(crow), *col_p = index(col), *ccol_p = index(ccol), *row_p = index(row),
                *pos_p = index(pos);
  const acc_t* g_base = data<acc_t>(packed_g);
  const acc_t* x_base = want_dval ? data<acc_t>(packed_x) : nullptr;

  std::atomic<bool> failed{false}, bad_index{false};
  run_phases<acc_t>(
      n_pack,
      [&](int64_t i) {
        if (i < pack_g.tasks()) {
          pack_g.run(i);
        } else {
          pack_x.run(i - pack_g.tasks());
        }
      },
      dx_tasks + dw_tasks, want_dx ? widest_task(dx_bounds) * p.bw * T : 0,
      [&](int64_t task, acc_t* scratch) {
        if (task < dx_tasks) {
          const int64_t c0 = dx_bounds[task], c1 = dx_bounds[task + 1];
          const int64_t j0 = ccol_p[c0], j1 = ccol_p[c1];
          if (!indices_below(row_p, j0, j1, p.block_rows) || !indices_below(pos_p, j0, j1, p.nblocks)) {
            bad_index = true;
            return;
          }
          for (int64_t tile = 0; tile < tiling.count; ++tile) {
            k.spmm[tiling.vecs_log2](BlockSpmmTask<acc_t>{g_base + tile * n_out * T, ccol_p, row_p, pos_p, val,
                                                          nullptr, c0, c1, p.bw, p.bh, 1, p.bw, scratch});
            const int64_t b0 = tile * T;
            k.unpack[tiling.vecs_log2](
                UnpackTask<acc_t>{scratch, std::min(T, batch - b0), (c1 - c0) * p.bw, dx + b0 * n_in + c0 * p.bw, n_in});
          }
        } else {
          const int64_t r0 = dw_bounds[task - dx_tasks], r1 = dw_bounds[task - dx_tasks + 1];
          if (!indices_below(col_p, crow_p[r0], crow_p[r1], p.block_cols)) {
            bad_index = true;
            return;
          }
          k.sddmm[tiling.vecs_log2](BlockSddmmTask<acc_t>{g_base, x_base, tiling.count, n_out * T, n_in * T, crow_p,
                                                          col_p, r0, r1, p.bh, p.bw, dv});
        }
      },
      failed);
  TORCH_CHECK_VALUE(!bad_index, "bsr_linear_backward: an index is out of range: col_indices must lie in [0, ",
                    p.block_cols, "), row_indices in [0, ", p.block_rows, ") and bsr_positions in [0, ", p.nblocks, ")");
  TORCH_CHECK(!failed, "bsr_linear_backward: a CPU task failed");
}

// --- The ops --------------------------------------------------------------------

// x's last dimension against in_features. The raw op learns the block width
// only from values' shape (the index holds block counts, not sizes), so a
// mismatch may be x's fault or values': the message names both.
void check_in_features(const char* op, const at::Tensor& x, const at::Tensor& values, const Pattern& p) {
  TORCH_CHECK_VALUE(x.dim() >= 1 && x.size(-1) == p.in_features(), op, ": x has shape ", x.sizes(),
                    " but in_features = ", p.block_cols, " block columns (ccol_indices) x bw = ", p.bw,
                    " (values.shape[2]) = ", p.in_features(), ": x or values' block shape (nblocks, bh, bw) = ",
                    values.sizes(), " is wrong");
}

at::Tensor bsr_linear(const at::Tensor& x, const at::Tensor& values, const at::Tensor& crow_indices,
                      const at::Tensor& col_indices, const at::Tensor& ccol_indices, const at::Tensor& row_indices,
                      const at::Tensor& bsr_positions, const std::optional<at::Tensor>& bias) {
  const Pattern p = check_pattern(values, crow_indices, col_indices, ccol_indices, row_indices, bsr_positions,
                                  /*bsr=*/true, /*transposed=*/false);
  check_in_features("bsr_linear", x, values, p);
  TORCH_CHECK_TYPE(values.scalar_type() == x.scalar_type(), "bsr_linear: values dtype ", values.scalar_type(),
                   " differs from x dtype ", x.scalar_type());
  const bool has_bias = bias.has_value() && bias->defined();
  if (has_bias) {
    TORCH_CHECK_VALUE(bias->dim() == 1 && bias->size(0) == p.out_features(), "bsr_linear: bias must have ",
                      p.out_features(), " entries, got shape ", bias->sizes());
    TORCH_CHECK_TYPE(bias->scalar_type() == x.scalar_type(), "bsr_linear: bias dtype differs from x dtype");
  }
  std::vector<int64_t> out_shape(x.sizes().begin(), x.sizes().end());
  out_shape.back() = p.out_features();
  at::Tensor y;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "bsr_linear_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const at::ScalarType acc = c10::CppTypeToScalarType<acc_t>::value;
    const at::Tensor x2 = rows_in(x, acc);
    const at::Tensor val = values.to(acc).contiguous();
    const at::Tensor b = has_bias ? bias->to(acc).contiguous() : at::Tensor();
    at::Tensor y2 = at::empty({x2.size(0), p.out_features()}, x.options().dtype(acc));
    if (x2.size(0) > 0 && p.out_features() > 0) {
      forward<acc_t>(x2, val, crow_indices, col_indices, has_bias ? data<acc_t>(b) : nullptr, p, y2);
    }
    y = y2.scalar_type() == x.scalar_type() ? y2 : y2.to(x.scalar_type());
  });
  return at::_unsafe_view(y, out_shape);
}

std::tuple<at::Tensor, at::Tensor> bsr_linear_backward(const at::Tensor& grad_out, const at::Tensor& x,
                                                       const at::Tensor& values, const at::Tensor& crow_indices,
                                                       const at::Tensor& col_indices, const at::Tensor& ccol_indices,
                                                       const at::Tensor& row_indices, const at::Tensor& bsr_positions,
                                                       std::array<bool, 2> output_mask) {
  const auto [want_dx, want_dvalues] = output_mask;
  // dx reads the transposed block index, dW the BSR.
  const Pattern p = check_pattern(values, crow_indices, col_indices, ccol_indices, row_indices, bsr_positions,
                                  /*bsr=*/want_dvalues, /*transposed=*/want_dx);
  check_in_features("bsr_linear_backward", x, values, p);
  std::vector<int64_t> out_shape(x.sizes().begin(), x.sizes().end());
  out_shape.back() = p.out_features();
  TORCH_CHECK_VALUE(grad_out.sizes() == at::IntArrayRef(out_shape), "bsr_linear_backward: grad_out has shape ",
                    grad_out.sizes(), ", expected ", at::IntArrayRef(out_shape));
  TORCH_CHECK_TYPE(grad_out.scalar_type() == x.scalar_type() && values.scalar_type() == x.scalar_type(),
                   "bsr_linear_backward: grad_out, x and values must have one dtype");
  at::Tensor dx = empty_output(x), dvalues = empty_output(values);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "bsr_linear_backward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const at::ScalarType acc = c10::CppTypeToScalarType<acc_t>::value;
    const at::Tensor g2 = rows_in(grad_out, acc);
    const at::TensorOptions opts = g2.options();
    const int64_t batch = g2.size(0);
    at::Tensor dx2 = want_dx ? at::empty({batch, p.in_features()}, opts) : at::Tensor();
    at::Tensor dval = want_dvalues ? at::empty({p.nblocks, p.bh, p.bw}, opts) : at::Tensor();
    if (batch > 0 && p.nblocks > 0 && (want_dx || want_dvalues)) {
      // Values are read for dx only (an unsaved placeholder otherwise).
      const at::Tensor val = want_dx ? values.to(acc).contiguous() : at::Tensor();
      backward<acc_t>(g2, x, val, crow_indices, col_indices, ccol_indices, row_indices, bsr_positions, p, dx2, dval);
    } else {
      if (want_dx) dx2.zero_();
      if (want_dvalues) dval.zero_();
    }
    if (want_dx) dx = at::_unsafe_view(dx2.scalar_type() == x.scalar_type() ? dx2 : dx2.to(x.scalar_type()), x.sizes());
    if (want_dvalues) dvalues = dval.scalar_type() == values.scalar_type() ? dval : dval.to(values.scalar_type());
  });
  return {dx, dvalues};
}

}  // namespace

TORCH_LIBRARY_IMPL(sparsesam, CPU, m) {
  m.impl("bsr_linear", &bsr_linear);
  m.impl("bsr_linear_backward", &bsr_linear_backward);
}

}  // namespace sparsesam::cpu
