"""csr_linear: ``y = x W^T + b`` with W kept only at a fixed mask's entries.

W is ``values`` (the kept entries, CSR order) at the entries of a
:class:`~sparsesam.sparse.CSRPattern`, and is never densified. Forward is a
row-parallel SpMM; backward gives dx through the pattern's precomputed
transposed index (no atomics) and the weight gradient only at kept entries
(an SDDMM), so both cost in proportion to nnz (csrc/cpu/csr_linear_cpu.cpp).
Autograd saves only what the requested gradients read: x for dvalues, values
for dx, and the pattern (inputs already alive, so nothing new is kept).
"""
from __future__ import annotations

import warnings
from typing import Optional

import torch

from ..sparse.csr import CSRPattern
from . import _sparse_matmul_common as common
from ._library import none_if_empty

Tensor = torch.Tensor


def csr_linear(x: Tensor, values: Tensor, pattern: CSRPattern, bias: Optional[Tensor] = None) -> Tensor:
    """``F.linear(x, W, bias)`` for ``W = pattern.scatter(values)``; differentiable in x, values and bias."""
    values_error = None
    if (isinstance(pattern, CSRPattern) and isinstance(values, Tensor) and values.dim() == 1
            and values.shape[0] != pattern.nnz):
        values_error = f"values has {values.shape[0]} entries but the pattern has nnz={pattern.nnz}"
    x, values, bias = common.check_inputs(x, values, pattern, CSRPattern, 1, values_error,
                                          getattr(pattern, "crow_indices", None), bias)
    return torch.ops.sparsesam.csr_linear.default(x, values, *pattern, bias)


def sparse_linear(x: Tensor, values: Tensor, pattern: CSRPattern, bias: Optional[Tensor] = None) -> Tensor:
    """Deprecated name of :func:`csr_linear` ("sparse" now names the family of formats; the op is
    ``torch.ops.sparsesam.csr_linear``, and the old ``torch.ops.sparsesam.sparse_linear`` no longer exists)."""
    warnings.warn("sparsesam.ops.sparse_linear is deprecated: use sparsesam.ops.csr_linear (same arguments)",
                  DeprecationWarning, stacklevel=2)
    return csr_linear(x, values, pattern, bias)


@torch.library.register_fake("sparsesam::csr_linear")
def _csr_linear_fake(x, values, crow_indices, col_indices, ccol_indices, row_indices, csr_positions, bias):
    torch._check(x.shape[-1] == ccol_indices.shape[0] - 1, lambda: "x's last dimension must be in_features")
    torch._check(values.shape[0] == col_indices.shape[0], lambda: "values must have one entry per column index")
    return x.new_empty((*x.shape[:-1], crow_indices.shape[0] - 1))


@torch.library.register_fake("sparsesam::csr_linear_backward")
def _csr_linear_backward_fake(grad_out, x, values, crow_indices, col_indices, ccol_indices, row_indices,
                                 csr_positions, output_mask):
    return common.backward_fake(x, values, output_mask)


def _setup_context(ctx, inputs, output):
    x, values, crow_indices, col_indices, ccol_indices, row_indices, csr_positions, bias = inputs
    want_dx, want_dvalues = ctx.needs_input_grad[:2]
    # dx reads the values, dvalues reads x; the index is always an input alive anyway.
    ctx.save_for_backward(x if want_dvalues else None, values if want_dx else None,
                          crow_indices, col_indices, ccol_indices, row_indices, csr_positions)


def _backward(ctx, grad_out):
    x, values, crow_indices, col_indices, ccol_indices, row_indices, csr_positions = ctx.saved_tensors
    want_dx, want_dvalues = ctx.needs_input_grad[:2]
    want_dbias = ctx.needs_input_grad[7]
    dx = dvalues = dbias = None
    if want_dx or want_dvalues:
        x_arg = x if x is not None else common.placeholder(grad_out, (*grad_out.shape[:-1], ccol_indices.numel() - 1))
        v_arg = values if values is not None else common.placeholder(grad_out, (col_indices.numel(),))
        dx, dvalues = torch.ops.sparsesam.csr_linear_backward.default(
            grad_out, x_arg, v_arg, crow_indices, col_indices, ccol_indices, row_indices, csr_positions,
            [want_dx, want_dvalues],
        )
        dx, dvalues = none_if_empty(dx, want_dx), none_if_empty(dvalues, want_dvalues)
    if want_dbias:
        dbias = common.bias_grad(grad_out)
    return dx, dvalues, None, None, None, None, None, dbias


torch.library.register_autograd("sparsesam::csr_linear", _backward, setup_context=_setup_context)
