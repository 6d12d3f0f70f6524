// C++ test of the fused SAM step's CPU kernels (sam_grad_sq_norm,
// sam_perturb_, sgd_step_) through the dispatcher, against float64 loops of
// sparsesam/reference.py: several tensors per call (dense, bool-masked,
// float-masked), odd sizes, one tensor larger than a chunk (8192 elements),
// float32 and float64. Pruned entries must not move (weights and momentum
// buffers), and the norm's bits must not depend on the thread count.
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

Tensor sam_grad_sq_norm(at::TensorList g, at::TensorList w, const OptList& m, bool adaptive) {
  static const auto h = op<Tensor(at::TensorList, at::TensorList, const OptList&, bool)>("sparsesam::sam_grad_sq_norm");
  return h.call(g, w, m, adaptive);
}

void sam_perturb_(at::TensorList out, at::TensorList p, at::TensorList g, const OptList& m, at::TensorList rhos,
                  const Tensor& sq_norm, bool adaptive, double eps) {
  static const auto h =
      op<void(at::TensorList, at::TensorList, at::TensorList, const OptList&, at::TensorList, const Tensor&, bool,
              double)>("sparsesam::sam_perturb_");
  h.call(out, p, g, m, rhos, sq_norm, adaptive, eps);
}

void sgd_step_(at::TensorList p, at::TensorList g, at::TensorList bufs, const OptList& m, double lr, double momentum,
               double dampening, double weight_decay, bool nesterov, bool maximize, bool first_step) {
  static const auto h = op<void(at::TensorList, at::TensorList, at::TensorList, const OptList&, double, double, double,
                                double, bool, bool, bool)>("sparsesam::sgd_step_");
  h.call(p, g, bufs, m, lr, momentum, dampening, weight_decay, nesterov, maximize, first_step);
}

// kind 0: dense (None), 1: bool mask, 2: float mask (0 where pruned, else a value in (0.5, 1]).
std::optional<Tensor> make_mask(at::IntArrayRef shape, at::ScalarType dtype, int kind) {
  if (kind == 0) return std::nullopt;
  const Tensor keep = at::rand(shape) < 0.6;
  if (kind == 1) return keep;
  return at::where(keep, at::rand(shape, at::TensorOptions().dtype(dtype)) * 0.5 + 0.5, 0.0).to(dtype);
}

Tensor keep_of(const std::optional<Tensor>& m, const Tensor& like) {
  return m ? (*m != 0) : at::ones(like.sizes(), at::kBool);
}

struct Params {
  std::vector<Tensor> w, g;
  OptList masks;
};

// Shapes: a scalar-ish, odd vectors and matrices, a conv weight, one tensor of several chunks, an empty one.
Params make_params(at::ScalarType dtype) {
  // Empty tensors own no chunk: two in a row, first and between others, must not shift the chunks after them.
  const std::vector<std::vector<int64_t>> shapes{{0, 7}, {0}, {1}, {7}, {129, 7}, {0}, {0, 3}, {5, 3, 3, 3}, {300, 129}};
  Params p;
  int kind = 0;
  for (const auto& shape : shapes) {
    const auto opts = at::TensorOptions().dtype(dtype);
    p.w.push_back(at::randn(shape, opts));
    p.g.push_back(at::randn(shape, opts));
    p.masks.push_back(make_mask(shape, dtype, kind));
    kind = (kind + 1) % 3;
  }
  return p;
}

double ref_sq_norm(const Params& p, bool adaptive) {
  double total = 0.0;
  for (size_t i = 0; i < p.w.size(); ++i) {
    Tensor s = adaptive ? f64(p.g[i]) * f64(p.w[i]).abs() : f64(p.g[i]);
    s = at::where(keep_of(p.masks.get(i), s), s, 0.0);
    total += s.square().sum().item<double>();
  }
  return total;
}

