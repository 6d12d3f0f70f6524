// sparse_conv2d on CPU: a direct sparse convolution (NCHW, groups = 1) whose
// weight is kept only at a fixed mask's entries, as the CSR pattern of the
// weight viewed as (out_channels, in_channels * kh * kw).
//
// Nothing is unfolded and the weight is never densified: every kept entry
// (co, ci, ki, kj) with value v adds v times a shifted (strided) window of
// input plane ci to output plane co. So the forward, dx and dW each cost
// nnz * batch * out_h * out_w multiply-adds, and the memory they touch is the
// activations (no im2col buffer of kh*kw times the input). With stride 1 the
// inner loops run over contiguous row segments and vectorise.
//
// Parallel work, each output value summed by one task in a fixed order (no
// atomics; results do not depend on the thread count):
// * forward: one task per (image, output channel) plane, its input image
//   (in_channels planes) shared by neighbouring tasks in cache;
// * dx: one task per (image, input channel) plane, over the transposed index
//   (the columns ci*kh*kw .. (ci+1)*kh*kw - 1 are exactly the taps reading ci);
// * dW: one task per output channel (a CSR row), summing for every kept entry
//   the dot products of grad_out plane co with the shifted input windows,
//   image by image (float accumulates each plane in float and the images in
//   double).
//
// The common case (stride 1 and "same" width: out_w == w, e.g. 3x3 with
// padding 1) runs each tap as ONE long contiguous loop over the flattened
// plane, out[i] += v * in[i + shift], instead of out_h short row loops: the
// few positions per row where that loop wraps into the next row (the padding
// columns) are saved before and put back after (forward, dx: exact), or read
// against a copy of the grad_out plane with those columns zeroed (dW).
//
// float, bfloat16 and half compute in float (bf16/half are widened first and
// rounded once at the end); double in double.
//
// Where the time goes (B=128, 64 -> 64 channels, 32x32, 3x3, 99% sparse,
// float, one thread, CPU time per call on a shared machine): with outputs
// from the default allocator, forward 35 ms, dx 43 ms, dW 15 ms, bias grad
// 3 ms; of the forward and dx, ~20 ms each was faulting in the fresh 32 MiB
// output 4 KiB page by page (torch.empty + fill of that size alone: 21 ms;
// 16,386 minor faults per forward+backward). y and dx therefore come from
// huge_page_output.h (2 MiB pages where THP allows): forward 16-19 ms, dx
// 20-23 ms, 36 faults per step; the whole step 98 -> 57 ms, 6.1x -> 10.5x
// the dense masked oneDNN baseline (which keeps the default allocator).
// What remains is memory traffic over the 32 MiB activations (each pass
// reads one or two and writes one) more than the nnz * B * H * W FMAs.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <cstdint>
#include <tuple>
#include <vector>

#include "huge_page_output.h"

namespace sparsesam::cpu {
namespace {

struct Geometry {
  int64_t batch, cin, h, w, cout, kh, kw, sh, sw, ph, pw, dh, dw, ho, wo, nnz;
  int64_t taps() const { return kh * kw; }
};

// A kept entry's tap: input channel and the offsets of its window.
struct Tap {
  int64_t ci, kj, row_off, col_off;  // input row = oh * sh + row_off, input col = ow * sw + col_off
  int64_t oh0, oh1, ow0, ow1;        // the output rows / cols whose input lies inside the image

