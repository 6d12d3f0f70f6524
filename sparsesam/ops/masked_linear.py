"""masked_linear: ``y = x (W*M)^T + b`` with a fused, memory-lean backward.

Forward builds W*M only for the GEMM. Backward recomputes it for dx and
turns G = dy^T x into ``dW = G*M`` / ``dM = G*W`` in one in-place pass
(csrc/common/masked_layers.h), so no weight-sized tensor is saved between
forward and backward: autograd keeps just the inputs it already holds.
"""
from __future__ import annotations

from typing import Optional

import torch

from . import _autocast, _checks
from ._library import none_if_empty

Tensor = torch.Tensor


def masked_linear(x: Tensor, weight: Tensor, mask: Tensor, bias: Optional[Tensor] = None) -> Tensor:
    """``F.linear(x, weight*mask, bias)``; differentiable in x, weight, a float mask and bias."""
    _checks.tensor("x", x)
    _checks.tensor("weight", weight, rank=(2,))
    _checks.mask(weight, mask)
    _checks.bias(weight, bias)
    _checks.same_device(x=x, weight=weight, bias=bias)
    if x.dim() == 0 or x.shape[-1] != weight.shape[1]:
        raise ValueError(f"x has shape {tuple(x.shape)}; its last dimension must be in_features={weight.shape[1]}")
    x, weight, mask, bias = _autocast.cast_inputs(x.device.type, x, weight, mask, bias)
    _checks.same_dtype(x=x, weight=weight)
    return torch.ops.sparsesam.masked_linear.default(x, weight, mask, bias)


@torch.library.register_fake("sparsesam::masked_linear")
def _masked_linear_fake(x, weight, mask, bias):
    torch._check(x.shape[-1] == weight.shape[1], lambda: "x's last dimension must be in_features")
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


@torch.library.register_fake("sparsesam::masked_linear_backward")
def _masked_linear_backward_fake(grad_out, x, weight, mask, output_mask):
    want_dx, want_dweight, want_dmask = output_mask
    return (
        torch.empty_like(x, memory_format=torch.contiguous_format) if want_dx else x.new_empty((0,)),
        weight.new_empty(weight.shape) if want_dweight else weight.new_empty((0,)),
        weight.new_empty(weight.shape) if want_dmask else weight.new_empty((0,)),
    )


def _setup_context(ctx, inputs, output):
    x, weight, mask, bias = inputs
    want_dx, want_dweight, want_dmask = ctx.needs_input_grad[:3]
    # Save only what the requested gradients read (all are inputs already
    # alive, so saving costs no memory): dx <- W, M; dW <- x, M; dM <- x, W.
    ctx.save_for_backward(
        x if (want_dweight or want_dmask) else None,
        weight if (want_dx or want_dmask) else None,
        mask,
    )


def _placeholder(like: Tensor, shape) -> Tensor:
    return like.new_zeros(()).expand(shape)


def _backward(ctx, grad_out):
    x, weight, mask = ctx.saved_tensors
    want_dx, want_dweight, want_dmask, want_dbias = ctx.needs_input_grad[:4]
    dx = dweight = dmask = dbias = None
    if want_dx or want_dweight or want_dmask:
        # What was not saved is passed as a zero-stride placeholder of the
        # right shape (no memory); the kernel never reads it for the
        # outputs not asked for.
        x_arg = x if x is not None else _placeholder(grad_out, (*grad_out.shape[:-1], mask.shape[1]))
        w_arg = weight if weight is not None else _placeholder(grad_out, mask.shape)
        dx, dweight, dmask = torch.ops.sparsesam.masked_linear_backward.default(
            grad_out.contiguous(), x_arg, w_arg, mask, [want_dx, want_dweight, want_dmask]
        )
        dx, dweight, dmask = none_if_empty(dx, want_dx), none_if_empty(dweight, want_dweight), none_if_empty(dmask, want_dmask)
    if want_dbias:
        # (sum over dim=() would reduce everything: a 1-D grad_out is its own sum.)
        dbias = grad_out if grad_out.dim() == 1 else grad_out.sum(tuple(range(grad_out.dim() - 1)))
    return dx, dweight, dmask, dbias


torch.library.register_autograd("sparsesam::masked_linear", _backward, setup_context=_setup_context)
