// nm_linear on CPU: y = x W^T + b with W kept as an N:M pattern along the
// input dimension (values [out][K], K = in * n / m, and a uint8 position of
// each entry in its group; sparsesam/sparse/nm.py), and its backward.
//
// The structure is csr_linear's (csr_linear_cpu.cpp): x and grad_out
// are packed batch-contiguous in tiles of T batch rows (its pack/unpack
// kernels), one parallel region runs the packing tasks, then the compute
// tasks, threads taking the next task from a shared counter; a compute task
// runs its kernel for every batch tile and writes its results back to
// row-major order from a per-thread scratch. N:M makes the partitions
// trivial: every row costs the same (no cost-balanced splitting), and dx
// needs no transposed index: a dx task owns a range of input groups (= a
// range of input columns) and walks every output row's entries in it, so
// every dx value is summed by one task, without atomics. dW is computed at
// kept entries only (SDDMM). The weight is never densified.
//
// float, bfloat16 and half accumulate in float (rounded once on the way
// out), double in double. Results do not depend on the thread count.
// Index bytes are checked (< m) by each task for the entries it reads.
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
#include "nm_linear_simd.h"

namespace sparsesam::cpu {

// The baseline-ISA build of the kernels (SSE2 on x86-64).
namespace nm_baseline {
#define SPARSESAM_SPARSE_LINEAR_ISA "baseline"
#include "csr_linear_kernels.h"
#include "nm_linear_kernels.h"
#undef SPARSESAM_SPARSE_LINEAR_ISA
}  // namespace nm_baseline

namespace {

// Rows of one forward / dW task at most (its scratch is kMaxTaskRows x T).
constexpr int64_t kMaxTaskRows = 512;
// Tasks per thread (about): a shared counter evens out a noisy machine.
constexpr int64_t kTasksPerThread = 4;
// Bytes of the packed slice one block of groups reads: it stays in L2.
constexpr int64_t kBlockBytes = 256 * 1024;
// Bytes of a dx task's accumulators (its columns x T): they stay in L1/L2,
// since every entry reads and writes one of them.
constexpr int64_t kGradInputBytes = 64 * 1024;
// Entries of each output row a dx task takes at least (see backward).
constexpr int64_t kGradInputEntries = 64;
// Columns per packing task.
constexpr int64_t kPackColumns = 256;

template <typename acc_t>
const NMLinearKernels<acc_t>& kernels() {
  const NMLinearKernels<acc_t>* avx2 = nullptr;
  if constexpr (std::is_same_v<acc_t, float>) {
    avx2 = nm_linear_kernels_avx2_f32();
  } else {
    avx2 = nm_linear_kernels_avx2_f64();
  }
  if (avx2 != nullptr && cpu_runs_avx2()) return *avx2;
  return nm_baseline::kNMLinearKernels<acc_t, 16>;
}

// --- Checks -------------------------------------------------------------------

struct Shape {
  int64_t out_features, in_features, groups, K;
  int n, m;
};

Shape check_shape(const at::Tensor& values, const at::Tensor& indices, int64_t n, int64_t m, const char* op) {
  TORCH_CHECK_VALUE(1 <= n && n < m && m <= 16, op, ": n and m must satisfy 1 <= n < m <= 16, got n=", n, ", m=", m);
  TORCH_CHECK_VALUE(values.dim() == 2, op, ": values must be 2-D (out_features, in_features * n / m), got shape ",
                    values.sizes());
  TORCH_CHECK_TYPE(indices.scalar_type() == at::kByte, op, ": indices must be uint8, got ", indices.scalar_type());
  TORCH_CHECK_VALUE(indices.device().is_cpu(), op, ": indices must be on the CPU, got ", indices.device());
  TORCH_CHECK_VALUE(indices.sizes() == values.sizes(), op, ": indices has shape ", indices.sizes(),
                    " but values has shape ", values.sizes());
  TORCH_CHECK_VALUE(indices.is_contiguous(), op, ": indices must be contiguous");
  TORCH_CHECK_VALUE(values.size(1) % n == 0, op, ": values has ", values.size(1), " entries per row, not a multiple of n=",
                    n);
  const int64_t groups = values.size(1) / n;
  return {values.size(0), groups * m, groups, values.size(1), int(n), int(m)};
}

// Whether the bytes idx[begin, end) all lie below m.
bool bytes_below(const uint8_t* idx, int64_t begin, int64_t end, int m) {
  uint8_t worst = 0;
  for (int64_t j = begin; j < end; ++j) worst = std::max(worst, idx[j]);
  return end == begin || int(worst) < m;
}

// --- Planning -----------------------------------------------------------------

struct Tiling {
  int vecs_log2;
  int64_t width;  // T
  int64_t count;  // batch tiles
};

// The smallest tile of 1, 2, 4 or 8 vectors that covers the batch.
Tiling plan_tiles(int64_t batch, int lanes) {
  int lg = 0;
  while (lg < 3 && (int64_t(lanes) << lg) < batch) ++lg;
  const int64_t width = int64_t(lanes) << lg;
  return {lg, width, (batch + width - 1) / width};
}

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Items per task: about kTasksPerThread tasks per thread, at most `cap` items each.
int64_t per_task(int64_t items, int64_t cap) {
  const int64_t parts = std::max<int64_t>(1, int64_t(at::get_num_threads()) * kTasksPerThread);
  return std::clamp<int64_t>(ceil_div(items, parts), 1, std::max<int64_t>(cap, 1));
}

// Groups per cache block of a packed operand (see kBlockBytes).
int64_t group_block(const Shape& s, int64_t width, size_t acc_bytes) {
  return std::max<int64_t>(1, kBlockBytes / (int64_t(s.m) * width * int64_t(acc_bytes)));
}

// Packing a [batch][cols] row-major matrix (row stride ld) into tiles: one
// task per tile and kPackColumns columns.
template <typename acc_t>
struct Packing {
  const NMLinearKernels<acc_t>* k;
  Tiling tiling;
  const acc_t* src;
  int64_t ld, batch, cols;
  acc_t* packed;