  bool empty() const { return oh0 >= oh1 || ow0 >= ow1; }
  // Flattened form (when flat(g)): out index i in [begin, end) reads input i + shift.
  int64_t begin(const Geometry& g) const { return oh0 * g.w + ow0; }
  int64_t end(const Geometry& g) const { return (oh1 - 1) * g.w + ow1; }
  int64_t shift(const Geometry& g) const { return row_off * g.w + col_off; }
};

// Whether taps can run flattened: unit strides and out_w == w (then output
// and input rows have one stride), with few padding columns per row.
bool flat(const Geometry& g) { return g.sh == 1 && g.sw == 1 && g.wo == g.w && g.w > 0; }
bool flat_tap(const Tap& t, const Geometry& g) { return 4 * (g.w - (t.ow1 - t.ow0)) <= g.w; }

// The plane positions (output indexing) a flattened tap passes over but must
// not touch: columns outside [ow0, ow1) between its first and last row.
template <typename F>
void for_each_wrapped(const Tap& t, const Geometry& g, const F& f) {
  for (int64_t oh = t.oh0; oh + 1 < t.oh1; ++oh) {
    for (int64_t ow = t.ow1; ow < g.w; ++ow) f(oh * g.w + ow);
    for (int64_t ow = 0; ow < t.ow0; ++ow) f((oh + 1) * g.w + ow);
  }
}

// [lo, hi): the outputs o in [0, out) with 0 <= o * s + off < n.
void valid_range(int64_t off, int64_t s, int64_t n, int64_t out, int64_t& lo, int64_t& hi) {
  lo = off >= 0 ? 0 : (-off + s - 1) / s;
  hi = n - 1 - off < 0 ? 0 : (n - 1 - off) / s + 1;
  lo = std::min(lo, out);
  hi = std::clamp(hi, lo, out);
}

Tap tap_of(int64_t column, const Geometry& g) {
  Tap t;
  t.ci = column / g.taps();
  const int64_t r = column % g.taps(), ki = r / g.kw, kj = r % g.kw;
  t.kj = kj;
  t.row_off = ki * g.dh - g.ph;
  t.col_off = kj * g.dw - g.pw;
  valid_range(t.row_off, g.sh, g.h, g.ho, t.oh0, t.oh1);
  valid_range(t.col_off, g.sw, g.w, g.wo, t.ow0, t.ow1);
  return t;
}

// --- Checks -------------------------------------------------------------------

void check_index(const at::Tensor& t, const char* name, int64_t numel) {
  TORCH_CHECK_TYPE(t.scalar_type() == at::kInt, "sparse_conv2d: ", name, " must be int32, got ", t.scalar_type());
  TORCH_CHECK_VALUE(t.device().is_cpu(), "sparse_conv2d: ", name, " must be on the CPU, got ", t.device());
  TORCH_CHECK_VALUE(t.dim() == 1 && t.numel() == numel, "sparse_conv2d: ", name, " must be 1-D with ", numel,
                    " entries, got shape ", t.sizes());
  TORCH_CHECK_VALUE(t.is_contiguous(), "sparse_conv2d: ", name, " must be contiguous");
}

void check_offsets(const at::Tensor& ptr, const char* name, int64_t nnz) {
  const int32_t* p = ptr.const_data_ptr<int32_t>();
  const int64_t n = ptr.numel() - 1;
  bool ok = p[0] == 0 && p[n] == nnz;
  for (int64_t i = 0; i < n; ++i) ok &= p[i] <= p[i + 1];
  TORCH_CHECK_VALUE(ok, "sparse_conv2d: ", name, " must go from 0 to nnz=", nnz, " without decreasing");
}

void check_below(const at::Tensor& idx, const char* name, int64_t bound) {
  const int32_t* p = idx.const_data_ptr<int32_t>();
  uint32_t worst = 0;  // negatives wrap high
  for (int64_t j = 0; j < idx.numel(); ++j) worst = std::max(worst, static_cast<uint32_t>(p[j]));
  TORCH_CHECK_VALUE(idx.numel() == 0 || int64_t(worst) < bound, "sparse_conv2d: every entry of ", name,
                    " must lie in [0, ", bound, ")");
}

Geometry check_all(const at::Tensor& x, const at::Tensor& values, const at::Tensor& crow, const at::Tensor& col,
                   const at::Tensor& ccol, const at::Tensor& row, const at::Tensor& pos, at::IntArrayRef kernel_size,
                   at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation) {
  TORCH_CHECK_VALUE(x.dim() == 4, "sparse_conv2d: x must be 4-D (N, C, H, W), got shape ", x.sizes());
  TORCH_CHECK_VALUE(values.dim() == 1, "sparse_conv2d: values must be 1-D, got shape ", values.sizes());
  TORCH_CHECK_VALUE(kernel_size.size() == 2 && stride.size() == 2 && padding.size() == 2 && dilation.size() == 2,
                    "sparse_conv2d: kernel_size, stride, padding and dilation must have 2 entries each");
  TORCH_CHECK_VALUE(kernel_size[0] >= 1 && kernel_size[1] >= 1, "sparse_conv2d: kernel_size must be positive");
  TORCH_CHECK_VALUE(stride[0] >= 1 && stride[1] >= 1, "sparse_conv2d: stride must be positive");
  TORCH_CHECK_VALUE(dilation[0] >= 1 && dilation[1] >= 1, "sparse_conv2d: dilation must be positive");
  TORCH_CHECK_VALUE(padding[0] >= 0 && padding[1] >= 0, "sparse_conv2d: padding must be non-negative");
  Geometry g{};
  g.batch = x.size(0), g.cin = x.size(1), g.h = x.size(2), g.w = x.size(3);
  g.kh = kernel_size[0], g.kw = kernel_size[1], g.sh = stride[0], g.sw = stride[1];
  g.ph = padding[0], g.pw = padding[1], g.dh = dilation[0], g.dw = dilation[1];
  TORCH_CHECK_VALUE(crow.dim() == 1 && crow.numel() >= 1, "sparse_conv2d: crow_indices must be 1-D and non-empty");
  g.cout = crow.numel() - 1;
  g.nnz = values.numel();
  TORCH_CHECK_VALUE(g.nnz < (int64_t(1) << 31), "sparse_conv2d: int32 indices need fewer than 2^31 entries");
  check_index(crow, "crow_indices", g.cout + 1);
  check_index(col, "col_indices", g.nnz);
  check_index(ccol, "ccol_indices", g.cin * g.taps() + 1);
  check_index(row, "row_indices", g.nnz);
  check_index(pos, "csr_positions", g.nnz);
  const int64_t span_h = g.h + 2 * g.ph - g.dh * (g.kh - 1), span_w = g.w + 2 * g.pw - g.dw * (g.kw - 1);
  TORCH_CHECK_VALUE(span_h >= 1 && span_w >= 1, "sparse_conv2d: the padded input (", g.h + 2 * g.ph, " x ",
                    g.w + 2 * g.pw, ") is smaller than the dilated kernel");
  g.ho = (span_h - 1) / g.sh + 1;
  g.wo = (span_w - 1) / g.sw + 1;
  return g;
}

at::ScalarType acc_type(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

// --- Kernels --------------------------------------------------------------------

// y[i] += v * x[i * s] for i in [0, n).
template <typename acc_t>
inline void axpy(acc_t* y, const acc_t* x, acc_t v, int64_t n, int64_t s) {
  if (s == 1) {
    for (int64_t i = 0; i < n; ++i) y[i] += v * x[i];
  } else {
    for (int64_t i = 0; i < n; ++i) y[i] += v * x[i * s];
  }
}

// y[i * s] += v * x[i] for i in [0, n).
template <typename acc_t>
inline void axpy_strided_out(acc_t* y, const acc_t* x, acc_t v, int64_t n, int64_t s) {
  if (s == 1) {
    for (int64_t i = 0; i < n; ++i) y[i] += v * x[i];
  } else {
    for (int64_t i = 0; i < n; ++i) y[i * s] += v * x[i];
  }
}

// sum of a[i] * b[i * s], eight independent partial sums (so the unit-stride
// loop vectorises without reassociating a single chain).
template <typename acc_t>
inline acc_t dot(const acc_t* a, const acc_t* b, int64_t n, int64_t s) {
  acc_t part[8] = {};
  int64_t i = 0;
  if (s == 1) {
    for (; i + 8 <= n; i += 8) {
      for (int k = 0; k < 8; ++k) part[k] += a[i + k] * b[i + k];
    }
  } else {
    for (; i + 8 <= n; i += 8) {
      for (int k = 0; k < 8; ++k) part[k] += a[i + k] * b[(i + k) * s];
    }
  }
  for (; i < n; ++i) part[0] += a[i] * b[i * s];
  return ((part[0] + part[1]) + (part[2] + part[3])) + ((part[4] + part[5]) + (part[6] + part[7]));
}

template <typename acc_t>
void forward_kernel(const acc_t* x, const acc_t* val, const int32_t* crow, const int32_t* col, const acc_t* bias,
                    const Geometry& g, acc_t* y) {
  const int64_t plane_in = g.h * g.w, plane_out = g.ho * g.wo;
  at::parallel_for(0, g.batch * g.cout, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> saved;
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / g.cout, co = task % g.cout;
      acc_t* out = y + task * plane_out;
      std::fill(out, out + plane_out, bias != nullptr ? bias[co] : acc_t(0));
      const acc_t* image = x + b * g.cin * plane_in;
      for (int64_t j = crow[co]; j < crow[co + 1]; ++j) {
        const Tap t = tap_of(col[j], g);
        const acc_t* in = image + t.ci * plane_in;
        if (t.empty()) continue;
        if (flat(g) && flat_tap(t, g)) {
          saved.clear();
          for_each_wrapped(t, g, [&](int64_t i) { saved.push_back(out[i]); });
          axpy(out + t.begin(g), in + t.begin(g) + t.shift(g), val[j], t.end(g) - t.begin(g), 1);
          size_t k = 0;
          for_each_wrapped(t, g, [&](int64_t i) { out[i] = saved[k++]; });
          continue;
        }
        for (int64_t oh = t.oh0; oh < t.oh1; ++oh) {
          const acc_t* in_row = in + (oh * g.sh + t.row_off) * g.w + t.col_off;
          axpy(out + oh * g.wo + t.ow0, in_row + t.ow0 * g.sw, val[j], t.ow1 - t.ow0, g.sw);
        }
      }
    }
  });
}

// Forward for unit strides (any padding and dilation): each image is copied
// once into a zero-bordered buffer (per thread, reused while the thread's
// tasks stay on that image), where every tap is one pure shift over the same
// flattened range; output planes accumulate in padded-row-stride scratch four
// kept entries per pass (a quarter of the scratch reads and writes), then the
// valid columns are copied out. No bounds work per tap.
template <typename acc_t>
void forward_unit_stride_kernel(const acc_t* x, const acc_t* val, const int32_t* crow, const int32_t* col,
                                const acc_t* bias, const Geometry& g, acc_t* y) {
  const int64_t hp = g.h + 2 * g.ph, wp = g.w + 2 * g.pw;
  const int64_t plane_in = g.h * g.w, plane_pad = hp * wp, plane_out = g.ho * g.wo;
  const int64_t span = (g.ho - 1) * wp + g.wo;  // flattened output range in padded row stride
  at::parallel_for(0, g.batch * g.cout, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> padded(g.cin * plane_pad, acc_t(0));  // borders stay zero
    std::vector<acc_t> scratch(g.ho * wp);
    int64_t padded_image = -1;
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / g.cout, co = task % g.cout;
      if (b != padded_image) {
        const acc_t* image = x + b * g.cin * plane_in;
        for (int64_t c = 0; c < g.cin; ++c) {
          for (int64_t r = 0; r < g.h; ++r) {
            std::copy(image + c * plane_in + r * g.w, image + c * plane_in + (r + 1) * g.w,
                      padded.data() + c * plane_pad + (r + g.ph) * wp + g.pw);
          }
        }
        padded_image = b;
      }
      acc_t* acc = scratch.data();
      std::fill(acc, acc + span, bias != nullptr ? bias[co] : acc_t(0));
      const acc_t* src[4];
      acc_t v[4];
      int n = 0;
      auto flush = [&] {
        if (n == 4) {
          for (int64_t i = 0; i < span; ++i)
            acc[i] += (v[0] * src[0][i] + v[1] * src[1][i]) + (v[2] * src[2][i] + v[3] * src[3][i]);
        } else {
          for (int k = 0; k < n; ++k) axpy(acc, src[k], v[k], span, 1);
        }
        n = 0;
      };
      for (int64_t j = crow[co]; j < crow[co + 1]; ++j) {
        const int64_t column = col[j], ci = column / g.taps(), r = column % g.taps();
        src[n] = padded.data() + ci * plane_pad + (r / g.kw) * g.dh * wp + (r % g.kw) * g.dw;
        v[n++] = val[j];
        if (n == 4) flush();
      }
      flush();
      acc_t* out = y + task * plane_out;
      for (int64_t oh = 0; oh < g.ho; ++oh) std::copy(acc + oh * wp, acc + oh * wp + g.wo, out + oh * g.wo);
    }
  });
}

