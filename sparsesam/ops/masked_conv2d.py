"""masked_conv2d: 2-d convolution with W*M, same memory plan as masked_linear.

ATen's convolution / convolution_backward (oneDNN on CPU, cuDNN on CUDA) do
the heavy lifting; the op adds the mask on the way in and the fused
``dW = G*M`` / ``dM = G*W`` epilogue on the way out.
"""
from __future__ import annotations

from typing import Optional, Sequence, Union

import torch

from . import _autocast, _checks, _conv_args
from ._library import none_if_empty

Tensor = torch.Tensor
IntPair = Union[int, Sequence[int]]


def masked_conv2d(
    x: Tensor,
    weight: Tensor,
    mask: Tensor,
    bias: Optional[Tensor] = None,
    stride: IntPair = 1,
    padding: IntPair = 0,
    dilation: IntPair = 1,
    groups: int = 1,
) -> Tensor:
    """``F.conv2d(x, weight*mask, bias, stride, padding, dilation, groups)`` (numeric zero padding)."""
    _checks.tensor("x", x, rank=(3, 4))
    _checks.tensor("weight", weight, rank=(4,))
    _checks.mask(weight, mask)
    _checks.bias(weight, bias)
    _checks.same_device(x=x, weight=weight, bias=bias)
    stride = _conv_args.int_pair("stride", stride, minimum=1)
    padding = _conv_args.int_pair("padding", padding, minimum=0)
    dilation = _conv_args.int_pair("dilation", dilation, minimum=1)
    groups = _conv_args.positive_int("groups", groups)
    if x.shape[-3] != weight.shape[1] * groups:
        raise ValueError(
            f"x has {x.shape[-3]} channels but weight expects in_channels={weight.shape[1] * groups} (groups={groups})"
        )
    if weight.shape[0] % groups:
        raise ValueError(f"weight's {weight.shape[0]} output channels are not divisible by groups={groups}")
    x, weight, mask, bias = _autocast.cast_inputs(x.device.type, x, weight, mask, bias)
    _checks.same_dtype(x=x, weight=weight)
    unbatched = x.dim() == 3
    if unbatched:
        x = x.unsqueeze(0)
    y = torch.ops.sparsesam.masked_conv2d.default(x, weight, mask, bias, stride, padding, dilation, groups)
    return y.squeeze(0) if unbatched else y


def _out_size(size, k, s, p, d):
    return (size + 2 * p - d * (k - 1) - 1) // s + 1


@torch.library.register_fake("sparsesam::masked_conv2d")
def _masked_conv2d_fake(x, weight, mask, bias, stride, padding, dilation, groups):
    n, _, h, w = x.shape
    kh, kw = weight.shape[-2:]
    oh = _out_size(h, kh, stride[0], padding[0], dilation[0])
    ow = _out_size(w, kw, stride[1], padding[1], dilation[1])
    # Same layout as the eager kernel: ATen's convolution follows the input's.
    memory_format = torch.channels_last if x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous() else torch.contiguous_format
    return x.new_empty((n, weight.shape[0], oh, ow)).contiguous(memory_format=memory_format)


@torch.library.register_fake("sparsesam::masked_conv2d_backward")
def _masked_conv2d_backward_fake(grad_out, x, weight, mask, stride, padding, dilation, groups, output_mask):
    want_dx, want_dweight, want_dmask = output_mask
    return (
        torch.empty_like(x) if want_dx else x.new_empty((0,)),
        weight.new_empty(weight.shape) if want_dweight else weight.new_empty((0,)),
        weight.new_empty(weight.shape) if want_dmask else weight.new_empty((0,)),
    )


def _setup_context(ctx, inputs, output):
    x, weight, mask, bias, stride, padding, dilation, groups = inputs
    want_dx, want_dweight, want_dmask = ctx.needs_input_grad[:3]
    ctx.conv_args = (stride, padding, dilation, groups)
    ctx.x_shape = x.shape
    # dx <- W, M; dW <- x, M; dM <- x, W (see masked_linear.py).
    ctx.save_for_backward(
        x if (want_dweight or want_dmask) else None,
        weight if (want_dx or want_dmask) else None,
        mask,
    )


def _backward(ctx, grad_out):
    x, weight, mask = ctx.saved_tensors
    want_dx, want_dweight, want_dmask, want_dbias = ctx.needs_input_grad[:4]
    dx = dweight = dmask = dbias = None
    if want_dx or want_dweight or want_dmask:
        # Zero-stride placeholders (no memory) for what was not saved.
        x_arg = x if x is not None else grad_out.new_zeros(()).expand(ctx.x_shape)
        w_arg = weight if weight is not None else grad_out.new_zeros(()).expand(mask.shape)
        dx, dweight, dmask = torch.ops.sparsesam.masked_conv2d_backward.default(
            grad_out, x_arg, w_arg, mask, *ctx.conv_args, [want_dx, want_dweight, want_dmask]
        )
        dx, dweight, dmask = none_if_empty(dx, want_dx), none_if_empty(dweight, want_dweight), none_if_empty(dmask, want_dmask)
    if want_dbias:
        dbias = grad_out.sum((0, 2, 3))
    return dx, dweight, dmask, dbias, None, None, None, None


torch.library.register_autograd("sparsesam::masked_conv2d", _backward, setup_context=_setup_context)
