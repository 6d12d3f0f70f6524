// sparse_linear on CPU: y = x W^T + b with W stored as CSR (fixed mask), and
// its backward: dx through the precomputed transposed index (no atomics, no
// scatter) and dW at kept entries only (SDDMM).
//
// Every pass has the same shape. The dense operand (x, or grad_out) is
// packed batch-contiguous in tiles of T batch rows (sparse_linear_simd.h);
// the sparse rows are cut into tasks of about equal cost (entries + rows),
// which threads take from a shared counter (a shared, noisy machine stays
// balanced); a task runs the tile kernel for every batch tile and, for the
// forward and dx, writes its rows of the result straight back to row-major
// order from a per-thread scratch (the output transpose is fused into the
// task, while the scratch is in cache). The weight is never densified: the
// only weight-sized state is the values (and, for dx, their gather into the
// transposed order, one nnz-long temporary).
//
// float, bfloat16 and half accumulate in float (bf16/half are widened to
// float on the way in and rounded once on the way out); double in double.
// Results do not depend on the thread count: every output value is summed
// by one task in a fixed order.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/Version.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <type_traits>
#include <utility>
#include <vector>

#include "../common/masked_layers.h"
#include "sparse_linear_simd.h"

namespace sparsesam::cpu {

// The baseline-ISA build of the kernels (SSE2 on x86-64, 16-byte vectors).
namespace baseline {
#define SPARSESAM_SPARSE_LINEAR_ISA "baseline"
#include "sparse_linear_kernels.h"
#undef SPARSESAM_SPARSE_LINEAR_ISA
}  // namespace baseline

namespace {

// Rows of one task at most: its scratch is kMaxTaskRows x T accumulators.
constexpr int64_t kMaxTaskRows = 512;
// Tasks per thread (about): enough for the shared counter to even out a
// noisy machine, few enough that each task's pass over the packed operand
// (all of it, once per task) stays cheap.
constexpr int64_t kTasksPerThread = 4;
// Bytes of a packed tile one column block reads: it stays in L2 while all
// rows of a task pass over it.
constexpr int64_t kBlockBytes = 128 * 1024;
// The fixed cost of a row (start value, store, unpack) in entries.
constexpr int64_t kRowCost = 4;
// Columns per packing task.
constexpr int64_t kPackColumns = 256;

bool cpu_runs_avx2() {
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
  static const bool yes = [] {
    __builtin_cpu_init();
    // ATEN_CPU_CAPABILITY=default keeps ATen's kernels off AVX2: ours follow.
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && at::get_cpu_capability() != "DEFAULT";
  }();
  return yes;
#else
  return false;
#endif
}

template <typename acc_t>
const SparseLinearKernels<acc_t>& kernels() {
  const SparseLinearKernels<acc_t>* avx2 = nullptr;
  if constexpr (std::is_same_v<acc_t, float>) {
    avx2 = sparse_linear_kernels_avx2_f32();
  } else {
    avx2 = sparse_linear_kernels_avx2_f64();
  }
  if (avx2 != nullptr && cpu_runs_avx2()) return *avx2;
  return baseline::kSparseLinearKernels<acc_t, 16>;
}

// --- Checks -------------------------------------------------------------------

void check_index_tensor(const at::Tensor& t, const char* name, int64_t numel) {
  TORCH_CHECK_TYPE(t.scalar_type() == at::kInt, "sparse_linear: ", name, " must be int32, got ", t.scalar_type());
  TORCH_CHECK_VALUE(t.device().is_cpu(), "sparse_linear: ", name, " must be on the CPU, got ", t.device());
  TORCH_CHECK_VALUE(t.dim() == 1 && t.numel() == numel, "sparse_linear: ", name, " must be 1-D with ", numel,
                    " entries, got shape ", t.sizes());
  TORCH_CHECK_VALUE(t.is_contiguous(), "sparse_linear: ", name, " must be contiguous");
}

// Offsets: ptr[0] == 0, non-decreasing, ptr[rows] == nnz.
void check_offsets(const at::Tensor& ptr, const char* name, int64_t nnz) {
  const int32_t* p = ptr.const_data_ptr<int32_t>();
  const int64_t n = ptr.numel() - 1;
  TORCH_CHECK_VALUE(p[0] == 0 && p[n] == nnz, "sparse_linear: ", name, " must start at 0 and end at nnz=", nnz,
                    ", got ", p[0], " and ", p[n]);
  const bool sorted = at::parallel_reduce(
      0, n, 16384, true,
      [&](int64_t b, int64_t e, bool ok) {
        for (int64_t i = b; i < e; ++i) ok &= p[i] <= p[i + 1];
        return ok;
      },
      [](bool a, bool b) { return a && b; });
  TORCH_CHECK_VALUE(sorted, "sparse_linear: ", name, " must be non-decreasing");
}

// Every index in [0, bound): what makes the kernels' reads safe.
void check_bounds(const at::Tensor& idx, const char* name, int64_t bound) {
  const int32_t* p = idx.const_data_ptr<int32_t>();
  const bool ok = at::parallel_reduce(
      0, idx.numel(), 65536, true,
      [&](int64_t b, int64_t e, bool good) {
        uint32_t worst = 0;
        for (int64_t i = b; i < e; ++i) worst = std::max(worst, static_cast<uint32_t>(p[i]));  // negatives wrap high
        return good && (e == b || int64_t(worst) < bound);
      },
      [](bool a, bool b) { return a && b; });
  TORCH_CHECK_VALUE(ok, "sparse_linear: every entry of ", name, " must lie in [0, ", bound, ")");
}

struct Pattern {
  int64_t out_features, in_features, nnz;
};

// The CSR arrays, and the transposed index when the pass reads it. Returns
// the shape they describe.
Pattern check_pattern(const at::Tensor& values, const at::Tensor& crow, const at::Tensor& col,
                      const at::Tensor& ccol, const at::Tensor& row, const at::Tensor& pos, bool transposed) {
  TORCH_CHECK_VALUE(values.dim() == 1, "sparse_linear: values must be 1-D, got shape ", values.sizes());
  TORCH_CHECK_VALUE(crow.dim() == 1 && crow.numel() >= 1, "sparse_linear: crow_indices must be 1-D and non-empty");
  TORCH_CHECK_VALUE(ccol.dim() == 1 && ccol.numel() >= 1, "sparse_linear: ccol_indices must be 1-D and non-empty");
  const Pattern p{crow.numel() - 1, ccol.numel() - 1, values.numel()};
  TORCH_CHECK_VALUE(p.nnz < (int64_t(1) << 31) && p.out_features < (int64_t(1) << 31) &&
                        p.in_features < (int64_t(1) << 31),
                    "sparse_linear: int32 indices need fewer than 2^31 entries and features");
  check_index_tensor(crow, "crow_indices", p.out_features + 1);
  check_index_tensor(col, "col_indices", p.nnz);
  check_offsets(crow, "crow_indices", p.nnz);
  check_bounds(col, "col_indices", p.in_features);
  check_index_tensor(ccol, "ccol_indices", p.in_features + 1);
  check_index_tensor(row, "row_indices", p.nnz);
  check_index_tensor(pos, "csr_positions", p.nnz);
  if (transposed) {
    check_offsets(ccol, "ccol_indices", p.nnz);
    check_bounds(row, "row_indices", p.out_features);
    check_bounds(pos, "csr_positions", p.nnz);
  }
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

int64_t column_block(int64_t width, size_t acc_bytes) {
  return std::max<int64_t>(16, kBlockBytes / (width * int64_t(acc_bytes)));
}

// Runs body(task, scratch) for every task in [0, tasks): threads take the
// next task from a shared counter. Each thread owns one scratch buffer.
template <typename acc_t, typename Body>
void run_tasks(int64_t tasks, int64_t scratch_size, const Body& body) {
  if (tasks == 0) return;
  std::atomic<int64_t> next{0};
  const int64_t threads = std::min<int64_t>(at::get_num_threads(), tasks);
  at::parallel_for(0, threads, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> scratch(scratch_size);
    for (int64_t slot = begin; slot < end; ++slot) {
      for (int64_t task = next.fetch_add(1); task < tasks; task = next.fetch_add(1)) body(task, scratch.data());
    }
  });
}

// A [batch][cols] row-major matrix (row stride ld) packed into tiles:
// packed[t] is [cols][T] for batch rows [t*T, t*T+T).
template <typename acc_t>
void pack_all(const SparseLinearKernels<acc_t>& k, const Tiling& tiling, const acc_t* src, int64_t ld,
              int64_t batch, int64_t cols, acc_t* packed) {
  const int64_t col_chunks = (cols + kPackColumns - 1) / kPackColumns;
  at::parallel_for(0, tiling.count * col_chunks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const int64_t tile = i / col_chunks, c0 = (i % col_chunks) * kPackColumns;
      const int64_t b0 = tile * tiling.width;
      k.pack[tiling.vecs_log2](PackTask<acc_t>{src + b0 * ld, ld, std::min(tiling.width, batch - b0), c0,
                                               std::min(cols, c0 + kPackColumns), packed + tile * cols * tiling.width});
    }
  });
}

