// csr_linear on CPU: y = x W^T + b with W stored as CSR (fixed mask), and
// its backward: dx through the precomputed transposed index (no atomics, no
// scatter-add) and dW at kept entries only (SDDMM).
//
// Every pass has the same shape. The dense operands (x, grad_out) are packed
// batch-contiguous in tiles of T batch rows (csr_linear_simd.h); the
// sparse rows are cut into tasks of about equal cost, and one parallel region
// runs first the packing tasks, then the compute tasks, threads taking each
// next task from a shared counter (so on a shared, oversubscribed machine a
// descheduled thread delays only the task it holds, and there is one
// fork/join per op). A compute task runs the tile kernel for every batch
// tile and writes its rows of the result straight back to row-major order
// from a per-thread scratch (the output transpose is fused into the task,
// while the scratch is in cache).
//
// Backward runs dx tasks (an SpMM over the transposed index, with the values
// gathered into its order by each task for its own entries) and dW tasks (an
// SDDMM over CSR rows) in the same region. (One fused pass over the
// transposed index, reading each grad_out row once for both, measured no
// faster here: the dot products double its arithmetic, and the gradient
// then needs a scatter back to CSR order.) The weight is never densified.
//
// float, bfloat16 and half accumulate in float (bf16/half are widened on the
// way in and rounded once on the way out); double in double. Results do not
// depend on the thread count: every output value is summed by one task in a
// fixed order.
//
// Index checks: offsets are checked before anything runs; every task checks
// the indices of its own entries before it reads through them (no separate
// pass), and the op raises afterwards if any was out of range.
//
// Where the time goes (perf, B=256, 4096x4096, forward+backward through
// autograd, AVX2 float, Zen 3; a shared machine, so CPU-time shares):
//   one thread, 99% sparse: SpMM 47% (forward and dx, about equal), SDDMM
//   30%, packing x, x, grad_out 8.5%, unpacking y, dx 4%, the dx tasks'
//   value gather and index checks 3.4%, bias grad (ATen sum) 1.6%; Python,
//   autograd and allocation under 2%; page faults ~0 (glibc reuses the
//   4 MiB blocks: ~140 minor faults per step).
//   two threads, 99%: the same kernels, plus a third of all CPU samples
//   spinning in libgomp (both threads, i.e. barrier waits: on a loaded
//   2-core machine one thread is descheduled while the other waits).
// The SpMM inner loop is bound by the gathered loads (one 256-byte packed
// row per entry, the FMAs take their operand from memory). Tried and not
// kept (same-process A/B, CPU time, one thread): software prefetch of the
// row d = 2 or 4 entries ahead (+5-8% at 90%, -6-8% at 99%), 512 KiB or
// 1 MiB column blocks instead of 256 KiB (-6 to -12% at 90%), a cache of
// the packed workspaces across calls (no page faults to save, see above),
// 2, 8 or 16 tasks per thread instead of 4 (within the noise of the loaded
// machine).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/Version.h>
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
#include "csr_linear_simd.h"

