// The one list of sparsesam op schemas.
//
// ops.cpp defines every schema in the `sparsesam` namespace (the public ops,
// dispatched by device). The CUDA C++ kernels register the same schemas in
// a second namespace, `sparsesam_cuda`, so that Python can pick between the
// Triton and the CUDA C++ implementation at run time without overriding a
// kernel registration (SPARSESAM_BACKEND=triton|cuda|reference).
#pragma once

// W * M in the weight's dtype. A bool mask selects (pruned entries are exact
// zeros even where the weight is inf/nan); a float mask multiplies.
#define SPARSESAM_SCHEMA_APPLY_MASK "apply_mask(Tensor weight, Tensor mask) -> Tensor"

// The fused epilogue over the effective weight gradient G = dL/d(W*M):
// one pass writes dW = G*M and dM = G*W. output_mask = [dW, dM]; an output
// that is not asked for comes back as an empty tensor of shape [0].
#define SPARSESAM_SCHEMA_MASKED_WEIGHT_GRAD \
  "masked_weight_grad(Tensor grad_weight, Tensor weight, Tensor mask, bool[2] output_mask) -> (Tensor, Tensor)"

// y = x (W*M)^T + b over the last dimension of x; W*M lives only while the
// GEMM runs (nothing weight-sized is saved for backward).
#define SPARSESAM_SCHEMA_MASKED_LINEAR \
  "masked_linear(Tensor x, Tensor weight, Tensor mask, Tensor? bias) -> Tensor"

// Returns (dx, dW, dM) for output_mask = [dx, dW, dM]; empty [0] when not
// asked for. The bias gradient is a plain sum and stays in Python.
#define SPARSESAM_SCHEMA_MASKED_LINEAR_BACKWARD                                        \
  "masked_linear_backward(Tensor grad_out, Tensor x, Tensor weight, Tensor mask, " \
  "bool[3] output_mask) -> (Tensor, Tensor, Tensor)"

#define SPARSESAM_SCHEMA_MASKED_CONV2D                                                     \
  "masked_conv2d(Tensor x, Tensor weight, Tensor mask, Tensor? bias, int[2] stride, " \
  "int[2] padding, int[2] dilation, int groups) -> Tensor"

#define SPARSESAM_SCHEMA_MASKED_CONV2D_BACKWARD                                         \
  "masked_conv2d_backward(Tensor grad_out, Tensor x, Tensor weight, Tensor mask, "  \
  "int[2] stride, int[2] padding, int[2] dilation, int groups, "        \
  "bool[3] output_mask) -> (Tensor, Tensor, Tensor)"
