// The sparse linear kernels of every format (CSR, BSR, N:M) compiled for
// AVX2+FMA (x86-64 only). Each op (csr_linear_cpu.cpp, bsr_linear_cpu.cpp,
// nm_linear_cpu.cpp) runs these when the CPU has AVX2 and FMA and ATen's own
// kernels may use AVX2 (ATEN_CPU_CAPABILITY=default turns both off);
// otherwise it runs the same kernels compiled for the baseline ISA.
//
// Only the kernel headers are compiled under the target pragma, inside a
// namespace of their own, and they include nothing: no inline function of a
// library header is ever compiled with AVX2 (the linker could otherwise keep
// the AVX2 copy for every caller). The tables below are constexpr data, so
// reading them runs no AVX2 instruction either.
#include <cstdint>
#include <utility>

#include "bsr_linear_simd.h"
#include "nm_linear_simd.h"
#include "csr_linear_simd.h"

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
#include "csr_linear_kernels.h"  // first: the BSR and N:M kernels use its packing and SIMD helpers
#include "bsr_linear_kernels.h"
#include "nm_linear_kernels.h"
}  // namespace sparsesam::cpu::avx2
#if defined(__clang__)
#pragma clang attribute pop
#else
#pragma GCC pop_options
#endif
#undef SPARSESAM_SPARSE_LINEAR_ISA
#endif

// &avx2::<table>, or nullptr where the AVX2 kernels are not built.
#ifdef SPARSESAM_HAVE_AVX2_KERNELS
#define SPARSESAM_AVX2_TABLE(...) (&avx2::__VA_ARGS__)
#else
#define SPARSESAM_AVX2_TABLE(...) nullptr
#endif

namespace sparsesam::cpu {

const CSRLinearKernels<float>* csr_linear_kernels_avx2_f32() {
  return SPARSESAM_AVX2_TABLE(kCSRLinearKernels<float, 32>);
}
const CSRLinearKernels<double>* csr_linear_kernels_avx2_f64() {
  return SPARSESAM_AVX2_TABLE(kCSRLinearKernels<double, 32>);
}
const BsrLinearKernels<float>* bsr_linear_kernels_avx2_f32() {
  return SPARSESAM_AVX2_TABLE(kBsrLinearKernels<float, 32>);
}
const BsrLinearKernels<double>* bsr_linear_kernels_avx2_f64() {
  return SPARSESAM_AVX2_TABLE(kBsrLinearKernels<double, 32>);
}
const NMLinearKernels<float>* nm_linear_kernels_avx2_f32() {
  return SPARSESAM_AVX2_TABLE(kNMLinearKernels<float, 32>);
}
const NMLinearKernels<double>* nm_linear_kernels_avx2_f64() {
  return SPARSESAM_AVX2_TABLE(kNMLinearKernels<double, 32>);
}

}  // namespace sparsesam::cpu