namespace sparsesam::cpu {

// The baseline-ISA build of the kernels (SSE2 on x86-64, 16-byte vectors).
namespace baseline {
#define SPARSESAM_SPARSE_LINEAR_ISA "baseline"
#include "csr_linear_kernels.h"
#undef SPARSESAM_SPARSE_LINEAR_ISA
}  // namespace baseline

namespace {

// Rows of one task at most: its scratch is kMaxTaskRows x T accumulators.
constexpr int64_t kMaxTaskRows = 512;
// Tasks per thread (about): enough for the shared counter to even out a
// noisy machine, few enough that each task's pass over the packed operand
// (all of it, once per task) stays cheap.
constexpr int64_t kTasksPerThread = 4;
// Bytes of a packed tile one column block reads: it stays in L2 (half of a
// 512 KB L2) while all rows of a task pass over it.
constexpr int64_t kBlockBytes = 256 * 1024;
// The fixed cost of a row (start value, store, unpack) in entries.
constexpr int64_t kRowCost = 4;
// Columns per packing task.
constexpr int64_t kPackColumns = 256;

template <typename acc_t>
const CSRLinearKernels<acc_t>& kernels() {
  const CSRLinearKernels<acc_t>* avx2 = nullptr;
  if constexpr (std::is_same_v<acc_t, float>) {
    avx2 = csr_linear_kernels_avx2_f32();
  } else {
    avx2 = csr_linear_kernels_avx2_f64();
  }
  if (avx2 != nullptr && cpu_runs_avx2()) return *avx2;
  return baseline::kCSRLinearKernels<acc_t, 16>;
}

// --- Checks -------------------------------------------------------------------

struct Pattern {
  int64_t out_features, in_features, nnz;
};

// Shapes and dtypes of the index, offsets of the halves a pass reads.
Pattern check_pattern(const at::Tensor& values, const at::Tensor& crow, const at::Tensor& col,
                      const at::Tensor& ccol, const at::Tensor& row, const at::Tensor& pos, bool csr,
                      bool transposed) {
  TORCH_CHECK_VALUE(values.dim() == 1, "csr_linear: values must be 1-D, got shape ", values.sizes());
  TORCH_CHECK_VALUE(crow.dim() == 1 && crow.numel() >= 1, "csr_linear: crow_indices must be 1-D and non-empty");
  TORCH_CHECK_VALUE(ccol.dim() == 1 && ccol.numel() >= 1, "csr_linear: ccol_indices must be 1-D and non-empty");
  const Pattern p{crow.numel() - 1, ccol.numel() - 1, values.numel()};
  TORCH_CHECK_VALUE(p.nnz < (int64_t(1) << 31) && p.out_features < (int64_t(1) << 31) &&
                        p.in_features < (int64_t(1) << 31),
                    "csr_linear: int32 indices need fewer than 2^31 entries and features");
  check_index_tensor("csr_linear", crow, "crow_indices", p.out_features + 1);
  check_index_tensor("csr_linear", col, "col_indices", p.nnz);
  check_index_tensor("csr_linear", ccol, "ccol_indices", p.in_features + 1);
  check_index_tensor("csr_linear", row, "row_indices", p.nnz);
  check_index_tensor("csr_linear", pos, "csr_positions", p.nnz);
  if (csr) check_offsets("csr_linear", crow, "crow_indices", p.nnz, "nnz");
  if (transposed) check_offsets("csr_linear", ccol, "ccol_indices", p.nnz, "nnz");
  return p;
}

// --- Planning -----------------------------------------------------------------

// The tile: kVecs = 1 << vecs_log2 vectors, the smallest that covers the
// batch, at most 8 (a batch of 3 does not pay for 64 lanes).
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

// Boundaries of consecutive row ranges of about equal cost (entries plus
// kRowCost per row), at most kMaxTaskRows rows each.
std::vector<int64_t> split_rows(const int32_t* ptr, int64_t rows) {
  std::vector<int64_t> bounds{0};
  if (rows == 0) return bounds;
  const int64_t total = int64_t(ptr[rows]) + kRowCost * rows;
  const int64_t parts = std::max<int64_t>(1, int64_t(at::get_num_threads()) * kTasksPerThread);
  const int64_t target = std::max<int64_t>(1, (total + parts - 1) / parts);
  int64_t start = 0;
  for (int64_t r = 1; r <= rows; ++r) {
    const int64_t cost = int64_t(ptr[r]) - ptr[start] + kRowCost * (r - start);
    if (r == rows || cost >= target || r - start >= kMaxTaskRows) {
      bounds.push_back(r);
      start = r;
    }
  }
  return bounds;
}

// Rows of the packed operand per cache block (see kBlockBytes).
int64_t column_block(int64_t width, size_t acc_bytes) {
  return std::max<int64_t>(16, kBlockBytes / (width * int64_t(acc_bytes)));
}

int64_t scratch_size(int64_t width, size_t acc_bytes) {
  // kMaxTaskRows x T results, then kMaxTaskRows int32 cursors.
  return kMaxTaskRows * width + (kMaxTaskRows * 4 + int64_t(acc_bytes) - 1) / int64_t(acc_bytes);
}

template <typename acc_t>
int32_t* cursors(acc_t* scratch, int64_t width) {
  return reinterpret_cast<int32_t*>(scratch + kMaxTaskRows * width);
}

// Packing tasks: a [batch][cols] row-major matrix (row stride ld) into tiles,
// packed[t] = [cols][T] for batch rows [t*T, t*T+T); one task per tile and
// kPackColumns columns.
template <typename acc_t>
struct Packing {
  const CSRLinearKernels<acc_t>* k;
  Tiling tiling;
  const acc_t* src;
  int64_t ld, batch, cols;
  acc_t* packed;

