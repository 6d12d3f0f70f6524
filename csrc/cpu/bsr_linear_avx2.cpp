// The bsr_linear kernels compiled for AVX2+FMA (x86-64 only), in the way of
// sparse_linear_avx2.cpp: only the kernel headers are compiled under the
// target pragma, inside a namespace of their own, and they include nothing,
// so no inline function of a library header is ever compiled with AVX2. The
// op (bsr_linear_cpu.cpp) runs these when the CPU has AVX2 and FMA and ATen
// may use AVX2; otherwise the same kernels compiled for the baseline ISA.
#include <cstdint>
#include <utility>

#include "bsr_linear_simd.h"
#include "sparse_linear_simd.h"

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define SPARSESAM_HAVE_BSR_AVX2_KERNELS 1
#define SPARSESAM_SPARSE_LINEAR_ISA "avx2"
#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx2,fma"))), apply_to = function)
#else
#pragma GCC push_options
#pragma GCC target("avx2,fma")
#endif
namespace sparsesam::cpu::bsr_avx2 {
#include "sparse_linear_kernels.h"
#include "bsr_linear_kernels.h"
}  // namespace sparsesam::cpu::bsr_avx2
#if defined(__clang__)
#pragma clang attribute pop
#else
#pragma GCC pop_options
#endif
#undef SPARSESAM_SPARSE_LINEAR_ISA
#endif

namespace sparsesam::cpu {

const BsrLinearKernels<float>* bsr_linear_kernels_avx2_f32() {
#ifdef SPARSESAM_HAVE_BSR_AVX2_KERNELS
  return &bsr_avx2::kBsrLinearKernels<float, 32>;
#else
  return nullptr;
#endif
}

const BsrLinearKernels<double>* bsr_linear_kernels_avx2_f64() {
#ifdef SPARSESAM_HAVE_BSR_AVX2_KERNELS
  return &bsr_avx2::kBsrLinearKernels<double, 32>;
#else
  return nullptr;
#endif
}

}  // namespace sparsesam::cpu