void test_sam_grad_sq_norm() {
  for (const auto dtype : {at::kFloat, at::kDouble}) {
    const Params p = make_params(dtype);
    for (const bool adaptive : {false, true}) {
      const std::string what = c10::str("sam_grad_sq_norm ", dtype, adaptive ? " adaptive" : "");
      const Tensor norm = sam_grad_sq_norm(p.g, p.w, p.masks, adaptive);
      EXPECT(norm.dim() == 0 && norm.scalar_type() == at::kDouble, what, ": not a float64 0-d tensor");
      // A float64 result of float32 products summed in float blocks: judged at the inputs' precision.
      const double ref = ref_sq_norm(p, adaptive);
      const double rtol = dtype == at::kDouble ? 1e-12 : 1e-5;
      EXPECT(std::abs(norm.item<double>() - ref) <= rtol * ref, what, ": ", norm.item<double>(), " vs ", ref);
      // The bits do not depend on the thread count (fixed blocks, combined in a fixed order).
      const int threads = at::get_num_threads();
      at::set_num_threads(1);
      const Tensor serial = sam_grad_sq_norm(p.g, p.w, p.masks, adaptive);
      at::set_num_threads(threads);
      EXPECT(at::equal(serial, norm), what, ": 1 thread gives ", serial.item<double>(), ", ", threads, " give ",
             norm.item<double>());
    }
  }
  expect_throws([] { sam_grad_sq_norm({at::ones({3})}, {}, OptList({std::optional<Tensor>()}), true); }, "weights",
                "sam_grad_sq_norm adaptive without weights");
}

void test_sam_perturb() {
  for (const auto dtype : {at::kFloat, at::kDouble}) {
    const Params p = make_params(dtype);
    for (const bool adaptive : {false, true}) {
      for (const bool per_channel : {false, true}) {
        const std::string what =
            c10::str("sam_perturb_ ", dtype, adaptive ? " adaptive" : "", per_channel ? " per-channel rho" : "");
        const double eps = 1e-12;
        const Tensor sq_norm = at::scalar_tensor(ref_sq_norm(p, adaptive), at::kDouble);
        std::vector<Tensor> rhos, out;
        for (const auto& w : p.w) {
          rhos.push_back(per_channel ? at::rand({w.size(0)}, at::kDouble) * 0.1 : at::scalar_tensor(0.05, at::kDouble));
          out.push_back(at::full(w.sizes(), 7.0, w.options()));  // every entry must be written
        }
        sam_perturb_(out, p.w, p.g, p.masks, rhos, sq_norm, adaptive, eps);
        const double scale = 1.0 / (std::sqrt(sq_norm.item<double>()) + eps);
        for (size_t i = 0; i < p.w.size(); ++i) {
          const Tensor w64 = f64(p.w[i]);
          // rho: 0-d, or one value per output channel broadcast over the other dimensions.
          std::vector<int64_t> bshape(p.w[i].dim(), 1);
          if (rhos[i].dim() == 1) bshape[0] = -1;
          Tensor e = (rhos[i].dim() == 0 ? rhos[i] : rhos[i].reshape(bshape)) * scale * f64(p.g[i]);
          if (adaptive) e = e * w64.square();
          const Tensor keep = keep_of(p.masks.get(i), p.w[i]);
          expect_close(out[i], at::where(keep, w64 + e, w64), dtype, c10::str(what, " tensor ", i, " ", p.w[i].sizes()));
          EXPECT(at::equal(out[i].masked_select(~keep), p.w[i].masked_select(~keep)), what, " tensor ", i,
                 ": a pruned entry moved");
        }
      }
    }
  }
  expect_throws(
      [] {
        const Tensor w = at::ones({4, 3});
        sam_perturb_({w}, {w}, {at::ones({4, 3})}, OptList({std::optional<Tensor>()}), {at::ones({4})},
                     at::scalar_tensor(1.0, at::kDouble), false, 1e-12);
      },
      "out", "sam_perturb_ with out aliasing params");
  expect_throws(
      [] {
        const Tensor w = at::ones({4, 3});
        sam_perturb_({at::empty_like(w)}, {w}, {at::ones({4, 3})}, OptList({std::optional<Tensor>()}), {at::ones({3})},
                     at::scalar_tensor(1.0, at::kDouble), false, 1e-12);
      },
      "output channels", "sam_perturb_ with a per-channel rho of the wrong length");
}