  int64_t chunks() const { return (cols + kPackColumns - 1) / kPackColumns; }
  int64_t tasks() const { return tiling.count * chunks(); }
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
  const CSRLinearKernels<acc_t>& k = kernels<acc_t>();
  const int64_t batch = x2.size(0);
  const Tiling tiling = plan_tiles(batch, k.lanes);
  const int64_t T = tiling.width;
  at::Tensor packed = at::empty({tiling.count * p.in_features * T}, y2.options());
  const Packing<acc_t> pack{&k, tiling, data<acc_t>(x2), row_stride(x2), batch, p.in_features,
                            packed.mutable_data_ptr<acc_t>()};
  const std::vector<int64_t> bounds = split_rows(index(crow), p.out_features);
  const int64_t block = column_block(T, sizeof(acc_t));
  acc_t* y = y2.mutable_data_ptr<acc_t>();
  const int32_t* offsets = index(crow);
  const int32_t* cols = index(col);
  const acc_t* val = data<acc_t>(values);
  const acc_t* x_base = data<acc_t>(packed);
  std::atomic<bool> failed{false}, bad_index{false};
  run_phases<acc_t>(
      pack.tasks(), [&](int64_t i) { pack.run(i); }, int64_t(bounds.size()) - 1, scratch_size(T, sizeof(acc_t)),
      [&](int64_t task, acc_t* scratch) {
        const int64_t r0 = bounds[task], r1 = bounds[task + 1];
        if (!indices_below(cols, offsets[r0], offsets[r1], p.in_features)) {
          bad_index = true;
          return;
        }
        for (int64_t tile = 0; tile < tiling.count; ++tile) {
          k.spmm[tiling.vecs_log2](SpmmTask<acc_t>{x_base + tile * p.in_features * T, offsets, cols, val, bias, r0,
                                                   r1, p.in_features, block, cursors(scratch, T), scratch});
          const int64_t b0 = tile * T;
          k.unpack[tiling.vecs_log2](
              UnpackTask<acc_t>{scratch, std::min(T, batch - b0), r1 - r0, y + b0 * p.out_features + r0, p.out_features});
        }
      },
      failed);
  TORCH_CHECK_VALUE(!bad_index, "csr_linear: every entry of col_indices must lie in [0, ", p.in_features, ")");
  TORCH_CHECK(!failed, "csr_linear: a CPU task failed");
}

// --- Backward ---------------------------------------------------------------------

template <typename acc_t>
void backward(const at::Tensor& g2, const at::Tensor& x, const at::Tensor& values, const at::Tensor& crow,
              const at::Tensor& col, const at::Tensor& ccol, const at::Tensor& row, const at::Tensor& pos,
              const Pattern& p, at::Tensor& dx2, at::Tensor& dval) {
  const bool want_dx = dx2.defined(), want_dval = dval.defined();
  const CSRLinearKernels<acc_t>& k = kernels<acc_t>();
  const at::ScalarType acc = c10::CppTypeToScalarType<acc_t>::value;
  const at::TensorOptions opts = g2.options();
  const int64_t batch = g2.size(0);
  const Tiling tiling = plan_tiles(batch, k.lanes);
  const int64_t T = tiling.width;

  // Phase 1: pack grad_out (read by both gradients) and x (by dW only).
  at::Tensor packed_g = at::empty({tiling.count * p.out_features * T}, opts);
  const Packing<acc_t> pack_g{&k, tiling, data<acc_t>(g2), row_stride(g2), batch, p.out_features,
                              packed_g.mutable_data_ptr<acc_t>()};
  at::Tensor x2, packed_x;
  Packing<acc_t> pack_x{&k, tiling, nullptr, 0, batch, p.in_features, nullptr};
  if (want_dval) {
    x2 = rows_in(x, acc);
    packed_x = at::empty({tiling.count * p.in_features * T}, opts);
    pack_x.src = data<acc_t>(x2);
    pack_x.ld = row_stride(x2);
    pack_x.packed = packed_x.mutable_data_ptr<acc_t>();
  }
  const int64_t n_pack = pack_g.tasks() + (want_dval ? pack_x.tasks() : 0);

  // Phase 2: dx tasks own ranges of input columns (rows of the transposed
  // index, so each dx value is summed by one task: no atomics); dW tasks own
  // ranges of CSR rows. Raw pointers are taken once, here.
  const std::vector<int64_t> dx_bounds = want_dx ? split_rows(index(ccol), p.in_features) : std::vector<int64_t>{0};
  const std::vector<int64_t> dw_bounds = want_dval ? split_rows(index(crow), p.out_features) : std::vector<int64_t>{0};
  const int64_t dx_tasks = int64_t(dx_bounds.size()) - 1, dw_tasks = int64_t(dw_bounds.size()) - 1;
  const int64_t dx_block = column_block(T, sizeof(acc_t));  // blocks of grad_out's packed rows
  const int64_t dw_block = column_block(T, sizeof(acc_t));  // blocks of x's packed rows
  at::Tensor val_t = want_dx ? at::empty({p.nnz}, opts) : at::Tensor();  // values in the transposed order
  const acc_t* val = want_dx ? data<acc_t>(values) : nullptr;
  acc_t* vt = want_dx ? val_t.mutable_data_ptr<acc_t>() : nullptr;
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
      dx_tasks + dw_tasks, scratch_size(T, sizeof(acc_t)),
      [&](int64_t task, acc_t* scratch) {
        if (task < dx_tasks) {
          const int64_t c0 = dx_bounds[task], c1 = dx_bounds[task + 1];
          const int64_t j0 = ccol_p[c0], j1 = ccol_p[c1];
          if (!indices_below(row_p, j0, j1, p.out_features) || !indices_below(pos_p, j0, j1, p.nnz)) {
            bad_index = true;
            return;
          }
          for (int64_t j = j0; j < j1; ++j) vt[j] = val[pos_p[j]];  // this task's entries only
          for (int64_t tile = 0; tile < tiling.count; ++tile) {
            k.spmm[tiling.vecs_log2](SpmmTask<acc_t>{g_base + tile * p.out_features * T, ccol_p, row_p, vt, nullptr,
                                                     c0, c1, p.out_features, dx_block, cursors(scratch, T), scratch});
            const int64_t b0 = tile * T;
            k.unpack[tiling.vecs_log2](UnpackTask<acc_t>{scratch, std::min(T, batch - b0), c1 - c0,
                                                         dx + b0 * p.in_features + c0, p.in_features});
          }
        } else {
          const int64_t r0 = dw_bounds[task - dx_tasks], r1 = dw_bounds[task - dx_tasks + 1];
          if (!indices_below(col_p, crow_p[r0], crow_p[r1], p.in_features)) {
            bad_index = true;
            return;
          }
          for (int64_t tile = 0; tile < tiling.count; ++tile) {
            k.sddmm[tiling.vecs_log2](SddmmTask<acc_t>{g_base + tile * p.out_features * T,
                                                       x_base + tile * p.in_features * T, crow_p, col_p, r0, r1,
                                                       p.in_features, dw_block, cursors(scratch, T), dv,
                                                       /*accumulate=*/tile > 0});
          }
        }
      },
      failed);
  TORCH_CHECK_VALUE(!bad_index, "csr_linear_backward: an index is out of range: col_indices must lie in [0, ",
                    p.in_features, "), row_indices in [0, ", p.out_features, ") and csr_positions in [0, ", p.nnz,
                    ")");
  TORCH_CHECK(!failed, "csr_linear_backward: a CPU task failed");
}

// --- The ops --------------------------------------------------------------------

at::Tensor csr_linear(const at::Tensor& x, const at::Tensor& values, const at::Tensor& crow_indices,
                         const at::Tensor& col_indices, const at::Tensor& ccol_indices,
                         const at::Tensor& row_indices, const at::Tensor& csr_positions,
                         const std::optional<at::Tensor>& bias) {
  const Pattern p = check_pattern(values, crow_indices, col_indices, ccol_indices, row_indices, csr_positions,
                                  /*csr=*/true, /*transposed=*/false);
  TORCH_CHECK_VALUE(x.dim() >= 1 && x.size(-1) == p.in_features, "csr_linear: x has shape ", x.sizes(),
                    "; its last dimension must be in_features=", p.in_features);
  TORCH_CHECK_TYPE(values.scalar_type() == x.scalar_type(), "csr_linear: values dtype ", values.scalar_type(),
                   " differs from x dtype ", x.scalar_type());
  const bool has_bias = bias.has_value() && bias->defined();
  if (has_bias) {
    TORCH_CHECK_VALUE(bias->dim() == 1 && bias->size(0) == p.out_features, "csr_linear: bias must have ",
                      p.out_features, " entries, got shape ", bias->sizes());
    TORCH_CHECK_TYPE(bias->scalar_type() == x.scalar_type(), "csr_linear: bias dtype differs from x dtype");
  }
  std::vector<int64_t> out_shape(x.sizes().begin(), x.sizes().end());
  out_shape.back() = p.out_features;
  at::Tensor y;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "csr_linear_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const at::ScalarType acc = c10::CppTypeToScalarType<acc_t>::value;
    const at::Tensor x2 = rows_in(x, acc);
    const at::Tensor val = values.to(acc).contiguous();
    const at::Tensor b = has_bias ? bias->to(acc).contiguous() : at::Tensor();
    at::Tensor y2 = at::empty({x2.size(0), p.out_features}, x.options().dtype(acc));
    if (x2.size(0) > 0 && p.out_features > 0) {
      forward<acc_t>(x2, val, crow_indices, col_indices, has_bias ? data<acc_t>(b) : nullptr, p, y2);
    }
    y = y2.scalar_type() == x.scalar_type() ? y2 : y2.to(x.scalar_type());
  });
  return at::_unsafe_view(y, out_shape);
}

