// The nm_linear kernels compiled for AVX2+FMA (x86-64 only); the op
// (nm_linear_cpu.cpp) runs them when sparse_linear would run its AVX2
// kernels. As in sparse_linear_avx2.cpp, only the kernel headers (which
// include nothing) are compiled under the target pragma, in a namespace of
// their own; the table is constexpr data.
#include <cstdint>
#include <utility>

#include "nm_linear_simd.h"

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define SPARSESAM_HAVE_NM_AVX2_KERNELS 1
#define SPARSESAM_SPARSE_LINEAR_ISA "avx2"
#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx2,fma"))), apply_to = function)
#else
#pragma GCC push_options
#pragma GCC target("avx2,fma")
#endif
namespace sparsesam::cpu::nm_avx2 {
#include "sparse_linear_kernels.h"
#include "nm_linear_kernels.h"
}  // namespace sparsesam::cpu::nm_avx2
#if defined(__clang__)
#pragma clang attribute pop
#else
#pragma GCC pop_options
#endif
#undef SPARSESAM_SPARSE_LINEAR_ISA
#endif

namespace sparsesam::cpu {

const NMLinearKernels<float>* nm_linear_kernels_avx2_f32() {
#ifdef SPARSESAM_HAVE_NM_AVX2_KERNELS
  return &nm_avx2::kNMLinearKernels<float, 32>;
#else
  return nullptr;
#endif
}

const NMLinearKernels<double>* nm_linear_kernels_avx2_f64() {
#ifdef SPARSESAM_HAVE_NM_AVX2_KERNELS
  return &nm_avx2::kNMLinearKernels<double, 32>;
#else
  return nullptr;
#endif
}

}  // namespace sparsesam::cpu