template <typename acc_t>
void dx_kernel(const acc_t* gy, const acc_t* val, const int32_t* ccol, const int32_t* row, const int32_t* pos,
               const Geometry& g, acc_t* dx) {
  const int64_t plane_in = g.h * g.w, plane_out = g.ho * g.wo;
  at::parallel_for(0, g.batch * g.cin, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> saved;
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / g.cin, ci = task % g.cin;
      acc_t* out = dx + task * plane_in;
      std::fill(out, out + plane_in, acc_t(0));
      const acc_t* grads = gy + b * g.cout * plane_out;
      for (int64_t column = ci * g.taps(); column < (ci + 1) * g.taps(); ++column) {
        const Tap t = tap_of(column, g);
        if (t.empty()) continue;
        const bool flat_run = flat(g) && flat_tap(t, g);
        // Flattened: dx[i + shift] += v * grad[i]; the wrapped positions of dx are put back after.
        acc_t* shifted = out + t.shift(g);
        if (flat_run && ccol[column] < ccol[column + 1]) {
          saved.clear();
          for_each_wrapped(t, g, [&](int64_t i) { saved.push_back(shifted[i]); });
        }
        for (int64_t j = ccol[column]; j < ccol[column + 1]; ++j) {
          const acc_t v = val[pos[j]];
          const acc_t* grad = grads + int64_t(row[j]) * plane_out;
          if (flat_run) {
            axpy(shifted + t.begin(g), grad + t.begin(g), v, t.end(g) - t.begin(g), 1);
            continue;
          }
          for (int64_t oh = t.oh0; oh < t.oh1; ++oh) {
            acc_t* out_row = out + (oh * g.sh + t.row_off) * g.w + t.col_off;
            axpy_strided_out(out_row + t.ow0 * g.sw, grad + oh * g.wo + t.ow0, v, t.ow1 - t.ow0, g.sw);
          }
        }
        if (flat_run && ccol[column] < ccol[column + 1]) {
          size_t k = 0;
          for_each_wrapped(t, g, [&](int64_t i) { shifted[i] = saved[k++]; });
        }
      }
    }
  });
}