std::tuple<at::Tensor, at::Tensor> csr_linear_backward(
    const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& values, const at::Tensor& crow_indices,
    const at::Tensor& col_indices, const at::Tensor& ccol_indices, const at::Tensor& row_indices,
    const at::Tensor& csr_positions, std::array<bool, 2> output_mask) {
  const auto [want_dx, want_dvalues] = output_mask;
  // dx reads the transposed index, dW the CSR.
  const Pattern p = check_pattern(values, crow_indices, col_indices, ccol_indices, row_indices, csr_positions,
                                  /*csr=*/want_dvalues, /*transposed=*/want_dx);
  TORCH_CHECK_VALUE(x.dim() >= 1 && x.size(-1) == p.in_features, "csr_linear_backward: x has shape ", x.sizes(),
                    "; its last dimension must be in_features=", p.in_features);
  std::vector<int64_t> out_shape(x.sizes().begin(), x.sizes().end());
  out_shape.back() = p.out_features;
  TORCH_CHECK_VALUE(grad_out.sizes() == at::IntArrayRef(out_shape), "csr_linear_backward: grad_out has shape ",
                    grad_out.sizes(), ", expected ", at::IntArrayRef(out_shape));
  TORCH_CHECK_TYPE(grad_out.scalar_type() == x.scalar_type() && values.scalar_type() == x.scalar_type(),
                   "csr_linear_backward: grad_out, x and values must have one dtype");
  at::Tensor dx = empty_output(x), dvalues = empty_output(values);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "csr_linear_backward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const at::ScalarType acc = c10::CppTypeToScalarType<acc_t>::value;
    const at::Tensor g2 = rows_in(grad_out, acc);
    const at::TensorOptions opts = g2.options();
    const int64_t batch = g2.size(0);
    at::Tensor dx2 = want_dx ? at::empty({batch, p.in_features}, opts) : at::Tensor();
    at::Tensor dval = want_dvalues ? at::empty({p.nnz}, opts) : at::Tensor();
    if (batch > 0 && p.nnz > 0 && (want_dx || want_dvalues)) {
      // Values are read for dx only (an unsaved placeholder otherwise).
      const at::Tensor val = want_dx ? values.to(acc).contiguous() : at::Tensor();
      backward<acc_t>(g2, x, val, crow_indices, col_indices, ccol_indices, row_indices, csr_positions, p, dx2, dval);
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
  m.impl("csr_linear", &csr_linear);
  m.impl("csr_linear_backward", &csr_linear_backward);
}

}  // namespace sparsesam::cpu
