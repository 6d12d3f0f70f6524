"""Pure-PyTorch ground truth for every sparsesam op.

Each function here is the mathematical definition of the op of the same
name: the C++ (CPU/CUDA) and Triton kernels are tested against it (in
float64, or against PyTorch's own error versus float64), and it is the
fallback backend (``SPARSESAM_BACKEND=reference``). Keep these short and
obviously right; speed lives in the kernels.

Mask convention: a ``bool`` mask *selects* (a pruned entry is an exact zero,
even where the weight is inf or nan); a floating mask *multiplies* (a soft or
learnable mask, whose gradient ``G * W`` the backward ops provide).
"""
from __future__ import annotations

import math
from typing import Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

Tensor = torch.Tensor


def _rows(t: Tensor) -> Tensor:
    """``t`` as a matrix (leading dims flattened); explicit, as ``reshape(-1, 0)`` is ambiguous."""
    return t.reshape(math.prod(t.shape[:-1]), t.shape[-1])


def _empty_like_none(like: Tensor) -> Tensor:
    """What an op returns for an output that was not asked for."""
    return like.new_empty((0,))


def apply_mask(weight: Tensor, mask: Tensor) -> Tensor:
    """W * M in the weight's dtype."""
    if mask.dtype == torch.bool:
        return torch.where(mask, weight, torch.zeros((), dtype=weight.dtype, device=weight.device))
    return weight * mask.to(weight.dtype)


def masked_weight_grad(
    grad_weight: Tensor, weight: Tensor, mask: Tensor, output_mask: Sequence[bool]
) -> Tuple[Tensor, Tensor]:
    """From G = dL/d(W*M): ``dW = G*M`` (through the mask) and ``dM = G*W``."""
    want_dweight, want_dmask = output_mask
    dweight = apply_mask(grad_weight, mask) if want_dweight else _empty_like_none(grad_weight)
    dmask = (grad_weight * weight).to(mask.dtype) if want_dmask else _empty_like_none(grad_weight)
    return dweight, dmask


def masked_linear(x: Tensor, weight: Tensor, mask: Tensor, bias: Optional[Tensor] = None) -> Tensor:
    """y = x (W*M)^T + b over the last dimension of x."""
    return F.linear(x, apply_mask(weight, mask), bias)


def masked_linear_backward(
    grad_out: Tensor, x: Tensor, weight: Tensor, mask: Tensor, output_mask: Sequence[bool]
) -> Tuple[Tensor, Tensor, Tensor]:
    """(dx, dW, dM) of :func:`masked_linear`; the bias gradient is ``grad_out`` summed."""
    want_dx, want_dweight, want_dmask = output_mask
    dx = grad_out @ apply_mask(weight, mask) if want_dx else _empty_like_none(x)
    if want_dweight or want_dmask:
        grad_eff = _rows(grad_out).t() @ _rows(x)
        dweight, dmask = masked_weight_grad(grad_eff, weight, mask, (want_dweight, want_dmask))
    else:
        dweight, dmask = _empty_like_none(weight), _empty_like_none(weight)
    return dx, dweight, dmask


def masked_conv2d(
    x: Tensor,
    weight: Tensor,
    mask: Tensor,
    bias: Optional[Tensor],
    stride: Sequence[int],
    padding: Sequence[int],
    dilation: Sequence[int],
    groups: int,
) -> Tensor:
    """2-d convolution of x with W*M (zero padding)."""
    return F.conv2d(x, apply_mask(weight, mask), bias, stride, padding, dilation, groups)


def masked_conv2d_backward(
    grad_out: Tensor,
    x: Tensor,
    weight: Tensor,
    mask: Tensor,
    stride: Sequence[int],
    padding: Sequence[int],
    dilation: Sequence[int],
    groups: int,
    output_mask: Sequence[bool],
) -> Tuple[Tensor, Tensor, Tensor]:
    """(dx, dW, dM) of :func:`masked_conv2d`; the bias gradient is ``grad_out.sum((0, 2, 3))``."""
    want_dx, want_dweight, want_dmask = output_mask
    dx, grad_eff, _ = torch.ops.aten.convolution_backward(
        grad_out, x, apply_mask(weight, mask), None,
        list(stride), list(padding), list(dilation), False, [0, 0], groups,
        [want_dx, want_dweight or want_dmask, False],
    )
    dx = dx if want_dx else _empty_like_none(x)
    if want_dweight or want_dmask:
        dweight, dmask = masked_weight_grad(grad_eff, weight, mask, (want_dweight, want_dmask))
    else:
        dweight, dmask = _empty_like_none(weight), _empty_like_none(weight)
    return dx, dweight, dmask
