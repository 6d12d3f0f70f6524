// What the CPU sparse matmul ops of every format (csr_linear_cpu.cpp: CSR,
// bsr_linear_cpu.cpp, nm_linear_cpu.cpp) share around their kernels: which ISA
// runs, the one-parallel-region task runner, and the views of the operands.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <thread>
#include <vector>

#include "../common/masked_layers.h"

namespace sparsesam::cpu {

// Whether the AVX2+FMA kernels (sparse_formats_avx2.cpp) run: the CPU has
// them and ATen may use AVX2 (ATEN_CPU_CAPABILITY=default keeps ATen's kernels
// off AVX2: ours follow).
inline bool cpu_runs_avx2() {
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
  static const bool yes = [] {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && at::get_cpu_capability() != "DEFAULT";
  }();
  return yes;
#else
  return false;
#endif
}

// An int32 index tensor of op's: int32, on the CPU, 1-D with numel entries, contiguous.
inline void check_index_tensor(const char* op, const at::Tensor& t, const char* name, int64_t numel) {
  TORCH_CHECK_TYPE(t.scalar_type() == at::kInt, op, ": ", name, " must be int32, got ", t.scalar_type());
  TORCH_CHECK_VALUE(t.device().is_cpu(), op, ": ", name, " must be on the CPU, got ", t.device());
  TORCH_CHECK_VALUE(t.dim() == 1 && t.numel() == numel, op, ": ", name, " must be 1-D with ", numel,
                    " entries, got shape ", t.sizes());
  TORCH_CHECK_VALUE(t.is_contiguous(), op, ": ", name, " must be contiguous");
}

// Offsets: ptr[0] == 0, non-decreasing, ptr[last] == total (the entries or
// blocks, named total_name in the message). O(lines), serial.
inline void check_offsets(const char* op, const at::Tensor& ptr, const char* name, int64_t total,
                          const char* total_name) {
  const int32_t* p = ptr.const_data_ptr<int32_t>();
  const int64_t n = ptr.numel() - 1;
  TORCH_CHECK_VALUE(p[0] == 0 && p[n] == total, op, ": ", name, " must start at 0 and end at ", total_name, "=",
                    total, ", got ", p[0], " and ", p[n]);
  bool sorted = true;
  for (int64_t i = 0; i < n; ++i) sorted &= p[i] <= p[i + 1];
  TORCH_CHECK_VALUE(sorted, op, ": ", name, " must be non-decreasing");
}

// Whether idx[begin, end) all lie in [0, bound) (negatives wrap high).
inline bool indices_below(const int32_t* idx, int64_t begin, int64_t end, int64_t bound) {
  uint32_t worst = 0;
  for (int64_t j = begin; j < end; ++j) worst = std::max(worst, static_cast<uint32_t>(idx[j]));
  return end == begin || int64_t(worst) < bound;
}

// Runs first(i) for i in [0, n_first), then, once all of them are done,
// second(i, scratch) for i in [0, n_second), in ONE parallel region. Threads
// take the next task from shared counters; each owns one scratch buffer of
// scratch_elems (allocated on its first second-phase task). Tasks must not
// throw (one that did would be counted as done, and the op would raise
// afterwards through `failed`).
template <typename acc_t, typename First, typename Second>
void run_phases(int64_t n_first, const First& first, int64_t n_second, int64_t scratch_elems, const Second& second,
                std::atomic<bool>& failed) {
  if (n_first + n_second == 0) return;
  std::atomic<int64_t> next_first{0}, done_first{0}, next_second{0};
  const int64_t threads = std::clamp<int64_t>(at::get_num_threads(), 1, std::max(n_first, n_second));
  at::parallel_for(0, threads, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> scratch;
    for (int64_t slot = begin; slot < end; ++slot) {
      for (int64_t i = next_first.fetch_add(1); i < n_first; i = next_first.fetch_add(1)) {
        try {
          first(i);
        } catch (...) {
          failed = true;
        }
        done_first.fetch_add(1, std::memory_order_release);
      }
      while (done_first.load(std::memory_order_acquire) < n_first) std::this_thread::yield();
      for (int64_t i = next_second.fetch_add(1); i < n_second; i = next_second.fetch_add(1)) {
        try {
          if (scratch.empty() && scratch_elems > 0) scratch.resize(scratch_elems);
          second(i, scratch.data());
        } catch (...) {
          failed = true;
        }
      }
    }
  });
}

// t as a [batch][features] matrix in acc whose rows are unit-stride and do not
// overlap (a view of t when it already is one, else a copy).
inline at::Tensor rows_in(const at::Tensor& t, at::ScalarType acc) {
  at::Tensor m = as_rows(t);
  if (m.scalar_type() != acc) m = m.to(acc);
  if (m.size(1) > 1 && m.stride(1) != 1) m = m.contiguous();
  if (m.size(0) > 1 && m.stride(0) < m.size(1)) m = m.contiguous();
  return m;
}

inline int64_t row_stride(const at::Tensor& m) { return m.size(0) > 1 ? m.stride(0) : m.size(1); }

template <typename acc_t>
const acc_t* data(const at::Tensor& t) {
  return t.const_data_ptr<acc_t>();
}

}  // namespace sparsesam::cpu