// dx for unit strides, the mirror of forward_unit_stride_kernel: the
// grad_out planes of an image are copied once (per thread) into rows of the
// padded width (the extra columns zero), every tap is then one pure shift
// from that buffer into a zero-bordered dx plane, the kept entries of one tap
// four per pass; the interior of the plane is copied out.
template <typename acc_t>
void dx_unit_stride_kernel(const acc_t* gy, const acc_t* val, const int32_t* ccol, const int32_t* row,
                           const int32_t* pos, const Geometry& g, acc_t* dx) {
  const int64_t hp = g.h + 2 * g.ph, wp = g.w + 2 * g.pw;
  const int64_t plane_in = g.h * g.w, plane_out = g.ho * g.wo, plane_wide = g.ho * wp;
  const int64_t span = (g.ho - 1) * wp + g.wo;
  at::parallel_for(0, g.batch * g.cin, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> wide(g.cout * plane_wide, acc_t(0));  // columns >= wo stay zero
    std::vector<acc_t> scratch(hp * wp);
    int64_t wide_image = -1;
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / g.cin, ci = task % g.cin;
      if (b != wide_image) {
        const acc_t* grads = gy + b * g.cout * plane_out;
        for (int64_t c = 0; c < g.cout; ++c) {
          for (int64_t r = 0; r < g.ho; ++r) {
            std::copy(grads + c * plane_out + r * g.wo, grads + c * plane_out + (r + 1) * g.wo,
                      wide.data() + c * plane_wide + r * wp);
          }
        }
        wide_image = b;
      }
      acc_t* acc = scratch.data();
      std::fill(acc, acc + hp * wp, acc_t(0));
      for (int64_t column = ci * g.taps(); column < (ci + 1) * g.taps(); ++column) {
        const int64_t r = column % g.taps();
        acc_t* dst = acc + (r / g.kw) * g.dh * wp + (r % g.kw) * g.dw;
        const acc_t* src[4];
        acc_t v[4];
        int n = 0;
        auto flush = [&] {
          if (n == 4) {
            for (int64_t i = 0; i < span; ++i)
              dst[i] += (v[0] * src[0][i] + v[1] * src[1][i]) + (v[2] * src[2][i] + v[3] * src[3][i]);
          } else {
            for (int k = 0; k < n; ++k) axpy(dst, src[k], v[k], span, 1);
          }
          n = 0;
        };
        for (int64_t j = ccol[column]; j < ccol[column + 1]; ++j) {
          src[n] = wide.data() + int64_t(row[j]) * plane_wide;
          v[n++] = val[pos[j]];
          if (n == 4) flush();
        }
        flush();
      }
      acc_t* out = dx + task * plane_in;
      for (int64_t ih = 0; ih < g.h; ++ih) {
        std::copy(acc + (ih + g.ph) * wp + g.pw, acc + (ih + g.ph) * wp + g.pw + g.w, out + ih * g.w);
      }
    }
  });
}

