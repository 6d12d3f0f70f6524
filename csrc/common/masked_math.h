// Element math shared by the CPU and CUDA kernels (host and device).
// The one definition of "apply a mask" and of the fused weight-gradient
// epilogue, so both backends and sparsesam/reference.py agree bit for bit.
#pragma once

#if defined(__CUDACC__) || defined(__HIPCC__)
#define SPARSESAM_HD __host__ __device__ __forceinline__
#else
#define SPARSESAM_HD inline
#endif

namespace sparsesam {

// A bool mask selects: a pruned entry is an exact zero even if w is inf/nan.
template <typename scalar_t>
SPARSESAM_HD scalar_t masked_value(scalar_t w, bool keep) {
  return keep ? w : scalar_t(0);
}

// A floating mask multiplies (soft / learnable masks).
template <typename scalar_t>
SPARSESAM_HD scalar_t masked_value(scalar_t w, scalar_t m) {
  return w * m;
}

}  // namespace sparsesam
