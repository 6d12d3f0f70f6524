// C++ test of the mask-scoring CPU kernels (mask_grad_sq_norm, mask_ascent_,
// mask_score_grad) through the dispatcher, against float64 loops of
// sparsesam/reference.py: several layers per call, with and without weights
// (dM = G*W, or G itself), odd sizes, one layer larger than a chunk, float32
// and float64. mask_flip_scores / mask_flip_topk are not tested here: they
// are being removed from the library.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <cmath>
#include <optional>
#include <string>
#include <vector>

#include "check.h"

namespace {

using namespace sparsesam_test;
using OptList = c10::List<std::optional<Tensor>>;

Tensor mask_grad_sq_norm(at::TensorList g, const OptList& w) {
  static const auto h = op<Tensor(at::TensorList, const OptList&)>("sparsesam::mask_grad_sq_norm");
  return h.call(g, w);
}

void mask_ascent_(at::TensorList out, at::TensorList g, const OptList& w, at::TensorList m, const Tensor& sq_norm,
                  double rho, double eps) {
  static const auto h = op<void(at::TensorList, at::TensorList, const OptList&, at::TensorList, const Tensor&, double,
                                double)>("sparsesam::mask_ascent_");
  h.call(out, g, w, m, sq_norm, rho, eps);
}

std::tuple<std::vector<Tensor>, Tensor> mask_score_grad(at::TensorList g, const OptList& w, at::TensorList s) {
  static const auto h = op<std::tuple<std::vector<Tensor>, Tensor>(at::TensorList, const OptList&, at::TensorList)>(
      "sparsesam::mask_score_grad");
  return h.call(g, w, s);
}

struct Layers {
  std::vector<Tensor> g;
  OptList w;  // every other layer has no weight: its gradient is dM itself
};

Layers make_layers(at::ScalarType dtype) {
  // Empty tensors own no chunk: two in a row, first and between others, must not shift the chunks after them.
  const std::vector<std::vector<int64_t>> shapes{{0, 7}, {0}, {1}, {7}, {129, 7}, {0}, {0, 3}, {5, 3, 3, 3}, {300, 129}};
  Layers l;
  bool with_weight = true;
  for (const auto& shape : shapes) {
    const auto opts = at::TensorOptions().dtype(dtype);
    l.g.push_back(at::randn(shape, opts));
    l.w.push_back(with_weight ? std::optional<Tensor>(at::randn(shape, opts)) : std::nullopt);
    with_weight = !with_weight;
  }
  return l;
}

Tensor ref_dm(const Layers& l, size_t i) {
  const std::optional<Tensor> w = l.w.get(i);
  return w ? f64(l.g[i]) * f64(*w) : f64(l.g[i]);
}

double ref_sq_norm(const Layers& l) {
  double total = 0.0;
  for (size_t i = 0; i < l.g.size(); ++i) total += ref_dm(l, i).square().sum().item<double>();
  return total;
}

void test_mask_grad_sq_norm() {
  for (const auto dtype : {at::kFloat, at::kDouble}) {
    const Layers l = make_layers(dtype);
    const std::string what = c10::str("mask_grad_sq_norm ", dtype);
    const Tensor norm = mask_grad_sq_norm(l.g, l.w);
    EXPECT(norm.dim() == 0 && norm.scalar_type() == at::kDouble, what, ": not a float64 0-d tensor");
    const double ref = ref_sq_norm(l);
    const double rtol = dtype == at::kDouble ? 1e-12 : 1e-5;
    EXPECT(std::abs(norm.item<double>() - ref) <= rtol * ref, what, ": ", norm.item<double>(), " vs ", ref);
    const int threads = at::get_num_threads();
    at::set_num_threads(1);
    const Tensor serial = mask_grad_sq_norm(l.g, l.w);
    at::set_num_threads(threads);
    EXPECT(at::equal(serial, norm), what, ": the bits depend on the thread count");
  }
  expect_throws([] { mask_grad_sq_norm({at::ones({3})}, OptList()); }, "weights", "mask_grad_sq_norm length mismatch");
}

void test_mask_ascent() {
  for (const auto dtype : {at::kFloat, at::kDouble}) {
    for (const double rho : {0.05, 5.0}) {  // 5: many entries clip at 0 and 1
      const Layers l = make_layers(dtype);
      const std::string what = c10::str("mask_ascent_ ", dtype, " rho ", rho);
      std::vector<Tensor> masks, out;
      for (const auto& g : l.g) {
        masks.push_back(at::rand(g.sizes(), g.options()));
        out.push_back(at::full(g.sizes(), -3.0, g.options()));  // every entry must be written
      }
      const double eps = 1e-12;
      const Tensor sq_norm = at::scalar_tensor(ref_sq_norm(l), at::kDouble);
      mask_ascent_(out, l.g, l.w, masks, sq_norm, rho, eps);
      const double coef = rho / (std::sqrt(sq_norm.item<double>()) + eps);
      for (size_t i = 0; i < l.g.size(); ++i) {
        const Tensor expected = at::clamp(f64(masks[i]) + coef * ref_dm(l, i), 0.0, 1.0);
        expect_close(out[i], expected, dtype, c10::str(what, " layer ", i, " ", l.g[i].sizes()));
        if (out[i].numel()) {
          EXPECT(out[i].min().item<double>() >= 0.0 && out[i].max().item<double>() <= 1.0, what, " layer ", i,
                 ": outside [0, 1]");
        }
      }
    }
  }
  expect_throws(
      [] {
        const Tensor g = at::ones({3});
        mask_ascent_({at::empty({3})}, {g}, OptList({std::optional<Tensor>()}), {at::ones({4})},
                     at::scalar_tensor(1.0, at::kDouble), 0.1, 1e-12);
      },
      "masks", "mask_ascent_ with a mask of another shape");
}

void test_mask_score_grad() {
  for (const auto dtype : {at::kFloat, at::kDouble}) {
    const Layers l = make_layers(dtype);
    const std::string what = c10::str("mask_score_grad ", dtype);
    std::vector<Tensor> scores;
    for (const auto& g : l.g) {
      // A third of the scores exactly zero: sign(0) = 0 (torch's abs backward).
      const Tensor s = at::randn(g.sizes(), g.options());
      scores.push_back(at::where(at::rand(g.sizes()) < 0.33, 0.0, s).to(dtype));
    }
    const auto [score_grads, rates] = mask_score_grad(l.g, l.w, scores);
    EXPECT(score_grads.size() == l.g.size(), what, ": ", score_grads.size(), " score gradients for ", l.g.size(),
           " layers");
    EXPECT(rates.dim() == 1 && rates.size(0) == static_cast<int64_t>(l.g.size()) &&
               rates.scalar_type() == at::kDouble,
           what, ": rate gradients ", rates.sizes(), " ", rates.scalar_type());
    for (size_t i = 0; i < std::min(score_grads.size(), l.g.size()); ++i) {
      const Tensor dm = ref_dm(l, i);
      const std::string item = c10::str(what, " layer ", i, " ", l.g[i].sizes());
      expect_close(score_grads[i], at::sign(f64(scores[i])) * dm, dtype, item + " score grad");
      EXPECT(at::equal(score_grads[i].masked_select(scores[i] == 0), at::zeros({0}, l.g[i].options())) ||
                 (score_grads[i].masked_select(scores[i] == 0) == 0).all().item<bool>(),
             item, ": a zero score got a gradient");
      if (rates.dim() == 1 && static_cast<size_t>(rates.size(0)) == l.g.size()) {
        const double ref = dm.sum().item<double>();
        const double tol = (dtype == at::kDouble ? 1e-12 : 1e-5) * std::max(1.0, dm.abs().sum().item<double>());
        EXPECT(std::abs(rates[i].item<double>() - ref) <= tol, item, ": rate gradient ", rates[i].item<double>(),
               " vs ", ref);
      }
    }
  }
  expect_throws([] { mask_score_grad({at::ones({3})}, OptList({std::optional<Tensor>()}), {at::ones({2})}); },
                "scores", "mask_score_grad with scores of another shape");
}

}  // namespace

void run_mask_scoring_tests() {
  run_group("mask_grad_sq_norm", test_mask_grad_sq_norm);
  run_group("mask_ascent_", test_mask_ascent);
  run_group("mask_score_grad", test_mask_score_grad);
}