// Images per dW task: a task sums its images' contributions to every kept
// entry into its own row of partial sums; the rows are added in order at the
// end. The grouping is fixed (not per thread), so the result does not depend
// on the thread count, and each image of x and grad_out is read from memory
// once (a task per output channel would read all of x once per channel).
constexpr int64_t kImagesPerTask = 4;

template <typename acc_t>
void dw_kernel(const acc_t* gy, const acc_t* x, const int32_t* crow, const int32_t* col, const Geometry& g,
               acc_t* dval) {
  using sum_t = double;  // across images (each image's plane is summed in acc_t)
  const int64_t plane_in = g.h * g.w, plane_out = g.ho * g.wo;
  const int64_t groups = (g.batch + kImagesPerTask - 1) / kImagesPerTask;
  if (g.nnz == 0) return;
  std::vector<Tap> taps(g.nnz);
  for (int64_t j = 0; j < g.nnz; ++j) taps[j] = tap_of(col[j], g);
  std::vector<sum_t> partial(groups * g.nnz, sum_t(0));
  at::parallel_for(0, groups, 1, [&](int64_t begin, int64_t end) {
    // Per kernel column kj: the grad_out plane with the columns that tap
    // cannot reach set to zero (for the flattened dot products).
    std::vector<acc_t> zeroed(g.kw * plane_out);
    std::vector<char> zeroed_ready(g.kw);
    for (int64_t group = begin; group < end; ++group) {
      sum_t* sums = partial.data() + group * g.nnz;
      for (int64_t b = group * kImagesPerTask; b < std::min(g.batch, (group + 1) * kImagesPerTask); ++b) {
        const acc_t* image = x + b * g.cin * plane_in;
        for (int64_t co = 0; co < g.cout; ++co) {
          const acc_t* grad = gy + (b * g.cout + co) * plane_out;
          std::fill(zeroed_ready.begin(), zeroed_ready.end(), 0);
          for (int64_t j = crow[co]; j < crow[co + 1]; ++j) {
            const Tap& t = taps[j];
            const acc_t* in = image + t.ci * plane_in;
            if (t.empty()) continue;
            if (flat(g) && flat_tap(t, g)) {
              acc_t* gz = zeroed.data() + t.kj * plane_out;
              if (!zeroed_ready[t.kj]) {
                std::copy(grad, grad + plane_out, gz);
                for (int64_t oh = 0; oh < g.ho; ++oh) {  // every row: the taps of other ki share this copy
                  std::fill(gz + oh * g.w, gz + oh * g.w + t.ow0, acc_t(0));
                  std::fill(gz + oh * g.w + t.ow1, gz + (oh + 1) * g.w, acc_t(0));
                }
                zeroed_ready[t.kj] = 1;
              }
              sums[j] += sum_t(dot(gz + t.begin(g), in + t.begin(g) + t.shift(g), t.end(g) - t.begin(g), 1));
              continue;
            }
            acc_t s = 0;
            for (int64_t oh = t.oh0; oh < t.oh1; ++oh) {
              const acc_t* in_row = in + (oh * g.sh + t.row_off) * g.w + t.col_off;
              s += dot(grad + oh * g.wo + t.ow0, in_row + t.ow0 * g.sw, t.ow1 - t.ow0, g.sw);
            }
            sums[j] += sum_t(s);
          }
        }
      }
    }
  });
  at::parallel_for(0, g.nnz, 1024, [&](int64_t begin, int64_t end) {
    for (int64_t j = begin; j < end; ++j) {
      sum_t s = 0;
      for (int64_t group = 0; group < groups; ++group) s += partial[group * g.nnz + j];
      dval[j] = acc_t(s);
    }
  });
}