  int64_t chunks() const { return ceil_div(cols, kPackColumns); }
  int64_t tasks() const { return tiling.count * chunks(); }
  void run(int64_t i) const {
    const int64_t tile = i / chunks(), c0 = (i % chunks()) * kPackColumns;
    const int64_t b0 = tile * tiling.width;
    k->pack[tiling.vecs_log2](PackTask<acc_t>{src + b0 * ld, ld, std::min(tiling.width, batch - b0), c0,
                                              std::min(cols, c0 + kPackColumns), packed + tile * cols * tiling.width});
  }
};

// --- Forward ----------------------------------------------------------------------

template <typename acc_t>
void forward(const at::Tensor& x2, const at::Tensor& values, const at::Tensor& indices, const acc_t* bias,
             const Shape& s, at::Tensor& y2) {
  const NMLinearKernels<acc_t>& k = kernels<acc_t>();
  const int64_t batch = x2.size(0);
  const Tiling tiling = plan_tiles(batch, k.lanes);
  const int64_t T = tiling.width;
  at::Tensor packed = at::empty({tiling.count * s.in_features * T}, y2.options());
  const Packing<acc_t> pack{&k, tiling, data<acc_t>(x2), row_stride(x2), batch, s.in_features,
                            packed.mutable_data_ptr<acc_t>()};
  const int64_t rows_per_task = per_task(s.out_features, kMaxTaskRows);
  const int64_t tasks = ceil_div(s.out_features, rows_per_task);
  const int64_t block = group_block(s, T, sizeof(acc_t));
  const int variant = nm_variant(s.n);
  acc_t* y = y2.mutable_data_ptr<acc_t>();
  const uint8_t* idx = indices.const_data_ptr<uint8_t>();
  const acc_t* val = data<acc_t>(values);
  const acc_t* x_base = data<acc_t>(packed);
  std::atomic<bool> failed{false}, bad_index{false};
  run_phases<acc_t>(
      pack.tasks(), [&](int64_t i) { pack.run(i); }, tasks, kMaxTaskRows * T,
      [&](int64_t task, acc_t* scratch) {
        const int64_t r0 = task * rows_per_task, r1 = std::min(s.out_features, r0 + rows_per_task);
        if (!bytes_below(idx, r0 * s.K, r1 * s.K, s.m)) {
          bad_index = true;
          return;
        }
        for (int64_t tile = 0; tile < tiling.count; ++tile) {
          k.forward[tiling.vecs_log2][variant](NMForwardTask<acc_t>{x_base + tile * s.in_features * T, idx, val, bias,
                                                                    r0, r1, s.groups, s.n, s.m, block, scratch});
          const int64_t b0 = tile * T;
          k.unpack[tiling.vecs_log2](
              UnpackTask<acc_t>{scratch, std::min(T, batch - b0), r1 - r0, y + b0 * s.out_features + r0, s.out_features});
        }
      },
      failed);
  TORCH_CHECK_VALUE(!bad_index, "nm_linear: every entry of indices must lie in [0, m=", s.m, ")");
  TORCH_CHECK(!failed, "nm_linear: a CPU task failed");
}

// --- Backward ---------------------------------------------------------------------

template <typename acc_t>
void backward(const at::Tensor& g2, const at::Tensor& x, const at::Tensor& values, const at::Tensor& indices,
              const Shape& s, at::Tensor& dx2, at::Tensor& dval) {
  const bool want_dx = dx2.defined(), want_dval = dval.defined();
  const NMLinearKernels<acc_t>& k = kernels<acc_t>();
  const at::ScalarType acc = c10::CppTypeToScalarType<acc_t>::value;
  const at::TensorOptions opts = g2.options();
  const int64_t batch = g2.size(0);
  const Tiling tiling = plan_tiles(batch, k.lanes);
  const int64_t T = tiling.width;

  // Phase 1: pack grad_out (read by both gradients) and x (by dW only).
  at::Tensor packed_g = at::empty({tiling.count * s.out_features * T}, opts);
  const Packing<acc_t> pack_g{&k, tiling, data<acc_t>(g2), row_stride(g2), batch, s.out_features,
                              packed_g.mutable_data_ptr<acc_t>()};
  at::Tensor x2, packed_x;
  Packing<acc_t> pack_x{&k, tiling, nullptr, 0, batch, s.in_features, nullptr};
  if (want_dval) {
    x2 = rows_in(x, acc);
    packed_x = at::empty({tiling.count * s.in_features * T}, opts);
    pack_x.src = data<acc_t>(x2);
    pack_x.ld = row_stride(x2);
    pack_x.packed = packed_x.mutable_data_ptr<acc_t>();
  }
  const int64_t n_pack = pack_g.tasks() + (want_dval ? pack_x.tasks() : 0);

  // Phase 2: dx tasks own ranges of input groups, dW tasks ranges of rows.
  // A dx task streams all of grad_out's packed tile once per batch tile, so
  // it takes at least kGradInputEntries entries of each row (sparse N:M, e.g.
  // 1:16, then gets wider accumulators, up to a cache block) to amortise that.
  const int64_t group_bytes = s.m * T * int64_t(sizeof(acc_t));
  const int64_t dx_cap = std::max<int64_t>(kGradInputBytes / group_bytes,
                                           std::min<int64_t>(ceil_div(kGradInputEntries, s.n), kBlockBytes / group_bytes));
  const int64_t dx_groups = per_task(s.groups, std::max<int64_t>(1, dx_cap));
  const int64_t dx_tasks = want_dx ? ceil_div(s.groups, dx_groups) : 0;
  const int64_t dw_rows = per_task(s.out_features, kMaxTaskRows);
  const int64_t dw_tasks = want_dval ? ceil_div(s.out_features, dw_rows) : 0;
  const int64_t block = group_block(s, T, sizeof(acc_t));
  // Scratch: dx accumulators, or a dW task's decoded columns (as acc_t slots).
  const int64_t scratch_elems = std::max<int64_t>(dx_groups * s.m * T, ceil_div(2 * block * s.n * 4, sizeof(acc_t)));
  const int variant = nm_variant(s.n);
  const uint8_t* idx = indices.const_data_ptr<uint8_t>();
  const acc_t* val = want_dx ? data<acc_t>(values) : nullptr;
  acc_t* dx = want_dx ? dx2.mutable_data_ptr<acc_t>() : nullptr;
  acc_t* dv = want_dval ? dval.mutable_data_ptr<acc_t>() : nullptr;
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
      dx_tasks + dw_tasks, scratch_elems,
      [&](int64_t task, acc_t* scratch) {
        if (task < dx_tasks) {
          const int64_t q0 = task * dx_groups, q1 = std::min(s.groups, q0 + dx_groups);
          for (int64_t r = 0; r < s.out_features; ++r) {
            if (!bytes_below(idx, r * s.K + q0 * s.n, r * s.K + q1 * s.n, s.m)) {
              bad_index = true;
              return;
            }
          }
          const int64_t c0 = q0 * s.m, c1 = q1 * s.m;
          for (int64_t tile = 0; tile < tiling.count; ++tile) {
            k.grad_input[tiling.vecs_log2][variant](NMGradInputTask<acc_t>{
                g_base + tile * s.out_features * T, idx, val, s.out_features, s.groups, q0, q1, s.n, s.m, scratch});
            const int64_t b0 = tile * T;
            k.unpack[tiling.vecs_log2](UnpackTask<acc_t>{scratch, std::min(T, batch - b0), c1 - c0,
                                                         dx + b0 * s.in_features + c0, s.in_features});
          }
        } else {
          const int64_t r0 = (task - dx_tasks) * dw_rows, r1 = std::min(s.out_features, r0 + dw_rows);
          if (!bytes_below(idx, r0 * s.K, r1 * s.K, s.m)) {
            bad_index = true;
            return;
          }
          int32_t* columns = reinterpret_cast<int32_t*>(scratch);
          for (int64_t tile = 0; tile < tiling.count; ++tile) {
            k.grad_values[tiling.vecs_log2](NMGradValuesTask<acc_t>{
                g_base + tile * s.out_features * T, x_base + tile * s.in_features * T, idx, r0, r1, s.groups, s.n,
                s.m, block, columns, dv, /*accumulate=*/tile > 0});
          }
        }
      },
      failed);
  TORCH_CHECK_VALUE(!bad_index, "nm_linear_backward: every entry of indices must lie in [0, m=", s.m, ")");
  TORCH_CHECK(!failed, "nm_linear_backward: a CPU task failed");
}

// --- The ops --------------------------------------------------------------------

at::Tensor nm_linear(const at::Tensor& x, const at::Tensor& values, const at::Tensor& indices, int64_t n, int64_t m,
                     const std::optional<at::Tensor>& bias) {
  const Shape s = check_shape(values, indices, n, m, "nm_linear");
  TORCH_CHECK_VALUE(x.dim() >= 1 && x.size(-1) == s.in_features, "nm_linear: x has shape ", x.sizes(),
                    "; its last dimension must be in_features=", s.in_features);
  TORCH_CHECK_TYPE(values.scalar_type() == x.scalar_type(), "nm_linear: values dtype ", values.scalar_type(),
                   " differs from x dtype ", x.scalar_type());
  const bool has_bias = bias.has_value() && bias->defined();
  if (has_bias) {
    TORCH_CHECK_VALUE(bias->dim() == 1 && bias->size(0) == s.out_features, "nm_linear: bias must have ",
                      s.out_features, " entries, got shape ", bias->sizes());
    TORCH_CHECK_TYPE(bias->scalar_type() == x.scalar_type(), "nm_linear: bias dtype differs from x dtype");
  }
  std::vector<int64_t> out_shape(x.sizes().begin(), x.sizes().end());
  out_shape.back() = s.out_features;
  at::Tensor y;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "nm_linear_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const at::ScalarType acc = c10::CppTypeToScalarType<acc_t>::value;
    const at::Tensor x2 = rows_in(x, acc);
    const at::Tensor val = values.to(acc).contiguous();
    const at::Tensor b = has_bias ? bias->to(acc).contiguous() : at::Tensor();
    at::Tensor y2 = at::empty({x2.size(0), s.out_features}, x.options().dtype(acc));
    if (x2.size(0) > 0 && s.out_features > 0) {
      if (s.in_features == 0) {
        // No entries: the bias (or zeros) for every batch row.
        if (has_bias) {
          y2.copy_(b.unsqueeze(0).expand_as(y2));
        } else {
          y2.zero_();
        }
      } else {
        forward<acc_t>(x2, val, indices, has_bias ? data<acc_t>(b) : nullptr, s, y2);
      }
    }
    y = y2.scalar_type() == x.scalar_type() ? y2 : y2.to(x.scalar_type());
  });
  return at::_unsafe_view(y, out_shape);
}