// out_rows[b][r] = init_r + sum over the entries (r, c) of val * in[b][c],
// for a compressed-row matrix (ptr, idx, val) of `rows` rows over `in_cols`
// columns; `in` is already packed. Output: row-major [batch][rows], stride ld.
template <typename acc_t>
void spmm_all(const SparseLinearKernels<acc_t>& k, const Tiling& tiling, const acc_t* packed, int64_t in_cols,
              const int32_t* ptr, const int32_t* idx, const acc_t* val, const acc_t* bias, int64_t rows,
              int64_t batch, acc_t* out, int64_t ld) {
  const std::vector<int64_t> bounds = split_rows(ptr, rows);
  const int64_t T = tiling.width;
  const int64_t block = column_block(T, sizeof(acc_t));
  // Scratch: kMaxTaskRows x T results, then kMaxTaskRows cursors.
  const int64_t cursor_slots = (kMaxTaskRows * int64_t(sizeof(int32_t)) + sizeof(acc_t) - 1) / sizeof(acc_t);
  run_tasks<acc_t>(int64_t(bounds.size()) - 1, kMaxTaskRows * T + cursor_slots, [&](int64_t task, acc_t* scratch) {
    const int64_t r0 = bounds[task], r1 = bounds[task + 1];
    int32_t* cursor = reinterpret_cast<int32_t*>(scratch + kMaxTaskRows * T);
    for (int64_t tile = 0; tile < tiling.count; ++tile) {
      k.spmm[tiling.vecs_log2](
          SpmmTask<acc_t>{packed + tile * in_cols * T, ptr, idx, val, bias, r0, r1, in_cols, block, cursor, scratch});
      const int64_t b0 = tile * T;
      k.unpack[tiling.vecs_log2](UnpackTask<acc_t>{scratch, std::min(T, batch - b0), r1 - r0, out + b0 * ld + r0, ld});
    }
  });
}

