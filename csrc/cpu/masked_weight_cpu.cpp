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

template <typename scalar_t, typename mask_t>
void apply_mask_kernel(const scalar_t* w, const mask_t* m, scalar_t* out, int64_t n) {
  at::parallel_for(0, n, kGrain, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) out[i] = masked_value(w[i], m[i]);
  });
}

template <typename scalar_t, typename mask_t>
void weight_grad_kernel(scalar_t* g, const scalar_t* w, const mask_t* m, scalar_t* dmask,
                        bool want_dweight, int64_t n) {
  at::parallel_for(0, n, kGrain, [&](int64_t begin, int64_t end) {
    // Branches hoisted out of the loop so each variant vectorises.
    if (dmask != nullptr && want_dweight) {
      for (int64_t i = begin; i < end; ++i) {
        const scalar_t gi = g[i];
        dmask[i] = gi * w[i];
        g[i] = masked_value(gi, m[i]);
      }
    } else if (dmask != nullptr) {
      for (int64_t i = begin; i < end; ++i) dmask[i] = g[i] * w[i];
    } else if (want_dweight) {
      for (int64_t i = begin; i < end; ++i) g[i] = masked_value(g[i], m[i]);
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
      apply_mask_kernel(w.const_data_ptr<scalar_t>(), m.const_data_ptr<bool>(),
                        out.mutable_data_ptr<scalar_t>(), w.numel());
    } else {
      TORCH_CHECK(m.scalar_type() == w.scalar_type(), "apply_mask: a float mask must have the weight's dtype");
      apply_mask_kernel(w.const_data_ptr<scalar_t>(), m.const_data_ptr<scalar_t>(),
                        out.mutable_data_ptr<scalar_t>(), w.numel());
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
    scalar_t* dm = want_dmask ? dmask.mutable_data_ptr<scalar_t>() : nullptr;
    if (m.scalar_type() == at::kBool) {
      weight_grad_kernel(grad.mutable_data_ptr<scalar_t>(), w.const_data_ptr<scalar_t>(),
                         m.const_data_ptr<bool>(), dm, want_dweight, grad.numel());
    } else {
      weight_grad_kernel(grad.mutable_data_ptr<scalar_t>(), w.const_data_ptr<scalar_t>(),
                         m.const_data_ptr<scalar_t>(), dm, want_dweight, grad.numel());
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