// --- Ops ------------------------------------------------------------------------

at::Tensor sparse_conv2d(const at::Tensor& x, const at::Tensor& values, const at::Tensor& crow, const at::Tensor& col,
                         const at::Tensor& ccol, const at::Tensor& row, const at::Tensor& pos,
                         const std::optional<at::Tensor>& bias, at::IntArrayRef kernel_size, at::IntArrayRef stride,
                         at::IntArrayRef padding, at::IntArrayRef dilation) {
  const Geometry g = check_all(x, values, crow, col, ccol, row, pos, kernel_size, stride, padding, dilation);
  TORCH_CHECK_TYPE(x.scalar_type() == values.scalar_type(), "sparse_conv2d: x and values must have one dtype");
  check_offsets(crow, "crow_indices", g.nnz);
  check_below(col, "col_indices", g.cin * g.taps());
  const at::ScalarType acc = acc_type(x.scalar_type());
  const at::Tensor xa = x.to(acc).contiguous(), va = values.to(acc).contiguous();
  at::Tensor ba;
  if (bias.has_value() && bias->defined()) {
    TORCH_CHECK_VALUE(bias->dim() == 1 && bias->numel() == g.cout, "sparse_conv2d: bias must have ", g.cout,
                      " entries");
    ba = bias->to(acc).contiguous();
  }
  at::Tensor y = empty_output_huge_pages({g.batch, g.cout, g.ho, g.wo}, x.options().dtype(acc));
  AT_DISPATCH_FLOATING_TYPES(acc, "sparse_conv2d", [&] {
    const auto run = g.sh == 1 && g.sw == 1 ? forward_unit_stride_kernel<scalar_t> : forward_kernel<scalar_t>;
    run(xa.const_data_ptr<scalar_t>(), va.const_data_ptr<scalar_t>(), crow.const_data_ptr<int32_t>(),
        col.const_data_ptr<int32_t>(), ba.defined() ? ba.const_data_ptr<scalar_t>() : nullptr, g,
        y.mutable_data_ptr<scalar_t>());
  });
  return y.scalar_type() == x.scalar_type() ? y : y.to(x.scalar_type());
}

