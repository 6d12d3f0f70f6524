// The sparse_linear kernels compiled for AVX2+FMA (x86-64 only). The op
// (sparse_linear_cpu.cpp) runs them when the CPU has AVX2 and FMA and ATen's
// own kernels may use AVX2 (ATEN_CPU_CAPABILITY=default turns both off);
// otherwise it runs the same kernels compiled for the baseline ISA.
//
// Only the kernel header is compiled under the target pragma, inside a
// namespace of its own, and it includes nothing: no inline function of a
// library header is ever compiled with AVX2 (the linker could otherwise keep
// the AVX2 copy for every caller). The tables below are constexpr data, so
// reading them runs no AVX2 instruction either.
#include <cstdint>
#include <utility>

#include "sparse_linear_simd.h"

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define SPARSESAM_HAVE_AVX2_KERNELS 1
#define SPARSESAM_SPARSE_LINEAR_ISA "avx2"
#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx2,fma"))), apply_to = function)
#else
#pragma GCC push_options
#pragma GCC target("avx2,fma")
#endif
namespace sparsesam::cpu::avx2 {
#include "sparse_linear_kernels.h"
}  // namespace sparsesam::cpu::avx2
#if defined(__clang__)
#pragma clang attribute pop
#else
#pragma GCC pop_options
#endif
#undef SPARSESAM_SPARSE_LINEAR_ISA
#endif

namespace sparsesam::cpu {

const SparseLinearKernels<float>* sparse_linear_kernels_avx2_f32() {
#ifdef SPARSESAM_HAVE_AVX2_KERNELS
  return &avx2::kSparseLinearKernels<float, 32>;
#else
  return nullptr;
#endif
}

const SparseLinearKernels<double>* sparse_linear_kernels_avx2_f64() {
#ifdef SPARSESAM_HAVE_AVX2_KERNELS
  return &avx2::kSparseLinearKernels<double, 32>;
#else
  return nullptr;
#endif
}

}  // namespace sparsesam::cpu
