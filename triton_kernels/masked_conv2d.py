"""masked_conv2d in Triton: the mask epilogues of masked_weight.py around ATen's convolution.

Convolution itself stays with ATen (cuDNN on CUDA): the op adds W*M on the
way in (Triton ``apply_mask``) and turns the effective weight gradient G from
``convolution_backward`` into ``dW = G*M`` / ``dM = G*W`` in one Triton pass
on the way out, the same composition as csrc/common/masked_layers.h.
"""
from __future__ import annotations

from typing import Optional, Sequence, Tuple

import torch

from .masked_weight import apply_mask, masked_weight_grad

Tensor = torch.Tensor


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
    """2-d convolution of x with W*M (zero padding); the bias is added by ATen's kernel."""
    return torch.ops.aten.convolution(
        x, apply_mask(weight, mask), bias,
        list(stride), list(padding), list(dilation), False, [0, 0], groups,
    )


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
    """(dx, dW, dM) of :func:`masked_conv2d`; an output not asked for is ``new_empty((0,))``."""
    want_dx, want_dw, want_dm = (bool(v) for v in output_mask)
    want_g = want_dw or want_dm
    # convolution_backward reads the weight's values only for grad_input, so
    # W*M is built only when dx is asked for (otherwise only its shape matters).
    w_for_dx = apply_mask(weight, mask) if want_dx else weight
    dx, g, _ = torch.ops.aten.convolution_backward(
        grad_out, x, w_for_dx, None,
        list(stride), list(padding), list(dilation), False, [0, 0], groups,
        [want_dx, want_g, False],
    )
    if want_g:
        dw, dm = masked_weight_grad(g, weight, mask, (want_dw, want_dm))
    else:
        dw = dm = weight.new_empty((0,))
    return (dx if want_dx else x.new_empty((0,))), dw, dm
