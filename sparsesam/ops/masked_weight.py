"""apply_mask and masked_weight_grad: the elementwise half of every masked layer.

``apply_mask(W, M) = W*M``; its backward is ``masked_weight_grad``, the fused
epilogue that turns G = dL/d(W*M) into ``dW = G*M`` and ``dM = G*W`` in one
pass. The masked layers call the same epilogue inside their backward ops.
"""
from __future__ import annotations

from typing import Sequence, Tuple

import torch

from . import _checks
from ._library import empty_output, none_if_empty

Tensor = torch.Tensor


def apply_mask(weight: Tensor, mask: Tensor) -> Tensor:
    """``weight * mask`` (a bool mask selects, a float mask multiplies); differentiable in both."""
    _checks.tensor("weight", weight)
    _checks.mask(weight, mask)
    return torch.ops.sparsesam.apply_mask.default(weight, mask)


def masked_weight_grad(
    grad_weight: Tensor, weight: Tensor, mask: Tensor, output_mask: Sequence[bool] = (True, True)
) -> Tuple[Tensor, Tensor]:
    """``(G*M, G*W)`` from the effective weight gradient G; an output not asked for is empty."""
    _checks.tensor("grad_weight", grad_weight)
    _checks.tensor("weight", weight)
    _checks.mask(weight, mask)
    _checks.same_dtype(grad_weight=grad_weight, weight=weight)
    if grad_weight.shape != weight.shape:
        raise ValueError(f"grad_weight has shape {tuple(grad_weight.shape)} but weight has {tuple(weight.shape)}")
    want = _checks.output_mask("output_mask", output_mask, 2)
    if want[1] and mask.dtype == torch.bool:
        raise TypeError("mask is bool: a bool mask has no gradient (use a float mask)")
    return torch.ops.sparsesam.masked_weight_grad.default(grad_weight, weight, mask, want)


@torch.library.register_fake("sparsesam::apply_mask")
def _apply_mask_fake(weight, mask):
    torch._check(weight.shape == mask.shape, lambda: "mask must have the weight's shape")
    return torch.empty_like(weight, memory_format=torch.contiguous_format)


@torch.library.register_fake("sparsesam::masked_weight_grad")
def _masked_weight_grad_fake(grad_weight, weight, mask, output_mask):
    torch._check(grad_weight.shape == weight.shape, lambda: "grad_weight must have the weight's shape")
    shaped = lambda wanted: torch.empty_like(weight, memory_format=torch.contiguous_format) if wanted else empty_output(weight)
    return shaped(output_mask[0]), shaped(output_mask[1])


def _apply_mask_setup(ctx, inputs, output):
    weight, mask = inputs
    # Only what the requested gradients read: dW needs M, dM needs W.
    ctx.save_for_backward(weight if ctx.needs_input_grad[1] else None, mask)


def _apply_mask_backward(ctx, grad):
    weight, mask = ctx.saved_tensors
    want_dweight, want_dmask = ctx.needs_input_grad[:2]
    dweight, dmask = torch.ops.sparsesam.masked_weight_grad.default(
        grad.contiguous(), weight if weight is not None else grad, mask, [want_dweight, want_dmask]
    )
    return none_if_empty(dweight, want_dweight), none_if_empty(dmask, want_dmask)


torch.library.register_autograd("sparsesam::apply_mask", _apply_mask_backward, setup_context=_apply_mask_setup)
