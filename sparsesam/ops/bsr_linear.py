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
from . import _autocast, _checks
from ._library import none_if_empty, register_cuda_router

Tensor = torch.Tensor


def bsr_linear(x: Tensor, values: Tensor, pattern: BSRPattern, bias: Optional[Tensor] = None) -> Tensor:
    """``F.linear(x, W, bias)`` for ``W = pattern.scatter(values)``; differentiable in x, values and bias."""
    _checks.tensor("x", x)
    _checks.tensor("values", values, rank=(3,))
    if not isinstance(pattern, BSRPattern):
        raise TypeError(f"pattern must be a sparsesam.sparse.BSRPattern, got {type(pattern).__name__}")
    if tuple(values.shape) != pattern.values_shape:
        raise ValueError(f"values has shape {tuple(values.shape)} but the pattern has "
                         f"values_shape=(nblocks, bh, bw)={pattern.values_shape}")
    if bias is not None:
        _checks.tensor("bias", bias, rank=(1,))
        if bias.shape[0] != pattern.out_features:
            raise ValueError(f"bias has {bias.shape[0]} entries but the pattern has {pattern.out_features} outputs")
    _checks.same_device(x=x, values=values, pattern=pattern.crow_indices, bias=bias)
    if x.dim() == 0 or x.shape[-1] != pattern.in_features:
        raise ValueError(f"x has shape {tuple(x.shape)}; its last dimension must be in_features={pattern.in_features}")
    x, values, bias = _autocast.cast_inputs(x.device.type, x, values, bias)
    _checks.same_dtype(x=x, values=values)
    if bias is not None:
        _checks.same_dtype(values=values, bias=bias)
    return torch.ops.sparsesam.bsr_linear.default(x, values, *pattern.index, bias)


@torch.library.register_fake("sparsesam::bsr_linear")
def _bsr_linear_fake(x, values, crow_indices, col_indices, ccol_indices, row_indices, bsr_positions, bias):
    torch._check(values.dim() == 3, lambda: "values must be (nblocks, bh, bw)")
    torch._check(x.shape[-1] == (ccol_indices.shape[0] - 1) * values.shape[2],
                 lambda: "x's last dimension must be in_features")
    torch._check(values.shape[0] == col_indices.shape[0], lambda: "values must have one block per column index")
    return x.new_empty((*x.shape[:-1], (crow_indices.shape[0] - 1) * values.shape[1]))


@torch.library.register_fake("sparsesam::bsr_linear_backward")
def _bsr_linear_backward_fake(grad_out, x, values, crow_indices, col_indices, ccol_indices, row_indices,
                              bsr_positions, output_mask):
    want_dx, want_dvalues = output_mask
    return (
        torch.empty_like(x, memory_format=torch.contiguous_format) if want_dx else x.new_empty((0,)),
        values.new_empty(values.shape) if want_dvalues else values.new_empty((0,)),
    )


def _setup_context(ctx, inputs, output):
    x, values, crow_indices, col_indices, ccol_indices, row_indices, bsr_positions, bias = inputs
    want_dx, want_dvalues = ctx.needs_input_grad[:2]
    # dx reads the values, dvalues reads x; the index is always an input alive anyway.
    ctx.save_for_backward(x if want_dvalues else None, values if want_dx else None,
                          crow_indices, col_indices, ccol_indices, row_indices, bsr_positions)
    # The block size and x's shape, for the placeholders of what was not saved.
    ctx.values_shape = tuple(values.shape)
    ctx.in_features = x.shape[-1]


def _placeholder(like: Tensor, shape) -> Tensor:
    return like.new_zeros(()).expand(shape)


def _backward(ctx, grad_out):
    x, values, crow_indices, col_indices, ccol_indices, row_indices, bsr_positions = ctx.saved_tensors
    want_dx, want_dvalues = ctx.needs_input_grad[:2]
    want_dbias = ctx.needs_input_grad[7]
    dx = dvalues = dbias = None
    if want_dx or want_dvalues:
        # What was not saved goes in as a zero-stride placeholder of the right
        # shape (no memory); the kernel does not read it.
        x_arg = x if x is not None else _placeholder(grad_out, (*grad_out.shape[:-1], ctx.in_features))
        v_arg = values if values is not None else _placeholder(grad_out, ctx.values_shape)
        dx, dvalues = torch.ops.sparsesam.bsr_linear_backward.default(
            grad_out, x_arg, v_arg, crow_indices, col_indices, ccol_indices, row_indices, bsr_positions,
            [want_dx, want_dvalues],
        )
        dx, dvalues = none_if_empty(dx, want_dx), none_if_empty(dvalues, want_dvalues)
    if want_dbias:
        dbias = grad_out if grad_out.dim() == 1 else grad_out.sum(tuple(range(grad_out.dim() - 1)))
    return dx, dvalues, None, None, None, None, None, dbias


torch.library.register_autograd("sparsesam::bsr_linear", _backward, setup_context=_setup_context)
register_cuda_router("bsr_linear")
register_cuda_router("bsr_linear_backward")