struct SgdCase {
  double lr, momentum, dampening, weight_decay;
  bool nesterov, maximize, first_step;
};

void test_sgd_step() {
  const std::vector<SgdCase> cases{
      {0.1, 0.0, 0.0, 0.0, false, false, false}, {0.1, 0.0, 0.0, 5e-4, false, true, false},
      {0.05, 0.9, 0.0, 5e-4, false, false, true}, {0.05, 0.9, 0.0, 5e-4, false, false, false},
      {0.05, 0.9, 0.1, 0.0, false, true, false},  {0.05, 0.9, 0.0, 1e-3, true, false, false},
      {0.05, 0.9, 0.0, 1e-3, true, false, true},
  };
  for (const auto dtype : {at::kFloat, at::kDouble}) {
    for (const auto& c : cases) {
      const std::string what = c10::str("sgd_step_ ", dtype, " lr ", c.lr, " momentum ", c.momentum, " dampening ",
                                        c.dampening, " wd ", c.weight_decay, c.nesterov ? " nesterov" : "",
                                        c.maximize ? " maximize" : "", c.first_step ? " first" : "");
      const Params p = make_params(dtype);
      std::vector<Tensor> params, bufs, params_before, bufs_before;
      for (const auto& w : p.w) {
        params.push_back(w.clone());
        params_before.push_back(w.clone());
        if (c.momentum != 0) {
          bufs.push_back(at::randn(w.sizes(), w.options()));
          bufs_before.push_back(bufs.back().clone());
        }
      }
      sgd_step_(params, p.g, bufs, p.masks, c.lr, c.momentum, c.dampening, c.weight_decay, c.nesterov, c.maximize,
                c.first_step);
      for (size_t i = 0; i < params.size(); ++i) {
        // torch.optim.SGD's update in float64 (reference.py's sgd_step).
        const Tensor w = f64(params_before[i]);
        Tensor d = c.maximize ? -f64(p.g[i]) : f64(p.g[i]);
        if (c.weight_decay != 0) d = d + c.weight_decay * w;
        Tensor new_buf;
        if (c.momentum != 0) {
          new_buf = c.first_step ? d.clone() : f64(bufs_before[i]) * c.momentum + (1 - c.dampening) * d;
          d = c.nesterov ? d + c.momentum * new_buf : new_buf;
        }
        const Tensor keep = keep_of(p.masks.get(i), w);
        const std::string item = c10::str(what, " tensor ", i, " ", w.sizes());
        expect_close(params[i], at::where(keep, w - c.lr * d, w), dtype, item + " param");
        EXPECT(at::equal(params[i].masked_select(~keep), params_before[i].masked_select(~keep)), item,
               ": a pruned weight moved");
        if (c.momentum != 0) {
          expect_close(bufs[i], at::where(keep, new_buf, f64(bufs_before[i])), dtype, item + " buffer");
          EXPECT(at::equal(bufs[i].masked_select(~keep), bufs_before[i].masked_select(~keep)), item,
                 ": a pruned entry of the momentum buffer moved");
        }
      }
    }
  }
  expect_throws(
      [] {
        const Tensor w = at::ones({3});
        sgd_step_({w}, {at::ones({4})}, {}, OptList({std::optional<Tensor>()}), 0.1, 0.0, 0.0, 0.0, false, false,
                  false);
      },
      "grads", "sgd_step_ with a gradient of another shape");
}

}  // namespace

void run_sam_step_tests() {
  run_group("sam_grad_sq_norm", test_sam_grad_sq_norm);
  run_group("sam_perturb_", test_sam_perturb);
  run_group("sgd_step_", test_sgd_step);
}
