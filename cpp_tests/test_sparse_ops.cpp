// C++ test of the true-sparse CPU kernels (csr_linear, sparse_conv2d,
// bsr_linear, nm_linear and their backwards) through the dispatcher. Each
// index is built here from a dense mask with plain ATen (the formats of
// csrc/common/schemas.h), and each result is compared with the dense float64
// computation on W * mask: odd sizes, an empty batch, an all-pruned weight,
// float32 and float64, every output_mask of the backwards.
#include <ATen/ATen.h>

#include <array>
#include <optional>
#include <string>
#include <vector>

#include "check.h"

namespace {

using namespace sparsesam_test;
using at::indexing::TensorIndex;

// ---- the ops ----------------------------------------------------------------

using Index = const Tensor&;

Tensor csr_linear(const Tensor& x, const Tensor& v, Index crow, Index col, Index ccol, Index row, Index pos,
                     const OptTensor& b) {
  static const auto h = op<Tensor(const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&,
                                  const Tensor&, const Tensor&, const OptTensor&)>("sparsesam::csr_linear");
  return h.call(x, v, crow, col, ccol, row, pos, b);
}

Tensor2 csr_linear_backward(const Tensor& g, const Tensor& x, const Tensor& v, Index crow, Index col, Index ccol,
                               Index row, Index pos, std::array<bool, 2> out) {
  static const auto h =
      op<Tensor2(const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&,
                 const Tensor&, const Tensor&, std::array<bool, 2>)>("sparsesam::csr_linear_backward");
  return h.call(g, x, v, crow, col, ccol, row, pos, out);
}

Tensor bsr_linear(const Tensor& x, const Tensor& v, Index crow, Index col, Index ccol, Index row, Index pos,
                  const OptTensor& b) {
  static const auto h = op<Tensor(const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&,
                                  const Tensor&, const Tensor&, const OptTensor&)>("sparsesam::bsr_linear");
  return h.call(x, v, crow, col, ccol, row, pos, b);
}

Tensor2 bsr_linear_backward(const Tensor& g, const Tensor& x, const Tensor& v, Index crow, Index col, Index ccol,
                            Index row, Index pos, std::array<bool, 2> out) {
  static const auto h =
      op<Tensor2(const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&,
                 const Tensor&, const Tensor&, std::array<bool, 2>)>("sparsesam::bsr_linear_backward");
  return h.call(g, x, v, crow, col, ccol, row, pos, out);
}

struct Conv {
  std::vector<int64_t> kernel, stride, padding, dilation;
};

Tensor sparse_conv2d(const Tensor& x, const Tensor& v, Index crow, Index col, Index ccol, Index row, Index pos,
                     const OptTensor& b, const Conv& c) {
  static const auto h =
      op<Tensor(const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&,
                const Tensor&, const OptTensor&, at::IntArrayRef, at::IntArrayRef, at::IntArrayRef,
                at::IntArrayRef)>("sparsesam::sparse_conv2d");
  return h.call(x, v, crow, col, ccol, row, pos, b, c.kernel, c.stride, c.padding, c.dilation);
}

Tensor2 sparse_conv2d_backward(const Tensor& g, const Tensor& x, const Tensor& v, Index crow, Index col, Index ccol,
                               Index row, Index pos, const Conv& c, std::array<bool, 2> out) {
  static const auto h =
      op<Tensor2(const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&,
                 const Tensor&, const Tensor&, at::IntArrayRef, at::IntArrayRef, at::IntArrayRef, at::IntArrayRef,
                 std::array<bool, 2>)>("sparsesam::sparse_conv2d_backward");
  return h.call(g, x, v, crow, col, ccol, row, pos, c.kernel, c.stride, c.padding, c.dilation, out);
}

Tensor nm_linear(const Tensor& x, const Tensor& v, const Tensor& idx, int64_t n, int64_t m, const OptTensor& b) {
  static const auto h = op<Tensor(const Tensor&, const Tensor&, const Tensor&, int64_t, int64_t, const OptTensor&)>(
      "sparsesam::nm_linear");
  return h.call(x, v, idx, n, m, b);
}

Tensor2 nm_linear_backward(const Tensor& g, const Tensor& x, const Tensor& v, const Tensor& idx, int64_t n, int64_t m,
                           std::array<bool, 2> out) {
  static const auto h = op<Tensor2(const Tensor&, const Tensor&, const Tensor&, const Tensor&, int64_t, int64_t,
                                   std::array<bool, 2>)>("sparsesam::nm_linear_backward");
  return h.call(g, x, v, idx, n, m, out);
}

// ---- indices built from a dense (rows, cols) bool mask ---------------------

// The compressed index of a (rows, cols) bool pattern and its transpose: crow / col in row-major order,
// ccol / row in column-major order, and pos[k] = where the k-th entry in column order sits in row order.
struct Compressed {
  Tensor crow, col, ccol, row, pos;
};

Tensor offsets(const Tensor& counts) {
  return at::cat({at::zeros({1}, at::kLong), at::cumsum(counts.to(at::kLong), 0)}).to(at::kInt).contiguous();
}

Compressed compress(const Tensor& keep) {
  Compressed c;
  const Tensor nz = keep.nonzero();  // row-major
  const int64_t nnz = nz.size(0);
  c.crow = offsets(keep.sum(1));
  c.col = nz.select(1, 1).to(at::kInt).contiguous();
  c.ccol = offsets(keep.sum(0));
  const Tensor nz_t = keep.t().nonzero();  // column-major: (col, row) pairs
  c.row = nz_t.select(1, 1).to(at::kInt).contiguous();
  const Tensor order = at::full(keep.sizes(), -1, at::kLong);
  order.masked_scatter_(keep, at::arange(nnz, at::kLong));
  c.pos = order.t().masked_select(keep.t()).to(at::kInt).contiguous();
  return c;
}

const std::array<std::array<bool, 2>, 4> kOutMasks{{{true, true}, {true, false}, {false, true}, {false, false}}};

std::string out2(std::array<bool, 2> o) { return c10::str("[", o[0], o[1], "]"); }

void check_backward(const Tensor2& result, std::array<bool, 2> o, const Tensor& ref_dx, const Tensor& ref_dv,
                    at::ScalarType dtype, const std::string& what) {
  const auto& [dx, dv] = result;
  if (o[0]) expect_close(dx, ref_dx, dtype, what + " dx");
  else EXPECT(is_empty_output(dx), what, ": dx not asked for but shape ", dx.sizes());
  if (o[1]) expect_close(dv, ref_dv, dtype, what + " dvalues");
  else EXPECT(is_empty_output(dv), what, ": dvalues not asked for but shape ", dv.sizes());
}

// ---- tests ------------------------------------------------------------------

struct LinearCase {
  std::vector<int64_t> batch;
  int64_t in, out;
  double density;  // 0: an all-pruned weight
  bool bias;
};

const std::vector<LinearCase> kLinearCases{
    {{1}, 1, 1, 1.0, false},  {{7}, 129, 7, 0.3, true},  {{129}, 7, 129, 0.5, false}, {{2, 3}, 33, 17, 0.1, true},
    {{0}, 7, 5, 0.5, true},   {{5}, 9, 3, 0.0, true},    {{3, 1, 7}, 64, 1, 0.9, false},
};

void test_csr_linear() {
  for (const auto dtype : {at::kFloat, at::kDouble}) {
    for (const auto& c : kLinearCases) {
      const auto opts = at::TensorOptions().dtype(dtype);
      std::vector<int64_t> x_shape = c.batch, y_shape = c.batch;
      x_shape.push_back(c.in);
      y_shape.push_back(c.out);
      const Tensor x = at::randn(x_shape, opts);
      const Tensor w = at::randn({c.out, c.in}, opts);
      const Tensor keep = at::rand({c.out, c.in}) < c.density;
      const Compressed p = compress(keep);
      const Tensor values = w.masked_select(keep).contiguous();
      const Tensor wm = at::where(keep, f64(w), 0.0);
      const OptTensor b = c.bias ? OptTensor(at::randn({c.out}, opts)) : std::nullopt;
      const std::string what = c10::str("csr_linear ", dtype, " x", at::IntArrayRef(x_shape), " W[", c.out, ",",
                                        c.in, "] nnz ", values.numel(), c.bias ? " bias" : "");

      const Tensor y = csr_linear(x, values, p.crow, p.col, p.ccol, p.row, p.pos, b);
      expect_close(y, at::linear(f64(x), wm, b ? OptTensor(f64(*b)) : std::nullopt), dtype, what + " y");

      const Tensor g = at::randn(y_shape, opts);
      const Tensor ref_dx = at::matmul(f64(g), wm);
      const Tensor ref_dv = at::mm(rows(f64(g)).t(), rows(f64(x))).masked_select(keep);
      for (const auto o : kOutMasks) {
        check_backward(csr_linear_backward(g, x, values, p.crow, p.col, p.ccol, p.row, p.pos, o), o, ref_dx,
                       ref_dv, dtype, what + " backward " + out2(o));
      }
    }
  }
  const Compressed p = compress(at::ones({2, 3}, at::kBool));
  expect_throws([&] { csr_linear(at::ones({4, 5}), at::ones({6}), p.crow, p.col, p.ccol, p.row, p.pos, {}); },
                "x", "csr_linear with x of the wrong width");
  const Tensor bad_col = at::tensor({0, 1, 7, 0, 1, 2}, at::kInt);
  expect_throws([&] { csr_linear(at::ones({4, 3}), at::ones({6}), p.crow, bad_col, p.ccol, p.row, p.pos, {}); },
                "col_indices", "csr_linear with a column index out of range");
}

struct ConvCase {
  int64_t n, c, h, w, o;
  Conv args;
  double density;
  bool bias;
};

void test_sparse_conv2d() {
  const std::vector<ConvCase> cases{
      {1, 1, 1, 1, 1, {{1, 1}, {1, 1}, {0, 0}, {1, 1}}, 1.0, false},
      {2, 3, 7, 9, 7, {{3, 3}, {1, 1}, {1, 1}, {1, 1}}, 0.4, true},
      {3, 5, 9, 7, 6, {{3, 2}, {2, 1}, {1, 0}, {1, 2}}, 0.3, true},  // strided, dilated, rectangular kernel
      // Unit stride takes other kernels (contiguous row segments); "same" width (out_w == w) a flat one.
      {2, 3, 8, 9, 4, {{3, 2}, {1, 1}, {1, 1}, {2, 1}}, 0.5, true},  // unit stride, dilation differs per axis
      {1, 4, 9, 9, 5, {{3, 3}, {1, 1}, {2, 2}, {2, 2}}, 0.5, false},  // "same" width, dilated
      {2, 2, 7, 5, 3, {{1, 3}, {1, 1}, {0, 2}, {1, 2}}, 0.5, true},  // "same" width, dilated along w only
      {1, 17, 5, 5, 3, {{1, 1}, {1, 1}, {0, 0}, {1, 1}}, 0.5, false},
      {0, 3, 5, 5, 4, {{3, 3}, {1, 1}, {1, 1}, {1, 1}}, 0.5, true},  // empty batch
      {2, 2, 6, 6, 3, {{3, 3}, {2, 2}, {2, 2}, {1, 1}}, 0.0, true},  // all pruned
  };
  for (const auto dtype : {at::kFloat, at::kDouble}) {
    for (const auto& c : cases) {
      const auto opts = at::TensorOptions().dtype(dtype);
      const Conv& a = c.args;
      const Tensor x = at::randn({c.n, c.c, c.h, c.w}, opts);
      const Tensor w = at::randn({c.o, c.c, a.kernel[0], a.kernel[1]}, opts);
      const Tensor keep = at::rand(w.sizes()) < c.density;
      const Tensor keep2d = keep.reshape({c.o, -1});
      const Compressed p = compress(keep2d);
      const Tensor values = w.reshape({c.o, -1}).masked_select(keep2d).contiguous();
      const Tensor wm = at::where(keep, f64(w), 0.0);
      const OptTensor b = c.bias ? OptTensor(at::randn({c.o}, opts)) : std::nullopt;
      const std::string what = c10::str("sparse_conv2d ", dtype, " x", x.sizes(), " W", w.sizes(), " s",
                                        at::IntArrayRef(a.stride), " p", at::IntArrayRef(a.padding), " d",
                                        at::IntArrayRef(a.dilation), " nnz ", values.numel(), c.bias ? " bias" : "");

      const Tensor y = sparse_conv2d(x, values, p.crow, p.col, p.ccol, p.row, p.pos, b, a);
      const Tensor ref_y =
          at::conv2d(f64(x), wm, b ? OptTensor(f64(*b)) : std::nullopt, a.stride, a.padding, a.dilation, 1);
      expect_close(y, ref_y, dtype, what + " y");

      const Tensor g = at::randn(ref_y.sizes(), opts);
      const auto [ref_dx, ref_G, unused] =
          at::convolution_backward(f64(g), f64(x), wm, std::nullopt, a.stride, a.padding, a.dilation,
                                   /*transposed=*/false, /*output_padding=*/{0, 0}, 1, {true, true, false});
      const Tensor ref_dv = ref_G.reshape({c.o, -1}).masked_select(keep2d);
      for (const auto o : kOutMasks) {
        check_backward(sparse_conv2d_backward(g, x, values, p.crow, p.col, p.ccol, p.row, p.pos, a, o), o, ref_dx,
                       ref_dv, dtype, what + " backward " + out2(o));
      }
    }
  }
}

struct BsrCase {
  std::vector<int64_t> batch;
  int64_t in, out, bh, bw;
  double density;
  bool bias;
};

void test_bsr_linear() {
  const std::vector<BsrCase> cases{
      {{1}, 1, 1, 1, 1, 1.0, false},  {{7}, 12, 9, 3, 4, 0.5, true},    {{5}, 35, 14, 7, 5, 0.4, false},
      {{2, 3}, 32, 16, 4, 8, 0.3, true}, {{0}, 8, 8, 2, 2, 0.5, true}, {{3}, 6, 6, 3, 3, 0.0, true},
      {{129}, 16, 4, 1, 16, 0.6, false},
  };
  for (const auto dtype : {at::kFloat, at::kDouble}) {
    for (const auto& c : cases) {
      const auto opts = at::TensorOptions().dtype(dtype);
      std::vector<int64_t> x_shape = c.batch, y_shape = c.batch;
      x_shape.push_back(c.in);
      y_shape.push_back(c.out);
      const int64_t br = c.out / c.bh, bc = c.in / c.bw;
      const Tensor x = at::randn(x_shape, opts);
      const Tensor w = at::randn({c.out, c.in}, opts);
      const Tensor block_keep = at::rand({br, bc}) < c.density;
      const Compressed p = compress(block_keep);
      const Tensor nz = block_keep.nonzero();
      // (br, bh, bc, bw) -> (br, bc, bh, bw); values are the kept blocks in row-major block order.
      const auto blocks_of = [&](const Tensor& t) {
        return t.reshape({br, c.bh, bc, c.bw})
            .permute({0, 2, 1, 3})
            .index({TensorIndex(nz.select(1, 0)), TensorIndex(nz.select(1, 1))})
            .contiguous();
      };
      const Tensor values = blocks_of(w);
      const Tensor keep = block_keep.repeat_interleave(c.bh, 0).repeat_interleave(c.bw, 1);
      const Tensor wm = at::where(keep, f64(w), 0.0);
      const OptTensor b = c.bias ? OptTensor(at::randn({c.out}, opts)) : std::nullopt;
      const std::string what = c10::str("bsr_linear ", dtype, " x", at::IntArrayRef(x_shape), " W[", c.out, ",", c.in,
                                        "] blocks ", c.bh, "x", c.bw, " nblocks ", values.size(0),
                                        c.bias ? " bias" : "");

      const Tensor y = bsr_linear(x, values, p.crow, p.col, p.ccol, p.row, p.pos, b);
      expect_close(y, at::linear(f64(x), wm, b ? OptTensor(f64(*b)) : std::nullopt), dtype, what + " y");

      const Tensor g = at::randn(y_shape, opts);
      const Tensor ref_dx = at::matmul(f64(g), wm);
      const Tensor ref_dv = blocks_of(at::mm(rows(f64(g)).t(), rows(f64(x))));
      for (const auto o : kOutMasks) {
        check_backward(bsr_linear_backward(g, x, values, p.crow, p.col, p.ccol, p.row, p.pos, o), o, ref_dx, ref_dv,
                       dtype, what + " backward " + out2(o));
      }
    }
  }
}

struct NmCase {
  std::vector<int64_t> batch;
  int64_t in, out, n, m;
  bool bias;
};

void test_nm_linear() {
  const std::vector<NmCase> cases{
      {{1}, 4, 1, 2, 4, false},   {{7}, 16, 9, 2, 4, true},     {{5}, 24, 7, 1, 8, false},
      {{2, 3}, 48, 17, 3, 16, true}, {{0}, 8, 5, 2, 4, true},   {{129}, 12, 3, 5, 6, false},
      {{3}, 14, 129, 1, 2, true},
  };
  for (const auto dtype : {at::kFloat, at::kDouble}) {
    for (const auto& c : cases) {
      const auto opts = at::TensorOptions().dtype(dtype);
      std::vector<int64_t> x_shape = c.batch, y_shape = c.batch;
      x_shape.push_back(c.in);
      y_shape.push_back(c.out);
      const int64_t groups = c.in / c.m;
      const Tensor x = at::randn(x_shape, opts);
      const Tensor w = at::randn({c.out, c.in}, opts);
      // n random positions per group of m, in increasing order (as NMPattern.from_mask stores them).
      const Tensor chosen =
          std::get<0>(at::sort(at::rand({c.out, groups, c.m}).argsort(int64_t{-1}).narrow(-1, 0, c.n), int64_t{-1}));
      const Tensor w_groups = w.reshape({c.out, groups, c.m});
      const Tensor values = w_groups.gather(-1, chosen).reshape({c.out, groups * c.n}).contiguous();
      const Tensor indices = chosen.to(at::kByte).reshape({c.out, groups * c.n}).contiguous();
      const Tensor keep =
          at::zeros({c.out, groups, c.m}, at::kBool).scatter(-1, chosen, true).reshape({c.out, c.in});
      const Tensor wm = at::where(keep, f64(w), 0.0);
      const OptTensor b = c.bias ? OptTensor(at::randn({c.out}, opts)) : std::nullopt;
      const std::string what = c10::str("nm_linear ", dtype, " ", c.n, ":", c.m, " x", at::IntArrayRef(x_shape),
                                        " W[", c.out, ",", c.in, "]", c.bias ? " bias" : "");

      const Tensor y = nm_linear(x, values, indices, c.n, c.m, b);
      expect_close(y, at::linear(f64(x), wm, b ? OptTensor(f64(*b)) : std::nullopt), dtype, what + " y");

      const Tensor g = at::randn(y_shape, opts);
      const Tensor ref_dx = at::matmul(f64(g), wm);
      const Tensor ref_G = at::mm(rows(f64(g)).t(), rows(f64(x)));
      const Tensor ref_dv = ref_G.reshape({c.out, groups, c.m}).gather(-1, chosen).reshape({c.out, groups * c.n});
      for (const auto o : kOutMasks) {
        check_backward(nm_linear_backward(g, x, values, indices, c.n, c.m, o), o, ref_dx, ref_dv, dtype,
                       what + " backward " + out2(o));
      }
    }
  }
  expect_throws([] { nm_linear(at::ones({2, 8}), at::ones({3, 4}), at::zeros({3, 4}, at::kByte), 4, 4, {}); },
                "1 <= n < m <= 16", "nm_linear with n == m");
  expect_throws([] { nm_linear(at::ones({2, 8}), at::ones({3, 4}), at::full({3, 4}, 9, at::kByte), 2, 4, {}); },
                "indices", "nm_linear with an index outside its group");
}

}  // namespace

void run_sparse_op_tests() {
  run_group("csr_linear (+backward)", test_csr_linear);
  run_group("sparse_conv2d (+backward)", test_sparse_conv2d);
  run_group("bsr_linear (+backward)", test_bsr_linear);
  run_group("nm_linear (+backward)", test_nm_linear);
}
