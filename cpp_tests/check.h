// The harness shared by the C++ kernel tests (one executable, one file per
// op family): EXPECT-style checks that record a failure and go on, groups
// that turn an exception into a failure, a typed dispatcher handle per op,
// and the float64 comparison every test uses.
//
// No test framework: EXPECT records a failure with its location and the case
// it belongs to, the run continues, and main returns 1 if anything failed.
#pragma once

#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/util/StringUtil.h>
#include <c10/util/accumulate.h>

#include <algorithm>
#include <cstdio>
#include <functional>
#include <optional>
#include <string>
#include <tuple>
#include <vector>

namespace sparsesam_test {


inline int g_checks = 0;
inline int g_failures = 0;

inline void record(bool ok, const char* expr, const char* file, int line, const std::string& what) {
  ++g_checks;
  if (!ok) {
    ++g_failures;
    std::fprintf(stderr, "FAIL %s:%d: %s  [%s]\n", file, line, expr, what.c_str());
  }
}

// EXPECT(condition, context...): the context (streamed with c10::str) names
// the case, so a failure in a loop says which shape/dtype/mask it was.
#define EXPECT(cond, ...) record(static_cast<bool>(cond), #cond, __FILE__, __LINE__, c10::str(__VA_ARGS__))

// Runs one group of checks; an exception counts as a failure of that group
// instead of ending the whole run.
inline void run_group(const std::string& name, const std::function<void()>& body) {
  const int before = g_failures;
  try {
    body();
  } catch (const c10::Error& e) {
    ++g_checks;
    ++g_failures;
    std::fprintf(stderr, "FAIL %s: unexpected exception: %s\n", name.c_str(), e.what_without_backtrace());
  } catch (const std::exception& e) {
    ++g_checks;
    ++g_failures;
    std::fprintf(stderr, "FAIL %s: unexpected exception: %s\n", name.c_str(), e.what());
  }
  std::printf("%-28s %s\n", name.c_str(), g_failures == before ? "ok" : "FAILED");
}

template <typename Fn>
void expect_throws(Fn&& fn, const std::string& needle, const std::string& what) {
  bool threw = false;
  std::string message;
  try {
    fn();
  } catch (const c10::Error& e) {
    threw = true;
    message = e.what_without_backtrace();
  }
  EXPECT(threw, what, ": expected an error");
  if (threw) {
    EXPECT(message.find(needle) != std::string::npos, what, ": error \"", message, "\" lacks \"", needle, "\"");
  }
}

// ---- the ops, as the dispatcher sees them ----------------------------------

using Tensor = at::Tensor;
using Tensor2 = std::tuple<Tensor, Tensor>;
using Tensor3 = std::tuple<Tensor, Tensor, Tensor>;
using OptTensor = std::optional<Tensor>;

template <typename Signature>
c10::TypedOperatorHandle<Signature> op(const char* name) {
  // typed<>() also checks that the C++ signature matches the registered schema.
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Signature>();
}

// ---- float64 references and comparisons --------------------------------

inline Tensor f64(const Tensor& t) { return t.to(at::kDouble); }

// t as a matrix, leading dimensions flattened; the row count is spelled out
// because reshape({-1, 0}) is ambiguous for a zero-size last dimension.
inline Tensor rows(const Tensor& t) {
  const auto sizes = t.sizes();
  return t.reshape({c10::multiply_integers(sizes.begin(), sizes.end() - 1), sizes.back()});
}

// ---- comparisons -----------------------------------------------------------

inline bool is_empty_output(const Tensor& t) { return t.defined() && t.dim() == 1 && t.size(0) == 0; }

// actual (in dtype) against a float64 expectation: |a - e| <= atol + rtol |e|
// elementwise, with atol scaled by the largest |e| so sums of many terms are
// judged by the rounding of their operands rather than of the result.
inline void expect_close(const Tensor& actual, const Tensor& expected, at::ScalarType dtype, const std::string& what) {
  EXPECT(actual.defined(), what, ": undefined result");
  if (!actual.defined()) return;
  EXPECT(actual.sizes() == expected.sizes(), what, ": shape ", actual.sizes(), " != expected ", expected.sizes());
  EXPECT(actual.scalar_type() == dtype, what, ": dtype ", actual.scalar_type(), " != ", dtype);
  EXPECT(actual.device().is_cpu(), what, ": not on the CPU");
  if (actual.sizes() != expected.sizes() || expected.numel() == 0) return;
  const bool is_double = dtype == at::kDouble;
  const double rtol = is_double ? 1e-12 : 1e-5;
  const double scale = std::max(1.0, expected.abs().max().item<double>());
  const double atol = (is_double ? 1e-12 : 2e-5) * scale;
  const Tensor err = (f64(actual) - expected).abs();
  const bool ok = (err <= atol + rtol * expected.abs()).all().item<bool>();  // false on nan
  EXPECT(ok, what, ": max |error| ", err.max().item<double>(), " over tolerance (atol ", atol, ", rtol ", rtol,
        ")");
}

}  // namespace sparsesam_test
