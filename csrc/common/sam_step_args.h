#pragma once
// Checks of the scalar arguments of the fused SAM step ops, shared by the CPU
// and CUDA kernels so both refuse the same settings with the same message
// (the Python face in sparsesam/ops/sam_step.py checks them first; these
// guard raw torch.ops.sparsesam calls). A NaN or infinite lr, eps or decay
// would silently turn every parameter or the ascent point into NaN.
#include <cmath>

#include <c10/util/Exception.h>

namespace sparsesam {

// A finite value >= 0, or a ValueError naming the argument.
inline void check_finite_non_negative(const char* op, const char* name, double value) {
  TORCH_CHECK_VALUE(std::isfinite(value) && value >= 0.0, op, ": ", name, " must be finite and >= 0, got ", value);
}

// sgd_step_'s hyper-parameters, as torch.optim.SGD accepts them but finite;
// dampening may be any finite value (torch.optim.SGD does not bound it).
inline void check_sgd_scalars(const char* op, double lr, double momentum, double dampening, double weight_decay) {
  check_finite_non_negative(op, "lr", lr);
  check_finite_non_negative(op, "momentum", momentum);
  TORCH_CHECK_VALUE(std::isfinite(dampening), op, ": dampening must be finite, got ", dampening);
  check_finite_non_negative(op, "weight_decay", weight_decay);
}

}  // namespace sparsesam
