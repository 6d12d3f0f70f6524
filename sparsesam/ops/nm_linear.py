"""nm_linear: ``y = x W^T + b`` with W kept only at a fixed N:M pattern's entries.

W is ``values`` (out_features, in_features * n / m) at the entries of an
:class:`~sparsesam.sparse.NMPattern`, and is never densified. The forward
walks each row's groups (one byte of index per entry, no offsets); dx is
column-parallel over ranges of input groups (no atomics, no transposed
index); the weight gradient is computed at kept entries only (an SDDMM)
(csrc/cpu/nm_linear_cpu.cpp). Autograd saves only what the requested
gradients read: x for dvalues, values for dx, and the index (an input alive
anyway).
"""
from __future__ import annotations

from typing import Optional

import torch

from ..sparse.nm import NMPattern
from . import _sparse_matmul_common as common
from ._library import none_if_empty

Tensor = torch.Tensor


def nm_linear(x: Tensor, values: Tensor, pattern: NMPattern, bias: Optional[Tensor] = None) -> Tensor:
    """``F.linear(x, W, bias)`` for ``W = pattern.scatter(values)``; differentiable in x, values and bias."""
    values_error = None
    if (isinstance(pattern, NMPattern) and isinstance(values, Tensor) and values.dim() == 2
            and tuple(values.shape) != pattern.values_shape):
        values_error = f"values has shape {tuple(values.shape)} but the pattern's values are {pattern.values_shape}"
    x, values, bias = common.check_inputs(x, values, pattern, NMPattern, 2, values_error,
                                          getattr(pattern, "indices", None), bias)
    return torch.ops.sparsesam.nm_linear.default(x, values, pattern.indices, pattern.n, pattern.m, bias)


@torch.library.register_fake("sparsesam::nm_linear")
def _nm_linear_fake(x, values, indices, n, m, bias):
    torch._check(values.shape[1] % n == 0, lambda: "values' rows must hold whole groups of n entries")
    torch._check(x.shape[-1] == values.shape[1] // n * m, lambda: "x's last dimension must be in_features")
    return x.new_empty((*x.shape[:-1], values.shape[0]))


@torch.library.register_fake("sparsesam::nm_linear_backward")
def _nm_linear_backward_fake(grad_out, x, values, indices, n, m, output_mask):
    return common.backward_fake(x, values, output_mask)


def _setup_context(ctx, inputs, output):
    x, values, indices, n, m, bias = inputs
    want_dx, want_dvalues = ctx.needs_input_grad[:2]
    # dx reads the values, dvalues reads x; the index is an input alive anyway.
    ctx.save_for_backward(x if want_dvalues else None, values if want_dx else None, indices)
    ctx.n, ctx.m = n, m
    ctx.x_shape = tuple(x.shape)
    ctx.values_shape = tuple(values.shape)


def _backward(ctx, grad_out):
    x, values, indices = ctx.saved_tensors
    want_dx, want_dvalues = ctx.needs_input_grad[:2]
    want_dbias = ctx.needs_input_grad[5]
    dx = dvalues = dbias = None
    if want_dx or want_dvalues:
        x_arg = x if x is not None else common.placeholder(grad_out, ctx.x_shape)
        v_arg = values if values is not None else common.placeholder(grad_out, ctx.values_shape)
        dx, dvalues = torch.ops.sparsesam.nm_linear_backward.default(
            grad_out, x_arg, v_arg, indices, ctx.n, ctx.m, [want_dx, want_dvalues])
        dx, dvalues = none_if_empty(dx, want_dx), none_if_empty(dvalues, want_dvalues)
    if want_dbias:
        dbias = common.bias_grad(grad_out)
    return dx, dvalues, None, None, None, dbias


torch.library.register_autograd("sparsesam::nm_linear", _backward, setup_context=_setup_context)
