// Masked linear / conv2d built from a backend's two elementwise kernels and
// ATen's GEMM / convolution, for any device. CPU and CUDA instantiate these
// with their own kernels (cpu/masked_weight_cpu.cpp, cuda/masked_weight_cuda.cu),
// so the composition is written once.
//
// Memory: W*M exists only while a GEMM/convolution runs and is recomputed in
// backward, so no second weight-sized tensor is kept alive between passes.
// The weight-gradient epilogue works in place on G, so backward holds at
// most G (becoming dW) plus dM.
#pragma once

#include <ATen/ATen.h>
#include <array>

namespace sparsesam {

// What a backend supplies.
//   apply_mask(weight, mask)                -> W*M (weight dtype)
//   weight_grad_inplace(G, weight, mask, want_dweight, want_dmask)
//                                           -> dM (or undefined); G becomes dW
//                                              in place when want_dweight.
struct MaskKernels {
  at::Tensor (*apply_mask)(const at::Tensor&, const at::Tensor&);
  at::Tensor (*weight_grad_inplace)(at::Tensor&, const at::Tensor&, const at::Tensor&, bool, bool);
};

inline at::Tensor empty_output(const at::Tensor& like) { return at::empty({0}, like.options()); }

// t as a matrix, leading dimensions flattened. The row count is explicit
// because reshape({-1, 0}) is ambiguous when the last dimension is 0.
inline at::Tensor as_rows(const at::Tensor& t) {
  const auto sizes = t.sizes();
  return t.reshape({c10::multiply_integers(sizes.begin(), sizes.end() - 1), sizes.back()});
}

inline std::tuple<at::Tensor, at::Tensor> masked_weight_grad_impl(
    const MaskKernels& k, const at::Tensor& grad_weight, const at::Tensor& weight,
    const at::Tensor& mask, std::array<bool, 2> output_mask) {
  at::Tensor g = grad_weight.contiguous().clone();  // the op is out of place
  at::Tensor dmask = k.weight_grad_inplace(g, weight, mask, output_mask[0], output_mask[1]);
  return {output_mask[0] ? g : empty_output(grad_weight),
          output_mask[1] ? dmask : empty_output(grad_weight)};
}

inline at::Tensor masked_linear_impl(const MaskKernels& k, const at::Tensor& x, const at::Tensor& weight,
                                     const at::Tensor& mask, const std::optional<at::Tensor>& bias) {
  const int64_t out_features = weight.size(0);
  at::Tensor w_eff = k.apply_mask(weight, mask);
  at::Tensor x2 = as_rows(x);
  at::Tensor y2 = (bias.has_value() && bias->defined()) ? at::addmm(*bias, x2, w_eff.t())
                                                        : at::mm(x2, w_eff.t());
  std::vector<int64_t> out_shape(x.sizes().begin(), x.sizes().end());
  out_shape.back() = out_features;
  // _unsafe_view (as ATen's matmul does): same storage, but not marked as a
  // view, since an op's output must not alias (autograd forbids in-place on it).
  return at::_unsafe_view(y2, out_shape);
}

inline std::tuple<at::Tensor, at::Tensor, at::Tensor> masked_linear_backward_impl(
    const MaskKernels& k, const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& weight,
    const at::Tensor& mask, std::array<bool, 3> output_mask) {
  const auto [want_dx, want_dweight, want_dmask] = output_mask;
  at::Tensor g2 = as_rows(grad_out);
  at::Tensor dx = empty_output(x), dweight = empty_output(weight), dmask = empty_output(weight);
  if (want_dx) {
    dx = at::_unsafe_view(at::mm(g2, k.apply_mask(weight, mask)), x.sizes());
  }
  if (want_dweight || want_dmask) {
    at::Tensor g = at::mm(g2.t(), as_rows(x));  // G = dL/d(W*M), fresh buffer
    at::Tensor dm = k.weight_grad_inplace(g, weight, mask, want_dweight, want_dmask);
    if (want_dweight) dweight = g;
    if (want_dmask) dmask = dm;
  }
  return {dx, dweight, dmask};
}

inline at::Tensor masked_conv2d_impl(const MaskKernels& k, const at::Tensor& x, const at::Tensor& weight,
                                     const at::Tensor& mask, const std::optional<at::Tensor>& bias,
                                     at::IntArrayRef stride, at::IntArrayRef padding,
                                     at::IntArrayRef dilation, int64_t groups) {
  at::Tensor w_eff = k.apply_mask(weight, mask);
  return at::convolution(x, w_eff, bias, stride, padding, dilation, /*transposed=*/false,
                         /*output_padding=*/{0, 0}, groups);
}

inline std::tuple<at::Tensor, at::Tensor, at::Tensor> masked_conv2d_backward_impl(
    const MaskKernels& k, const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& weight,
    const at::Tensor& mask, at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
    int64_t groups, std::array<bool, 3> output_mask) {
  const auto [want_dx, want_dweight, want_dmask] = output_mask;
  const bool want_g = want_dweight || want_dmask;
  // The weight argument is read only for grad_input (and its shape), so
  // W*M is built only when dx is asked for.
  at::Tensor w_for_dx = want_dx ? k.apply_mask(weight, mask) : weight;
  auto [dx, g, unused_dbias] = at::convolution_backward(
      grad_out, x, w_for_dx, /*bias_sizes=*/std::nullopt, stride, padding, dilation,
      /*transposed=*/false, /*output_padding=*/{0, 0}, groups, {want_dx, want_g, false});
  at::Tensor dweight = empty_output(weight), dmask = empty_output(weight);
  if (want_g) {
    if (!g.is_contiguous()) g = g.contiguous();
    at::Tensor dm = k.weight_grad_inplace(g, weight, mask, want_dweight, want_dmask);
    if (want_dweight) dweight = g;
    if (want_dmask) dmask = dm;
  }
  return {want_dx ? dx : empty_output(x), dweight, dmask};
}

}  // namespace sparsesam
