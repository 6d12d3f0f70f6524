"""bsr_linear: ``y = x W^T + b`` with W kept only at the whole blocks of a fixed block-structured mask.

W is ``values`` (the kept ``bh x bw`` blocks, shape ``(nblocks, bh, bw)``,
BSR order) at the blocks of a :class:`~sparsesam.sparse.BSRPattern`, and is
never densified. Forward runs each block row's kept blocks as small dense
products against batch tiles of x; backward gives dx through the pattern's
precomputed transposed block index (no atomics) and the weight gradient only
at kept blocks (a block SDDMM), so all three cost in proportion to the kept
blocks (csrc/cpu/bsr_linear_cpu.cpp). Autograd saves only what the requested
gradients read: x for dvalues, values for dx, and the index (inputs already
alive, so nothing new is kept).
"""
from __future__ import annotations

from typing import Optional

import torch

from ..sparse.bsr import BSRPattern
from . import _sparse_matmul_common as common
from ._library import none_if_empty

Tensor = torch.Tensor


def bsr_linear(x: Tensor, values: Tensor, pattern: BSRPattern, bias: Optional[Tensor] = None) -> Tensor:
    """``F.linear(x, W, bias)`` for ``W = pattern.scatter(values)``; differentiable in x, values and bias."""
    values_error = None
    if (isinstance(pattern, BSRPattern) and isinstance(values, Tensor) and values.dim() == 3
            and tuple(values.shape) != pattern.values_shape):
        values_error = (f"values has shape {tuple(values.shape)} but the pattern has "
                        f"values_shape=(nblocks, bh, bw)={pattern.values_shape}")
    x, values, bias = common.check_inputs(x, values, pattern, BSRPattern, 3, values_error,
                                          getattr(pattern, "crow_indices", None), bias)
    return torch.ops.sparsesam.bsr_linear.default(x, values, *pattern.index, bias)


@torch.library.register_fake("sparsesam::bsr_linear")
def _bsr_linear_fake(x, values, crow_indices, col_indices, ccol_indices, row_indices, bsr_positions, bias):
    torch._check(values.dim() == 3, lambda: "values must be (nblocks, bh, bw)")
    torch._check(x.shape[-1] == (ccol_indices.shape[0] - 1) * values.shape[2],
                 lambda: "x's last dimension must be in_features = block columns x bw (values.shape[2]): "
                         "x or values' block shape is wrong")
    torch._check(values.shape[0] == col_indices.shape[0], lambda: "values must have one block per column index")
    return x.new_empty((*x.shape[:-1], (crow_indices.shape[0] - 1) * values.shape[1]))


@torch.library.register_fake("sparsesam::bsr_linear_backward")
def _bsr_linear_backward_fake(grad_out, x, values, crow_indices, col_indices, ccol_indices, row_indices,
                              bsr_positions, output_mask):
    return common.backward_fake(x, values, output_mask)


def _setup_context(ctx, inputs, output):
    x, values, crow_indices, col_indices, ccol_indices, row_indices, bsr_positions, bias = inputs
    want_dx, want_dvalues = ctx.needs_input_grad[:2]
    # dx reads the values, dvalues reads x; the index is always an input alive anyway.
    ctx.save_for_backward(x if want_dvalues else None, values if want_dx else None,
                          crow_indices, col_indices, ccol_indices, row_indices, bsr_positions)
    # The block size and x's shape, for the placeholders of what was not saved.
    ctx.values_shape = tuple(values.shape)
    ctx.in_features = x.shape[-1]


def _backward(ctx, grad_out):
    x, values, crow_indices, col_indices, ccol_indices, row_indices, bsr_positions = ctx.saved_tensors
    want_dx, want_dvalues = ctx.needs_input_grad[:2]
    want_dbias = ctx.needs_input_grad[7]
    dx = dvalues = dbias = None
    if want_dx or want_dvalues:
        x_arg = x if x is not None else common.placeholder(grad_out, (*grad_out.shape[:-1], ctx.in_features))
        v_arg = values if values is not None else common.placeholder(grad_out, ctx.values_shape)
        dx, dvalues = torch.ops.sparsesam.bsr_linear_backward.default(
            grad_out, x_arg, v_arg, crow_indices, col_indices, ccol_indices, row_indices, bsr_positions,
            [want_dx, want_dvalues],
        )
        dx, dvalues = none_if_empty(dx, want_dx), none_if_empty(dvalues, want_dvalues)
    if want_dbias:
        dbias = common.bias_grad(grad_out)
    return dx, dvalues, None, None, None, None, None, dbias


torch.library.register_autograd("sparsesam::bsr_linear", _backward, setup_context=_setup_context)