// x as a [batch][in] matrix in acc_t whose rows are unit-stride (a view of x
// when it already is one, else a copy).
at::Tensor rows_in(const at::Tensor& t, at::ScalarType acc) {
  at::Tensor m = as_rows(t);
  if (m.scalar_type() != acc) m = m.to(acc);
  if (m.size(1) > 1 && m.stride(1) != 1) m = m.contiguous();
  if (m.size(0) > 1 && m.stride(0) < m.size(1)) m = m.contiguous();  // overlapping rows (expanded x)
  return m;
}

int64_t row_stride(const at::Tensor& m) { return m.size(0) > 1 ? m.stride(0) : m.size(1); }

// --- The ops --------------------------------------------------------------------

at::Tensor sparse_linear(const at::Tensor& x, const at::Tensor& values, const at::Tensor& crow_indices,
                         const at::Tensor& col_indices, const at::Tensor& ccol_indices,
                         const at::Tensor& row_indices, const at::Tensor& csr_positions,
                         const std::optional<at::Tensor>& bias) {
  const Pattern p = check_pattern(values, crow_indices, col_indices, ccol_indices, row_indices, csr_positions,
                                  /*transposed=*/false);
  TORCH_CHECK_VALUE(x.dim() >= 1 && x.size(-1) == p.in_features, "sparse_linear: x has shape ", x.sizes(),
                    "; its last dimension must be in_features=", p.in_features);
  TORCH_CHECK_TYPE(values.scalar_type() == x.scalar_type(), "sparse_linear: values dtype ", values.scalar_type(),
                   " differs from x dtype ", x.scalar_type());
  const bool has_bias = bias.has_value() && bias->defined();
  if (has_bias) {
    TORCH_CHECK_VALUE(bias->dim() == 1 && bias->size(0) == p.out_features, "sparse_linear: bias must have ",
                      p.out_features, " entries, got shape ", bias->sizes());
    TORCH_CHECK_TYPE(bias->scalar_type() == x.scalar_type(), "sparse_linear: bias dtype differs from x dtype");
  }
  std::vector<int64_t> out_shape(x.sizes().begin(), x.sizes().end());
  out_shape.back() = p.out_features;
  at::Tensor y;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "sparse_linear_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const at::ScalarType acc = c10::CppTypeToScalarType<acc_t>::value;
    const at::Tensor x2 = rows_in(x, acc);
    const int64_t batch = x2.size(0);
    const at::Tensor val = values.to(acc).contiguous();
    const at::Tensor b = has_bias ? bias->to(acc).contiguous() : at::Tensor();
    at::Tensor y2 = at::empty({batch, p.out_features}, x.options().dtype(acc));
    if (batch > 0 && p.out_features > 0) {
      const SparseLinearKernels<acc_t>& k = kernels<acc_t>();
      const Tiling tiling = plan_tiles(batch, k.lanes);
      at::Tensor packed = at::empty({tiling.count * p.in_features * tiling.width}, y2.options());
      pack_all(k, tiling, x2.const_data_ptr<acc_t>(), row_stride(x2), batch, p.in_features,
               packed.mutable_data_ptr<acc_t>());
      spmm_all(k, tiling, packed.const_data_ptr<acc_t>(), p.in_features, crow_indices.const_data_ptr<int32_t>(),
               col_indices.const_data_ptr<int32_t>(), val.const_data_ptr<acc_t>(),
               has_bias ? b.const_data_ptr<acc_t>() : nullptr, p.out_features, batch, y2.mutable_data_ptr<acc_t>(),
               p.out_features);
    }
    y = y2.scalar_type() == x.scalar_type() ? y2 : y2.to(x.scalar_type());
  });
  return at::_unsafe_view(y, out_shape);
}

