"""sparse_conv2d: ``F.conv2d(x, W, bias, stride, padding, dilation)`` with W kept only at a fixed mask's entries.

W (out_channels, in_channels, kh, kw) is ``values`` at the entries of the
:class:`~sparsesam.sparse.CSRPattern` of W viewed as
``(out_channels, in_channels * kh * kw)`` (``CSRPattern.from_mask(mask.flatten(1))``),
never densified. The CPU kernel (csrc/cpu/sparse_conv2d_cpu.cpp) is a
direct sparse convolution: every kept weight adds a shifted window of one
input plane to one output plane, so forward, dx and dvalues each cost
``nnz * N * H_out * W_out`` multiply-adds and no im2col buffer is built.
groups = 1 and numeric zero padding only (a grouped or reflect-padded layer
stays dense: see sparsesam.nn.SparseConv2d). On CUDA the op runs its
reference (dense cuDNN through sparsesam.reference) under every backend, as
ops/_library.py binds an op a backend has no kernel for: correct, not fast;
the dispatcher (sparsesam.nn.set_execution) times it like any path.
"""
from __future__ import annotations

from typing import Optional, Sequence, Union

import torch

from ..sparse.csr import CSRPattern
from . import _autocast, _checks, _conv_args
from ._library import none_if_empty

Tensor = torch.Tensor
IntPair = Union[int, Sequence[int]]


def sparse_conv2d(x: Tensor, values: Tensor, pattern: CSRPattern, bias: Optional[Tensor] = None,
                  kernel_size: IntPair = 3, stride: IntPair = 1, padding: IntPair = 0,
                  dilation: IntPair = 1) -> Tensor:
    """The convolution of ``x`` (N, C, H, W) or (C, H, W) with ``W = pattern.scatter(values).view(C_out, C, kh, kw)``."""
    _checks.tensor("x", x, rank=(3, 4))
    _checks.tensor("values", values, rank=(1,))
    if not isinstance(pattern, CSRPattern):
        raise TypeError(f"pattern must be a sparsesam.sparse.CSRPattern, got {type(pattern).__name__}")
    if values.shape[0] != pattern.nnz:
        raise ValueError(f"values has {values.shape[0]} entries but the pattern has nnz={pattern.nnz}")
    kernel_size = _conv_args.int_pair("kernel_size", kernel_size, minimum=1)
    stride = _conv_args.int_pair("stride", stride, minimum=1)
    padding = _conv_args.int_pair("padding", padding, minimum=0)
    dilation = _conv_args.int_pair("dilation", dilation, minimum=1)
    taps = kernel_size[0] * kernel_size[1]
    if pattern.in_features != x.shape[-3] * taps:
        raise ValueError(f"x has {x.shape[-3]} channels, so the pattern needs in_channels * kh * kw = "
                         f"{x.shape[-3] * taps} columns; it has {pattern.in_features}")
    if bias is not None:
        _checks.tensor("bias", bias, rank=(1,))
        if bias.shape[0] != pattern.out_features:
            raise ValueError(f"bias has {bias.shape[0]} entries but the pattern has {pattern.out_features} outputs")
    _checks.same_device(x=x, values=values, pattern=pattern.crow_indices, bias=bias)
    for dim, name in ((-2, "height"), (-1, "width")):
        i = dim + 2
        if x.shape[dim] + 2 * padding[i] < dilation[i] * (kernel_size[i] - 1) + 1:
            raise ValueError(f"x's padded {name} {x.shape[dim] + 2 * padding[i]} is smaller than the dilated kernel "
                             f"({dilation[i] * (kernel_size[i] - 1) + 1})")
    x, values, bias = _autocast.cast_inputs(x.device.type, x, values, bias)
    _checks.same_dtype(x=x, values=values)
    if bias is not None:
        _checks.same_dtype(values=values, bias=bias)
    unbatched = x.dim() == 3
    if unbatched:
        x = x.unsqueeze(0)
    y = torch.ops.sparsesam.sparse_conv2d.default(x, values, *pattern, bias, kernel_size, stride, padding, dilation)
    return y.squeeze(0) if unbatched else y


def _out_size(size, k, s, p, d):
    return (size + 2 * p - d * (k - 1) - 1) // s + 1


@torch.library.register_fake("sparsesam::sparse_conv2d")
def _sparse_conv2d_fake(x, values, crow_indices, col_indices, ccol_indices, row_indices, csr_positions, bias,
                        kernel_size, stride, padding, dilation):
    n, c, h, w = x.shape
    torch._check(ccol_indices.shape[0] - 1 == c * kernel_size[0] * kernel_size[1],
                 lambda: "the pattern must have in_channels * kh * kw columns")
    torch._check(values.shape[0] == col_indices.shape[0], lambda: "values must have one entry per column index")
    oh = _out_size(h, kernel_size[0], stride[0], padding[0], dilation[0])
    ow = _out_size(w, kernel_size[1], stride[1], padding[1], dilation[1])
    return x.new_empty((n, crow_indices.shape[0] - 1, oh, ow))


@torch.library.register_fake("sparsesam::sparse_conv2d_backward")
def _sparse_conv2d_backward_fake(grad_out, x, values, crow_indices, col_indices, ccol_indices, row_indices,
                                 csr_positions, kernel_size, stride, padding, dilation, output_mask):
    want_dx, want_dvalues = output_mask
    return (
        x.new_empty(x.shape) if want_dx else x.new_empty((0,)),
        values.new_empty(values.shape) if want_dvalues else values.new_empty((0,)),
    )


def _setup_context(ctx, inputs, output):
    x, values, crow, col, ccol, row, pos, bias, kernel_size, stride, padding, dilation = inputs
    want_dx, want_dvalues = ctx.needs_input_grad[:2]
    # dx reads the values, dvalues reads x; the index is an input alive anyway.
    ctx.save_for_backward(x if want_dvalues else None, values if want_dx else None, crow, col, ccol, row, pos)
    ctx.x_shape, ctx.nnz = tuple(x.shape), values.shape[0]
    ctx.geometry = (list(kernel_size), list(stride), list(padding), list(dilation))


def _placeholder(like: Tensor, shape) -> Tensor:
    return like.new_zeros(()).expand(shape)


def _backward(ctx, grad_out):
    x, values, crow, col, ccol, row, pos = ctx.saved_tensors
    want_dx, want_dvalues = ctx.needs_input_grad[:2]
    want_dbias = ctx.needs_input_grad[7]
    dx = dvalues = dbias = None
    if want_dx or want_dvalues:
        # What was not saved goes in as a zero-stride placeholder (no memory);
        # the kernel does not read it.
        x_arg = x if x is not None else _placeholder(grad_out, ctx.x_shape)
        v_arg = values if values is not None else _placeholder(grad_out, (ctx.nnz,))
        dx, dvalues = torch.ops.sparsesam.sparse_conv2d_backward.default(
            grad_out, x_arg, v_arg, crow, col, ccol, row, pos, *ctx.geometry, [want_dx, want_dvalues])
        dx, dvalues = none_if_empty(dx, want_dx), none_if_empty(dvalues, want_dvalues)
    if want_dbias:
        dbias = grad_out.sum((0, 2, 3))
    return dx, dvalues, None, None, None, None, None, dbias, None, None, None, None


torch.library.register_autograd("sparsesam::sparse_conv2d", _backward, setup_context=_setup_context)
