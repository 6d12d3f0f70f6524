// C++ test of the sparsesam CPU kernels of the masked (dense) ops --
// apply_mask, masked_weight_grad, masked_linear, masked_conv2d and their
// backwards -- called the way every user reaches them: through the
// dispatcher, by schema name, on CPU tensors. Each result is compared with
// plain ATen math in float64 (the definitions of sparsesam/reference.py), for
// float32 and float64, odd sizes (1, 7, 129), an empty batch, and every
// output_mask combination of the backward ops. The harness is check.h; the
// other op families have their own files, main.cpp runs them all.
#include <ATen/ATen.h>

#include <array>
#include <cmath>
#include <limits>
#include <optional>
#include <string>
#include <vector>

#include "check.h"

namespace {

using namespace sparsesam_test;

// ---- the ops, as the dispatcher sees them ---------------------------------

Tensor apply_mask(const Tensor& w, const Tensor& m) {
  static const auto h = op<Tensor(const Tensor&, const Tensor&)>("sparsesam::apply_mask");
  return h.call(w, m);
}

Tensor2 masked_weight_grad(const Tensor& g, const Tensor& w, const Tensor& m, std::array<bool, 2> out) {
  static const auto h = op<Tensor2(const Tensor&, const Tensor&, const Tensor&, std::array<bool, 2>)>(
      "sparsesam::masked_weight_grad");
  return h.call(g, w, m, out);
}

Tensor masked_linear(const Tensor& x, const Tensor& w, const Tensor& m, const OptTensor& b) {
  static const auto h =
      op<Tensor(const Tensor&, const Tensor&, const Tensor&, const OptTensor&)>("sparsesam::masked_linear");
  return h.call(x, w, m, b);
}

Tensor3 masked_linear_backward(const Tensor& g, const Tensor& x, const Tensor& w, const Tensor& m,
                               std::array<bool, 3> out) {
  static const auto h =
      op<Tensor3(const Tensor&, const Tensor&, const Tensor&, const Tensor&, std::array<bool, 3>)>(
          "sparsesam::masked_linear_backward");
  return h.call(g, x, w, m, out);
}

struct ConvArgs {
  std::vector<int64_t> stride, padding, dilation;
  int64_t groups;
};

Tensor masked_conv2d(const Tensor& x, const Tensor& w, const Tensor& m, const OptTensor& b, const ConvArgs& c) {
  static const auto h = op<Tensor(const Tensor&, const Tensor&, const Tensor&, const OptTensor&, at::IntArrayRef,
                                  at::IntArrayRef, at::IntArrayRef, int64_t)>("sparsesam::masked_conv2d");
  return h.call(x, w, m, b, c.stride, c.padding, c.dilation, c.groups);
}

Tensor3 masked_conv2d_backward(const Tensor& g, const Tensor& x, const Tensor& w, const Tensor& m,
                               const ConvArgs& c, std::array<bool, 3> out) {
  static const auto h = op<Tensor3(const Tensor&, const Tensor&, const Tensor&, const Tensor&, at::IntArrayRef,
                                   at::IntArrayRef, at::IntArrayRef, int64_t, std::array<bool, 3>)>(
      "sparsesam::masked_conv2d_backward");
  return h.call(g, x, w, m, c.stride, c.padding, c.dilation, c.groups, out);
}

// ---- float64 references (sparsesam/reference.py) ------------------------

Tensor ref_apply_mask(const Tensor& w, const Tensor& m) {
  if (m.scalar_type() == at::kBool) return at::where(m, f64(w), 0.0);  // selects: inf/nan pruned -> 0
  return f64(w) * f64(m);
}

std::string mask_name(const Tensor& m) { return m.scalar_type() == at::kBool ? "bool" : "float"; }

std::string out_name(std::array<bool, 3> o) { return c10::str("[", o[0], o[1], o[2], "]"); }

// A weight/mask pair. With a bool mask every pruned weight is made inf or
// nan: a selecting mask must still yield exact zeros, in every op.
std::pair<Tensor, Tensor> make_weight_and_mask(at::IntArrayRef shape, at::ScalarType dtype, bool bool_mask) {
  const auto opts = at::TensorOptions().dtype(dtype);
  Tensor w = at::randn(shape, opts);
  if (!bool_mask) return {w, at::rand(shape, opts)};
  Tensor m = at::rand(shape, opts) < 0.6;
  Tensor poison = at::where(at::rand(shape, opts) < 0.5, std::numeric_limits<double>::infinity(),
                            std::numeric_limits<double>::quiet_NaN())
                      .to(dtype);
  return {at::where(m, w, poison), m};
}

const std::array<at::ScalarType, 2> kDtypes{at::kFloat, at::kDouble};

// ---- tests -------------------------------------------------------------

void test_registration() {
  // Every op with a CPU kernel (mask_flip_scores / mask_flip_topk are left out: they are being removed).
  for (const char* name :
       {"sparsesam::apply_mask", "sparsesam::masked_weight_grad", "sparsesam::masked_linear",
        "sparsesam::masked_linear_backward", "sparsesam::masked_conv2d", "sparsesam::masked_conv2d_backward",
        "sparsesam::sam_grad_sq_norm", "sparsesam::sam_perturb_", "sparsesam::sgd_step_",
        "sparsesam::mask_grad_sq_norm", "sparsesam::mask_ascent_", "sparsesam::mask_score_grad",
        "sparsesam::csr_linear", "sparsesam::csr_linear_backward", "sparsesam::sparse_conv2d",
        "sparsesam::sparse_conv2d_backward", "sparsesam::bsr_linear", "sparsesam::bsr_linear_backward",
        "sparsesam::nm_linear", "sparsesam::nm_linear_backward"}) {
    const auto schema = c10::Dispatcher::singleton().findSchema({name, ""});
    EXPECT(schema.has_value(), name,
          " is not registered (was libsparsesam_ops dropped by the linker, or its TORCH_LIBRARY lost?)");
    if (schema) EXPECT(schema->hasKernelForDispatchKey(c10::DispatchKey::CPU), name, " has no CPU kernel");
  }
}

void test_apply_mask() {
  // 1000 x 129 spans several parallel_for chunks (grain 32768).
  const std::vector<std::vector<int64_t>> shapes{{1}, {7}, {129}, {7, 129}, {129, 1, 7}, {1000, 129}, {0, 7}};
  for (const auto dtype : kDtypes) {
    for (const auto& shape : shapes) {
      for (const bool bool_mask : {true, false}) {
        const std::string what =
            c10::str("apply_mask ", dtype, " ", at::IntArrayRef(shape), " ", bool_mask ? "bool" : "float");
        auto [w, m] = make_weight_and_mask(shape, dtype, bool_mask);
        const Tensor out = apply_mask(w, m);
        expect_close(out, ref_apply_mask(w, m), dtype, what);
        EXPECT(out.is_contiguous(), what, ": result not contiguous");
        if (bool_mask) {
          // Exact zeros where pruned, however poisoned the weight there.
          EXPECT(at::equal(out, at::where(m, w, at::zeros({}, w.options()))), what, ": not an exact select");
          EXPECT(!out.isnan().any().item<bool>() && out.isfinite().all().item<bool>(), what, ": inf/nan leaked");
        } else {
          // One rounding of one product: bit-identical to ATen's mul.
          EXPECT(at::equal(out, w * m), what, ": differs from w * m");
        }
        if (w.numel() > 0) EXPECT(out.data_ptr() != w.data_ptr(), what, ": result aliases the weight");
      }
    }
    // Non-contiguous operands are read through .contiguous().
    auto [w, m] = make_weight_and_mask({129, 7}, dtype, false);
    expect_close(apply_mask(w.t(), m.t()), ref_apply_mask(w.t(), m.t()), dtype,
                 c10::str("apply_mask ", dtype, " transposed"));
  }
  // The single inf case the schema documents, spelled out.
  const Tensor w = at::tensor({1.5f, std::numeric_limits<float>::infinity(), -2.0f});
  const Tensor out = apply_mask(w, at::tensor({1, 0, 1}).to(at::kBool));  // at::tensor has no bool overload
  EXPECT(out[1].item<float>() == 0.0f && !std::signbit(out[1].item<float>()), "bool mask: inf weight -> +0, got ",
        out[1].item<float>());
  EXPECT(out[0].item<float>() == 1.5f && out[2].item<float>() == -2.0f, "bool mask: kept entries unchanged");

  expect_throws([] { apply_mask(at::ones({3, 4}), at::ones({4, 3})); }, "mask shape", "apply_mask shape mismatch");
  expect_throws([] { apply_mask(at::ones({3}), at::ones({3}, at::kDouble)); }, "dtype",
                "apply_mask float mask of another dtype");
}

void test_masked_weight_grad() {
  const std::vector<std::vector<int64_t>> shapes{{1}, {7, 129}, {129, 7, 1}, {1000, 129}, {0, 7}};
  for (const auto dtype : kDtypes) {
    for (const auto& shape : shapes) {
      for (const bool bool_mask : {true, false}) {
        auto [w, m] = make_weight_and_mask(shape, dtype, bool_mask);
        const Tensor g = at::randn(shape, w.options());
        const Tensor g_before = g.clone();
        for (const bool want_dw : {false, true}) {
          for (const bool want_dm : {false, true}) {
            const std::string what = c10::str("masked_weight_grad ", dtype, " ", at::IntArrayRef(shape), " ",
                                              mask_name(m), " [", want_dw, want_dm, "]");
            if (bool_mask && want_dm) {
              expect_throws([&] { masked_weight_grad(g, w, m, {want_dw, want_dm}); }, "no gradient", what);
              continue;
            }
            const auto [dw, dm] = masked_weight_grad(g, w, m, {want_dw, want_dm});
            if (want_dw) {
              expect_close(dw, ref_apply_mask(g, m), dtype, what + " dW");
            } else {
              EXPECT(is_empty_output(dw) && dw.scalar_type() == dtype, what, ": dW not asked for but ", dw.sizes());
            }
            if (want_dm) {
              expect_close(dm, f64(g) * f64(w), dtype, what + " dM");
            } else {
              EXPECT(is_empty_output(dm) && dm.scalar_type() == dtype, what, ": dM not asked for but ", dm.sizes());
            }
            EXPECT(at::equal(g, g_before), what, ": grad_weight was modified (the op is out of place)");
          }
        }
      }
    }
  }
  expect_throws([] { masked_weight_grad(at::ones({2, 3}), at::ones({3, 2}), at::ones({2, 3}), {true, true}); },
                "one shape", "masked_weight_grad shape mismatch");
}

struct LinearCase {
  std::vector<int64_t> batch;  // leading dims of x
  int64_t in, out;
  bool bias;
};

void test_masked_linear() {
  const std::vector<LinearCase> cases{
      {{1}, 1, 1, false},  {{7}, 129, 7, true}, {{129}, 7, 129, false}, {{1}, 129, 129, true},
      {{0}, 7, 5, true},   {{0}, 129, 1, false}, {{2, 3}, 7, 129, true}, {{3, 1, 7}, 129, 1, false},
      // Zero features: an empty reduction (y = bias) and an empty output.
      {{7}, 0, 5, true},   {{0}, 0, 3, false},   {{2, 3}, 7, 0, true},
  };
  const std::vector<std::array<bool, 3>> out_masks{
      {true, true, true},  {true, false, false}, {false, true, false}, {false, false, true},
      {true, true, false}, {false, true, true},  {false, false, false}};
  for (const auto dtype : kDtypes) {
    for (const auto& c : cases) {
      for (const bool bool_mask : {true, false}) {
        const auto opts = at::TensorOptions().dtype(dtype);
        std::vector<int64_t> x_shape = c.batch, y_shape = c.batch;
        x_shape.push_back(c.in);
        y_shape.push_back(c.out);
        const Tensor x = at::randn(x_shape, opts);
        auto [w, m] = make_weight_and_mask({c.out, c.in}, dtype, bool_mask);
        const OptTensor b = c.bias ? OptTensor(at::randn({c.out}, opts)) : std::nullopt;
        const std::string what = c10::str("masked_linear ", dtype, " x", at::IntArrayRef(x_shape), " W[", c.out, ",",
                                          c.in, "] ", mask_name(m), c.bias ? " bias" : "");
        const Tensor wm = ref_apply_mask(w, m);

        const Tensor y = masked_linear(x, w, m, b);
        expect_close(y, at::linear(f64(x), wm, b ? std::optional<Tensor>(f64(*b)) : std::nullopt), dtype, what + " y");

        const Tensor g = at::randn(y_shape, opts);
        const Tensor ref_dx = at::matmul(f64(g), wm);
        const Tensor ref_G = at::mm(rows(f64(g)).t(), rows(f64(x)));  // dL/d(W*M)
        for (const auto o : out_masks) {
          const std::string bwd = what + " backward " + out_name(o);
          if (bool_mask && o[2]) {
            expect_throws([&] { masked_linear_backward(g, x, w, m, o); }, "no gradient", bwd);
            continue;
          }
          const auto [dx, dw, dm] = masked_linear_backward(g, x, w, m, o);
          if (o[0]) expect_close(dx, ref_dx, dtype, bwd + " dx");
          else EXPECT(is_empty_output(dx), bwd, ": dx not asked for but shape ", dx.sizes());
          if (o[1]) expect_close(dw, ref_apply_mask(ref_G, m), dtype, bwd + " dW");
          else EXPECT(is_empty_output(dw), bwd, ": dW not asked for but shape ", dw.sizes());
          if (o[2]) expect_close(dm, ref_G * f64(w), dtype, bwd + " dM");
          else EXPECT(is_empty_output(dm), bwd, ": dM not asked for but shape ", dm.sizes());
        }
      }
    }
  }
}

struct ConvCase {
  int64_t n, c, h, w, o, kh, kw;
  ConvArgs args;
  bool bias;
};

void test_masked_conv2d() {
  const std::vector<ConvCase> cases{
      {1, 1, 1, 1, 1, 1, 1, {{1, 1}, {0, 0}, {1, 1}, 1}, false},
      {2, 3, 7, 9, 7, 3, 3, {{1, 1}, {1, 1}, {1, 1}, 1}, true},
      {1, 129, 3, 3, 7, 1, 1, {{1, 1}, {0, 0}, {1, 1}, 1}, false},
      {7, 4, 9, 7, 6, 3, 2, {{2, 1}, {1, 0}, {1, 2}, 2}, true},  // grouped, strided, dilated
      {2, 7, 5, 5, 7, 3, 3, {{1, 1}, {1, 1}, {1, 1}, 7}, true},  // depthwise
      {3, 1, 129, 1, 1, 3, 1, {{2, 1}, {1, 0}, {1, 1}, 1}, false},
      {0, 3, 5, 5, 7, 3, 3, {{1, 1}, {1, 1}, {1, 1}, 1}, true},  // empty batch
  };
  const std::vector<std::array<bool, 3>> out_masks{
      {true, true, true}, {true, false, false}, {false, true, false}, {false, false, true}, {false, false, false}};
  for (const auto dtype : kDtypes) {
    for (const auto& c : cases) {
      for (const bool bool_mask : {true, false}) {
        const auto opts = at::TensorOptions().dtype(dtype);
        const ConvArgs& a = c.args;
        const Tensor x = at::randn({c.n, c.c, c.h, c.w}, opts);
        auto [w, m] = make_weight_and_mask({c.o, c.c / a.groups, c.kh, c.kw}, dtype, bool_mask);
        const OptTensor b = c.bias ? OptTensor(at::randn({c.o}, opts)) : std::nullopt;
        const std::string what = c10::str("masked_conv2d ", dtype, " x", x.sizes(), " W", w.sizes(), " s",
                                          at::IntArrayRef(a.stride), " p", at::IntArrayRef(a.padding), " d",
                                          at::IntArrayRef(a.dilation), " g", a.groups, " ", mask_name(m),
                                          c.bias ? " bias" : "");
        const Tensor wm = ref_apply_mask(w, m);

        const Tensor y = masked_conv2d(x, w, m, b, a);
        const Tensor ref_y = at::conv2d(f64(x), wm, b ? std::optional<Tensor>(f64(*b)) : std::nullopt, a.stride,
                                        a.padding, a.dilation, a.groups);
        expect_close(y, ref_y, dtype, what + " y");

        const Tensor g = at::randn(ref_y.sizes(), opts);
        const auto [ref_dx, ref_G, unused] =
            at::convolution_backward(f64(g), f64(x), wm, std::nullopt, a.stride, a.padding, a.dilation,
                                     /*transposed=*/false, /*output_padding=*/{0, 0}, a.groups, {true, true, false});
        for (const auto o : out_masks) {
          const std::string bwd = what + " backward " + out_name(o);
          if (bool_mask && o[2]) {
            expect_throws([&] { masked_conv2d_backward(g, x, w, m, a, o); }, "no gradient", bwd);
            continue;
          }
          const auto [dx, dw, dm] = masked_conv2d_backward(g, x, w, m, a, o);
          if (o[0]) expect_close(dx, ref_dx, dtype, bwd + " dx");
          else EXPECT(is_empty_output(dx), bwd, ": dx not asked for but shape ", dx.sizes());
          if (o[1]) expect_close(dw, ref_apply_mask(ref_G, m), dtype, bwd + " dW");
          else EXPECT(is_empty_output(dw), bwd, ": dW not asked for but shape ", dw.sizes());
          if (o[2]) expect_close(dm, ref_G * f64(w), dtype, bwd + " dM");
          else EXPECT(is_empty_output(dm), bwd, ": dM not asked for but shape ", dm.sizes());
        }
      }
    }
  }
}

}  // namespace

void run_masked_op_tests() {
  run_group("registration", test_registration);
  run_group("apply_mask", test_apply_mask);
  run_group("masked_weight_grad", test_masked_weight_grad);
  run_group("masked_linear (+backward)", test_masked_linear);
  run_group("masked_conv2d (+backward)", test_masked_conv2d);
}