std::tuple<at::Tensor, at::Tensor> sparse_linear_backward(
    const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& values, const at::Tensor& crow_indices,
    const at::Tensor& col_indices, const at::Tensor& ccol_indices, const at::Tensor& row_indices,
    const at::Tensor& csr_positions, std::array<bool, 2> output_mask) {
  const auto [want_dx, want_dvalues] = output_mask;
  const Pattern p = check_pattern(values, crow_indices, col_indices, ccol_indices, row_indices, csr_positions,
                                  /*transposed=*/want_dx);
  TORCH_CHECK_VALUE(x.dim() >= 1 && x.size(-1) == p.in_features, "sparse_linear_backward: x has shape ", x.sizes(),
                    "; its last dimension must be in_features=", p.in_features);
  std::vector<int64_t> out_shape(x.sizes().begin(), x.sizes().end());
  out_shape.back() = p.out_features;
  TORCH_CHECK_VALUE(grad_out.sizes() == at::IntArrayRef(out_shape), "sparse_linear_backward: grad_out has shape ",
                    grad_out.sizes(), ", expected ", at::IntArrayRef(out_shape));
  TORCH_CHECK_TYPE(grad_out.scalar_type() == x.scalar_type() && values.scalar_type() == x.scalar_type(),
                   "sparse_linear_backward: grad_out, x and values must have one dtype");
  at::Tensor dx = empty_output(x), dvalues = empty_output(values);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "sparse_linear_backward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const at::ScalarType acc = c10::CppTypeToScalarType<acc_t>::value;
    const at::TensorOptions opts = grad_out.options().dtype(acc);
    const at::Tensor g2 = rows_in(grad_out, acc);
    const int64_t batch = g2.size(0);
    at::Tensor dx2 = want_dx ? at::empty({batch, p.in_features}, opts) : at::Tensor();
    at::Tensor dval = want_dvalues ? at::empty({p.nnz}, opts) : at::Tensor();
    const SparseLinearKernels<acc_t>& k = kernels<acc_t>();
    const Tiling tiling = plan_tiles(std::max<int64_t>(batch, 1), k.lanes);
    const int64_t T = tiling.width;
    const bool work = batch > 0 && p.nnz > 0;
    if (want_dx && !work) dx2.zero_();
    if (want_dvalues && !work) dval.zero_();
    if (work && (want_dx || want_dvalues)) {
      // grad_out packed (read by both), x packed (read by dW only).
      at::Tensor packed_g = at::empty({tiling.count * p.out_features * T}, opts);
      pack_all(k, tiling, g2.const_data_ptr<acc_t>(), row_stride(g2), batch, p.out_features,
               packed_g.mutable_data_ptr<acc_t>());
      at::Tensor packed_x, x2;
      if (want_dvalues) {
        x2 = rows_in(x, acc);
        packed_x = at::empty({tiling.count * p.in_features * T}, opts);
        pack_all(k, tiling, x2.const_data_ptr<acc_t>(), row_stride(x2), batch, p.in_features,
                 packed_x.mutable_data_ptr<acc_t>());
      }
      // dx = grad_out W: W^T as compressed rows is the transposed index,
      // with the values gathered into its order once.
      at::Tensor val_t;
      std::vector<int64_t> dx_bounds{0};
      if (want_dx) {
        const at::Tensor val = values.to(acc).contiguous();
        val_t = at::empty({p.nnz}, opts);
        const acc_t* v = val.const_data_ptr<acc_t>();
        const int32_t* pos = csr_positions.const_data_ptr<int32_t>();
        acc_t* vt = val_t.mutable_data_ptr<acc_t>();
        at::parallel_for(0, p.nnz, 32768, [&](int64_t b, int64_t e) {
          for (int64_t j = b; j < e; ++j) vt[j] = v[pos[j]];
        });
        dx_bounds = split_rows(ccol_indices.const_data_ptr<int32_t>(), p.in_features);
      }
      const std::vector<int64_t> dw_bounds =
          want_dvalues ? split_rows(crow_indices.const_data_ptr<int32_t>(), p.out_features) : std::vector<int64_t>{0};
      const int64_t dx_tasks = int64_t(dx_bounds.size()) - 1, dw_tasks = int64_t(dw_bounds.size()) - 1;
      const int64_t cursor_slots = (kMaxTaskRows * int64_t(sizeof(int32_t)) + sizeof(acc_t) - 1) / sizeof(acc_t);
      // dx tasks and dW tasks share one pool of threads.
      run_tasks<acc_t>(dx_tasks + dw_tasks, kMaxTaskRows * T + cursor_slots, [&](int64_t task, acc_t* scratch) {
        int32_t* cursor = reinterpret_cast<int32_t*>(scratch + kMaxTaskRows * T);
        if (task < dx_tasks) {
          const int64_t c0 = dx_bounds[task], c1 = dx_bounds[task + 1];
          const int64_t block = column_block(T, sizeof(acc_t));
          acc_t* out = dx2.mutable_data_ptr<acc_t>();
          for (int64_t tile = 0; tile < tiling.count; ++tile) {
            k.spmm[tiling.vecs_log2](SpmmTask<acc_t>{
                packed_g.const_data_ptr<acc_t>() + tile * p.out_features * T, ccol_indices.const_data_ptr<int32_t>(),
                row_indices.const_data_ptr<int32_t>(), val_t.const_data_ptr<acc_t>(), nullptr, c0, c1, p.out_features,
                block, cursor, scratch});
            const int64_t b0 = tile * T;
            k.unpack[tiling.vecs_log2](UnpackTask<acc_t>{scratch, std::min(T, batch - b0), c1 - c0,
                                                         out + b0 * p.in_features + c0, p.in_features});
          }
        } else {
          const int64_t r0 = dw_bounds[task - dx_tasks], r1 = dw_bounds[task - dx_tasks + 1];
          const int64_t block = column_block(T, sizeof(acc_t));
          for (int64_t tile = 0; tile < tiling.count; ++tile) {
            k.sddmm[tiling.vecs_log2](SddmmTask<acc_t>{
                packed_g.const_data_ptr<acc_t>() + tile * p.out_features * T,
                packed_x.const_data_ptr<acc_t>() + tile * p.in_features * T, crow_indices.const_data_ptr<int32_t>(),
                col_indices.const_data_ptr<int32_t>(), r0, r1, p.in_features, block, cursor,
                dval.mutable_data_ptr<acc_t>(), /*accumulate=*/tile > 0});
          }
        }
      });
    }
    if (want_dx) dx = at::_unsafe_view(dx2.scalar_type() == x.scalar_type() ? dx2 : dx2.to(x.scalar_type()), x.sizes());
    if (want_dvalues) dvalues = dval.scalar_type() == values.scalar_type() ? dval : dval.to(values.scalar_type());
  });
  return {dx, dvalues};
}

}  // namespace

TORCH_LIBRARY_IMPL(sparsesam, CPU, m) {
  m.impl("sparse_linear", &sparse_linear);
  m.impl("sparse_linear_backward", &sparse_linear_backward);
}

}  // namespace sparsesam::cpu
