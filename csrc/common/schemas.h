// The one list of sparsesam op schemas.
//
// Every entry is registered, by ops.cpp, in every namespace the build has:
// `sparsesam` (the public ops, dispatched by device: csrc/cpu for CPU
// tensors, the backend chosen in sparsesam/ops/_library.py for CUDA ones)
// and, in a build with the CUDA C++ kernels, `sparsesam_cuda` (the same
// schemas, CUDA kernels only: one of the backends the Python side binds,
// reached without overriding any registration of `sparsesam`). Python reads
// the list through sparsesam._C.schemas() (csrc/python_module.cpp), so an op
// added here is registered, routed and checked everywhere with no second copy.
#pragma once

namespace sparsesam {

// clang-format off
inline constexpr const char* kSchemas[] = {
    // W * M in the weight's dtype. A bool mask selects (pruned entries are exact
    // zeros even where the weight is inf/nan); a float mask multiplies.
    "apply_mask(Tensor weight, Tensor mask) -> Tensor",

    // The fused epilogue over the effective weight gradient G = dL/d(W*M):
    // one pass writes dW = G*M and dM = G*W. output_mask = [dW, dM]; an output
    // that is not asked for comes back as an empty tensor of shape [0].
    "masked_weight_grad(Tensor grad_weight, Tensor weight, Tensor mask, bool[2] output_mask) -> (Tensor, Tensor)",

    // y = x (W*M)^T + b over the last dimension of x; W*M lives only while the
    // GEMM runs (nothing weight-sized is saved for backward).
    "masked_linear(Tensor x, Tensor weight, Tensor mask, Tensor? bias) -> Tensor",

    // Returns (dx, dW, dM) for output_mask = [dx, dW, dM]; empty [0] when not
    // asked for. The bias gradient is a plain sum and stays in Python.
    "masked_linear_backward(Tensor grad_out, Tensor x, Tensor weight, Tensor mask, "
        "bool[3] output_mask) -> (Tensor, Tensor, Tensor)",

    // y = conv2d(x, W*M, b) (ATen's convolution on the masked weight, which
    // lives only while the convolution runs).
    "masked_conv2d(Tensor x, Tensor weight, Tensor mask, Tensor? bias, int[2] stride, "
        "int[2] padding, int[2] dilation, int groups) -> Tensor",

    // (dx, dW, dM) for output_mask = [dx, dW, dM], through ATen's
    // convolution_backward and the fused epilogue of masked_weight_grad.
    "masked_conv2d_backward(Tensor grad_out, Tensor x, Tensor weight, Tensor mask, "
        "int[2] stride, int[2] padding, int[2] dilation, int groups, "
        "bool[3] output_mask) -> (Tensor, Tensor, Tensor)",

    // --- The fused SAM step (multi-tensor: one call over every parameter) -----
    // masks: one entry per parameter, None for a dense one; a zero entry is a
    // pruned weight that never moves and does not count in the norm.

    // sum over all tensors of (s*g)^2 at kept entries, s = |w| if adaptive else
    // 1, as a float64 0-d tensor. Deterministic: fixed-size blocks summed in
    // float, block partials combined in double in a fixed order, so the bits do
    // not depend on the thread count. `weights` is read only when adaptive.
    "sam_grad_sq_norm(Tensor[] grads, Tensor[] weights, Tensor?[] masks, bool adaptive) -> Tensor",

    // out_i = w_i + rho_i * s^2 * g_i / (sqrt(sq_norm) + eps) at kept entries,
    // w_i elsewhere; rho_i is 0-d or one value per output channel (dim 0).
    // Writes into `out` (persistent buffers: no allocation per step).
    "sam_perturb_(Tensor(a!)[] out, Tensor[] params, Tensor[] grads, Tensor?[] masks, Tensor[] rhos, "
        "Tensor sq_norm, bool adaptive, float eps) -> ()",

    // torch.optim.SGD's update in one pass per element (weight decay, momentum,
    // dampening, nesterov, maximize), pruned entries of weight and momentum
    // buffer left untouched. momentum_buffers is empty when momentum == 0.
    "sgd_step_(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] momentum_buffers, Tensor?[] masks, "
        "float lr, float momentum, float dampening, float weight_decay, bool nesterov, bool maximize, "
        "bool first_step) -> ()",

    // --- Mask-perturbation scoring (multi-tensor: one call over every layer) ---
    // grads[i] = G = dL/d(W*M) of layer i and weights[i] = W; the ops work on the
    // mask gradient dM = G*W, or on dM = grads[i] itself where weights[i] is None
    // (a soft mask's .grad). sparsesam/reference.py has the math and the why.

    // sum over all layers of dM^2 as a float64 0-d tensor, deterministic like
    // sam_grad_sq_norm (C-SAM's global norm of the mask-space ascent).
    "mask_grad_sq_norm(Tensor[] grads, Tensor?[] weights) -> Tensor",

    // C-SAM's mask-space ascent: out_i = clip(M_i + rho * dM_i / (sqrt(sq_norm) + eps), 0, 1)
    // for soft masks M_i (the gradients' dtype). Writes into `out` (persistent buffers).
    "mask_ascent_(Tensor(a!)[] out, Tensor[] grads, Tensor?[] weights, Tensor[] masks, Tensor sq_norm, "
        "float rho, float eps) -> ()",

    // HARP's straight-through gradients: score_grads_i = sign(s_i) * dM_i (the
    // mask is the top fraction of |s|) and rate_grads[i] = sum(dM_i) (float64,
    // one per layer), deterministic.
    "mask_score_grad(Tensor[] grads, Tensor?[] weights, Tensor[] scores) -> (Tensor[], Tensor)",
    // --- True sparse execution (fixed masks) ------------------------------------
    // A weight kept only at its nonzeros: `values` (nnz, CSR order) with the CSR
    // index (crow_indices: out_features + 1 offsets, col_indices: nnz columns)
    // and the transposed index precomputed from it (ccol_indices: in_features + 1
    // offsets; row_indices: the row of each entry in column order; csr_positions:
    // where that entry sits in `values`). All indices int32. See
    // sparsesam/sparse/csr.py.

    // y = x W^T + b over the last dimension of x (W as above, never densified).
    "csr_linear(Tensor x, Tensor values, Tensor crow_indices, Tensor col_indices, "
        "Tensor ccol_indices, Tensor row_indices, Tensor csr_positions, Tensor? bias) -> Tensor",

    // (dx, dvalues) for output_mask = [dx, dvalues]: dx through the transposed
    // index (no atomics), dvalues only at kept entries (an SDDMM); empty [0] when
    // not asked for. The bias gradient is a plain sum and stays in Python.
    "csr_linear_backward(Tensor grad_out, Tensor x, Tensor values, Tensor crow_indices, "
        "Tensor col_indices, Tensor ccol_indices, Tensor row_indices, Tensor csr_positions, bool[2] "
        "output_mask) -> (Tensor, Tensor)",

    // y = conv2d(x, W, b) (NCHW, groups = 1) with W kept only at a fixed mask's
    // entries: the pattern is that of W viewed as (out_channels, in_channels *
    // kh * kw), so ccol_indices has in_channels * kh * kw + 1 entries. Direct
    // sparse convolution: no im2col buffer, W never densified.
    "sparse_conv2d(Tensor x, Tensor values, Tensor crow_indices, Tensor col_indices, "
        "Tensor ccol_indices, Tensor row_indices, Tensor csr_positions, Tensor? bias, "
        "int[2] kernel_size, int[2] stride, int[2] padding, int[2] dilation) -> Tensor",

    // (dx, dvalues) for output_mask = [dx, dvalues], as csr_linear_backward.
    "sparse_conv2d_backward(Tensor grad_out, Tensor x, Tensor values, Tensor crow_indices, "
        "Tensor col_indices, Tensor ccol_indices, Tensor row_indices, Tensor csr_positions, "
        "int[2] kernel_size, int[2] stride, int[2] padding, int[2] dilation, bool[2] output_mask) "
        "-> (Tensor, Tensor)",

    // --- Block-sparse execution (fixed block-structured masks) ------------------
    // A weight kept only at whole bh x bw blocks: `values` (nblocks, bh, bw),
    // contiguous, in BSR order, with the BSR block index (crow_indices:
    // out_features / bh + 1 offsets, col_indices: the block column of each block)
    // and its transposed block index (ccol_indices: in_features / bw + 1 offsets;
    // row_indices: the block row of each block in block-column order;
    // bsr_positions: where that block sits in `values`). All indices int32; the
    // block size is values' shape. See sparsesam/sparse/bsr.py.

    // y = x W^T + b over the last dimension of x (W as above, never densified).
    "bsr_linear(Tensor x, Tensor values, Tensor crow_indices, Tensor col_indices, "
        "Tensor ccol_indices, Tensor row_indices, Tensor bsr_positions, Tensor? bias) -> Tensor",

    // (dx, dvalues) for output_mask = [dx, dvalues]: dx through the transposed
    // block index (no atomics), dvalues only at kept blocks (a block SDDMM);
    // empty [0] when not asked for. The bias gradient stays in Python.
    "bsr_linear_backward(Tensor grad_out, Tensor x, Tensor values, Tensor crow_indices, "
        "Tensor col_indices, Tensor ccol_indices, Tensor row_indices, Tensor bsr_positions, bool[2] "
        "output_mask) -> (Tensor, Tensor)",

    // y = x W^T + b with W kept as an N:M pattern along the input dimension:
    // values (out_features, in_features * n / m) and indices (uint8, the same
    // shape; each kept entry's position in its group of m inputs). in_features
    // is values.size(1) / n * m. 1 <= n < m <= 16. (sparsesam/sparse/nm.py)
    "nm_linear(Tensor x, Tensor values, Tensor indices, int n, int m, Tensor? bias) -> Tensor",

    // (dx, dvalues) for output_mask = [dx, dvalues]: dx column-parallel over
    // ranges of input groups (no atomics), dvalues only at kept entries (an
    // SDDMM); empty [0] when not asked for. The bias gradient stays in Python.
    "nm_linear_backward(Tensor grad_out, Tensor x, Tensor values, Tensor indices, int n, int m, "
        "bool[2] output_mask) -> (Tensor, Tensor)",
};
// clang-format on

}  // namespace sparsesam