std::tuple<at::Tensor, at::Tensor> sparse_conv2d_backward(
    const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& values, const at::Tensor& crow,
    const at::Tensor& col, const at::Tensor& ccol, const at::Tensor& row, const at::Tensor& pos,
    at::IntArrayRef kernel_size, at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
    std::array<bool, 2> output_mask) {
  const auto [want_dx, want_dvalues] = output_mask;
  const Geometry g = check_all(x, values, crow, col, ccol, row, pos, kernel_size, stride, padding, dilation);
  TORCH_CHECK_VALUE(grad_out.dim() == 4 && grad_out.size(0) == g.batch && grad_out.size(1) == g.cout &&
                        grad_out.size(2) == g.ho && grad_out.size(3) == g.wo,
                    "sparse_conv2d_backward: grad_out must have shape (", g.batch, ", ", g.cout, ", ", g.ho, ", ",
                    g.wo, "), got ", grad_out.sizes());
  const at::ScalarType acc = acc_type(grad_out.scalar_type());
  const at::Tensor ga = grad_out.to(acc).contiguous();
  at::Tensor dx = x.new_empty({0}), dvalues = values.new_empty({0});
  if (want_dx) {
    check_offsets(ccol, "ccol_indices", g.nnz);
    check_below(row, "row_indices", g.cout);
    check_below(pos, "csr_positions", g.nnz);
    const at::Tensor va = values.to(acc).contiguous();
    at::Tensor dxa = empty_output_huge_pages({g.batch, g.cin, g.h, g.w}, grad_out.options().dtype(acc));
    AT_DISPATCH_FLOATING_TYPES(acc, "sparse_conv2d_backward_dx", [&] {
      const auto run = g.sh == 1 && g.sw == 1 ? dx_unit_stride_kernel<scalar_t> : dx_kernel<scalar_t>;
      run(ga.const_data_ptr<scalar_t>(), va.const_data_ptr<scalar_t>(), ccol.const_data_ptr<int32_t>(),
          row.const_data_ptr<int32_t>(), pos.const_data_ptr<int32_t>(), g, dxa.mutable_data_ptr<scalar_t>());
    });
    dx = dxa.to(x.scalar_type());
  }
  if (want_dvalues) {
    check_offsets(crow, "crow_indices", g.nnz);
    check_below(col, "col_indices", g.cin * g.taps());
    const at::Tensor xa = x.to(acc).contiguous();
    at::Tensor da = at::empty({g.nnz}, grad_out.options().dtype(acc));
    AT_DISPATCH_FLOATING_TYPES(acc, "sparse_conv2d_backward_dw", [&] {
      dw_kernel<scalar_t>(ga.const_data_ptr<scalar_t>(), xa.const_data_ptr<scalar_t>(),
                          crow.const_data_ptr<int32_t>(), col.const_data_ptr<int32_t>(), g,
                          da.mutable_data_ptr<scalar_t>());
    });
    dvalues = da.to(values.scalar_type());
  }
  return {dx, dvalues};
}

}  // namespace

TORCH_LIBRARY_IMPL(sparsesam, CPU, m) {
  m.impl("sparse_conv2d", &sparse_conv2d);
  m.impl("sparse_conv2d_backward", &sparse_conv2d_backward);
}

}  // namespace sparsesam::cpu
