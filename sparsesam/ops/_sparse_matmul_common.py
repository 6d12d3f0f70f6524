"""What the sparse matmul ops of all three formats (CSR ``csr_linear``, ``bsr_linear``, ``nm_linear``) share
in their Python faces: argument checks, the backward's fake, and the pieces of autograd."""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from . import _autocast, _checks

Tensor = torch.Tensor


def check_inputs(x: Tensor, values: Tensor, pattern, pattern_type: type, values_rank: int,
                 values_error: Optional[str], index: Tensor, bias: Optional[Tensor]) -> Tuple[Tensor, Tensor, Optional[Tensor]]:
    """Check the arguments of a sparse linear op (errors name the argument), apply autocast,
    and return (x, values, bias) as the kernel gets them. ``values_error``: the caller's
    message when values do not fit the pattern (checked after values' rank)."""
    _checks.tensor("x", x)
    _checks.tensor("values", values, rank=(values_rank,))
    if not isinstance(pattern, pattern_type):
        raise TypeError(f"pattern must be a sparsesam.sparse.{pattern_type.__name__}, got {type(pattern).__name__}")
    if values_error is not None:
        raise ValueError(values_error)
    if bias is not None:
        _checks.tensor("bias", bias, rank=(1,))
        if bias.shape[0] != pattern.out_features:
            raise ValueError(f"bias has {bias.shape[0]} entries but the pattern has {pattern.out_features} outputs")
    _checks.same_device(x=x, values=values, pattern=index, bias=bias)
    if x.dim() == 0 or x.shape[-1] != pattern.in_features:
        raise ValueError(f"x has shape {tuple(x.shape)}; its last dimension must be in_features={pattern.in_features}")
    x, values, bias = _autocast.cast_inputs(x.device.type, x, values, bias)
    _checks.same_dtype(x=x, values=values)
    if bias is not None:
        _checks.same_dtype(values=values, bias=bias)
    return x, values, bias


def backward_fake(x: Tensor, values: Tensor, output_mask) -> Tuple[Tensor, Tensor]:
    """(dx, dvalues) shaped like (x, values), or empty [0] where not asked for."""
    want_dx, want_dvalues = output_mask
    return (
        torch.empty_like(x, memory_format=torch.contiguous_format) if want_dx else x.new_empty((0,)),
        values.new_empty(values.shape) if want_dvalues else values.new_empty((0,)),
    )


def placeholder(like: Tensor, shape) -> Tensor:
    """A zero-stride tensor of ``shape`` (no memory): stands in for an input autograd did not
    save because the gradient that reads it was not asked for; the kernel does not read it."""
    return like.new_zeros(()).expand(shape)


def bias_grad(grad_out: Tensor) -> Tensor:
    """dL/dbias of a linear layer: grad_out summed over every dimension but the last."""
    return grad_out if grad_out.dim() == 1 else grad_out.sum(tuple(range(grad_out.dim() - 1)))