std::tuple<at::Tensor, at::Tensor> nm_linear_backward(const at::Tensor& grad_out, const at::Tensor& x,
                                                      const at::Tensor& values, const at::Tensor& indices, int64_t n,
                                                      int64_t m, std::array<bool, 2> output_mask) {
  const auto [want_dx, want_dvalues] = output_mask;
  const Shape s = check_shape(values, indices, n, m, "nm_linear_backward");
  TORCH_CHECK_VALUE(x.dim() >= 1 && x.size(-1) == s.in_features, "nm_linear_backward: x has shape ", x.sizes(),
                    "; its last dimension must be in_features=", s.in_features);
  std::vector<int64_t> out_shape(x.sizes().begin(), x.sizes().end());
  out_shape.back() = s.out_features;
  TORCH_CHECK_VALUE(grad_out.sizes() == at::IntArrayRef(out_shape), "nm_linear_backward: grad_out has shape ",
                    grad_out.sizes(), ", expected ", at::IntArrayRef(out_shape));
  TORCH_CHECK_TYPE(grad_out.scalar_type() == x.scalar_type() && values.scalar_type() == x.scalar_type(),
                   "nm_linear_backward: grad_out, x and values must have one dtype");
  at::Tensor dx = empty_output(x), dvalues = empty_output(values);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "nm_linear_backward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const at::ScalarType acc = c10::CppTypeToScalarType<acc_t>::value;
    const at::Tensor g2 = rows_in(grad_out, acc);
    const at::TensorOptions opts = g2.options();
    const int64_t batch = g2.size(0);
    at::Tensor dx2 = want_dx ? at::empty({batch, s.in_features}, opts) : at::Tensor();
    at::Tensor dval = want_dvalues ? at::empty({s.out_features, s.K}, opts) : at::Tensor();
    if (batch > 0 && s.out_features > 0 && s.in_features > 0 && (want_dx || want_dvalues)) {
      // Values are read for dx only (an unsaved placeholder otherwise).
      const at::Tensor val = want_dx ? values.to(acc).contiguous() : at::Tensor();
      backward<acc_t>(g2, x, val, indices, s, dx2, dval);
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
  m.impl("nm_linear", &nm_linear);
  m.impl("nm_linear_backward", &nm_linear_backward);
}

}  // namespace sparsesam::cpu
