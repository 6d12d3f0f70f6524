// CPU kernels for apply_mask and masked_weight_grad (the fused epilogue).
//
// Both are memory-bound single passes. at::parallel_for splits the flat
// range over OpenMP threads; the inner loops are plain indexed loops over
// contiguous memory that GCC vectorises at -O3 (a select for bool masks, a
// multiply for float masks). Reduced-precision types compute in float and
// round once, exactly as ATen's own elementwise ops do.
#include "masked_weight_cpu.h"

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "../common/masked_math.h"

namespace sparsesam::cpu {
namespace {

// ~ 32 K elements per task: large enough to amortise the fork, small
// enough to balance 2-64 threads over a 1 M-element weight.
constexpr int64_t kGrain = 32768;

// The unsigned integer as wide as a scalar type. A bool mask is applied as
// a bitwise AND with all-ones / all-zeros: GCC vectorises that loop (it does
// not vectorise `keep ? w : 0`, a conditional load), the kept bits are
// copied untouched and a pruned entry becomes +0.0 even if w is inf/nan,
// exactly the select of common/masked_math.h.
template <size_t bytes> struct UIntOfSize;
template <> struct UIntOfSize<2> { using type = uint16_t; };
template <> struct UIntOfSize<4> { using type = uint32_t; };
template <> struct UIntOfSize<8> { using type = uint64_t; };

template <typename bits_t>
inline bits_t keep_bits(uint8_t keep) {
  return bits_t(0) - bits_t(keep != 0);
}

// The kernels take raw (restrict) pointers of the storage's bit type or
// element type; each is a single vectorisable loop over [begin, end).
template <typename bits_t>
void select_bits(const bits_t* __restrict w, const uint8_t* __restrict m, bits_t* __restrict out, int64_t n) {
  at::parallel_for(0, n, kGrain, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) out[i] = w[i] & keep_bits<bits_t>(m[i]);
  });
}

template <typename bits_t>
void select_bits_inplace(bits_t* __restrict g, const uint8_t* __restrict m, int64_t n) {
  at::parallel_for(0, n, kGrain, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) g[i] &= keep_bits<bits_t>(m[i]);
  });
}

template <typename scalar_t>
void multiply(const scalar_t* __restrict w, const scalar_t* __restrict m, scalar_t* __restrict out, int64_t n) {
  at::parallel_for(0, n, kGrain, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) out[i] = masked_value(w[i], m[i]);
  });
}

template <typename scalar_t>
void multiply_inplace(scalar_t* __restrict g, const scalar_t* __restrict m, int64_t n) {
  at::parallel_for(0, n, kGrain, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) g[i] = masked_value(g[i], m[i]);
  });
}

// The fused epilogue for a float mask: dM = G*W and, when wanted, G := G*M,
// reading each G once.
template <typename scalar_t>
void weight_and_mask_grad(scalar_t* __restrict g, const scalar_t* __restrict w, const scalar_t* __restrict m,
                          scalar_t* __restrict dmask, bool want_dweight, int64_t n) {
  at::parallel_for(0, n, kGrain, [&](int64_t begin, int64_t end) {
    if (want_dweight) {
      for (int64_t i = begin; i < end; ++i) {
        const scalar_t gi = g[i];
        dmask[i] = gi * w[i];
        g[i] = masked_value(gi, m[i]);
      }
    } else {
      for (int64_t i = begin; i < end; ++i) dmask[i] = g[i] * w[i];
    }
  });
}

}  // namespace

at::Tensor apply_mask(const at::Tensor& weight, const at::Tensor& mask) {
  TORCH_CHECK(weight.sizes() == mask.sizes(), "apply_mask: mask shape ", mask.sizes(),
              " must equal weight shape ", weight.sizes());
  const at::Tensor w = weight.contiguous();
  const at::Tensor m = mask.contiguous();
  at::Tensor out = at::empty_like(w, at::MemoryFormat::Contiguous);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, w.scalar_type(), "apply_mask_cpu", [&] {
    if (m.scalar_type() == at::kBool) {
      using bits_t = typename UIntOfSize<sizeof(scalar_t)>::type;
      select_bits(static_cast<const bits_t*>(w.const_data_ptr()), static_cast<const uint8_t*>(m.const_data_ptr()),
                  static_cast<bits_t*>(out.mutable_data_ptr()), w.numel());
    } else {
      TORCH_CHECK(m.scalar_type() == w.scalar_type(), "apply_mask: a float mask must have the weight's dtype");
      multiply(w.const_data_ptr<scalar_t>(), m.const_data_ptr<scalar_t>(), out.mutable_data_ptr<scalar_t>(), w.numel());
    }
  });
  return out;
}

at::Tensor weight_grad_inplace(at::Tensor& grad, const at::Tensor& weight, const at::Tensor& mask,
                               bool want_dweight, bool want_dmask) {
  TORCH_CHECK(grad.is_contiguous(), "weight_grad_inplace: grad must be contiguous");
  TORCH_CHECK(grad.sizes() == weight.sizes() && weight.sizes() == mask.sizes(),
              "masked_weight_grad: grad_weight, weight and mask must have one shape");
  TORCH_CHECK(!(want_dmask && mask.scalar_type() == at::kBool),
              "masked_weight_grad: a bool mask has no gradient");
  // W is read only for dM (callers may pass a zero-stride placeholder otherwise).
  const at::Tensor w = want_dmask ? weight.contiguous() : weight;
  const at::Tensor m = mask.contiguous();
  at::Tensor dmask = want_dmask ? at::empty_like(grad, at::MemoryFormat::Contiguous) : at::Tensor();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, grad.scalar_type(), "masked_weight_grad_cpu", [&] {
    if (want_dmask) {  // a float mask (checked above)
      weight_and_mask_grad(grad.mutable_data_ptr<scalar_t>(), w.const_data_ptr<scalar_t>(), m.const_data_ptr<scalar_t>(),
                           dmask.mutable_data_ptr<scalar_t>(), want_dweight, grad.numel());
    } else if (want_dweight && m.scalar_type() == at::kBool) {
      using bits_t = typename UIntOfSize<sizeof(scalar_t)>::type;
      select_bits_inplace(static_cast<bits_t*>(grad.mutable_data_ptr()), static_cast<const uint8_t*>(m.const_data_ptr()),
                          grad.numel());
    } else if (want_dweight) {
      multiply_inplace(grad.mutable_data_ptr<scalar_t>(), m.const_data_ptr<scalar_t>(), grad.numel());
    }
  });
  return dmask;
}

namespace {

std::tuple<at::Tensor, at::Tensor> masked_weight_grad(const at::Tensor& grad_weight, const at::Tensor& weight,
                                                      const at::Tensor& mask, std::array<bool, 2> output_mask) {
  return masked_weight_grad_impl(kernels(), grad_weight, weight, mask, output_mask);
}

}  // namespace

TORCH_LIBRARY_IMPL(sparsesam, CPU, m) {
  m.impl("apply_mask", &apply_mask);
  m.impl("masked_weight_grad", &masked_weight_grad);
}

}  // namespace sparsesam::cpu
