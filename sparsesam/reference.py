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
from typing import List, Optional, Sequence, Tuple

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


# ---------------------------------------------------------------------------
# The fused SAM step (DESIGN.md primitive 3). Multi-tensor ops: one call
# covers every parameter. ``masks`` entries may be None (dense parameter);
# a mask entry that is zero (False) marks a pruned weight, which never moves
# and does not count in the norm.


def _kept(t: Tensor, mask: Optional[Tensor]) -> Tensor:
    return t if mask is None else torch.where(mask != 0, t, torch.zeros((), dtype=t.dtype, device=t.device))


def _per_channel(rho: Tensor, like: Tensor) -> Tensor:
    """A 0-d rho, or one rho per output channel (dim 0) broadcast over the rest."""
    return rho if rho.dim() == 0 else rho.reshape(-1, *([1] * (like.dim() - 1)))


def sam_grad_sq_norm(grads: Sequence[Tensor], weights: Sequence[Tensor], masks: Sequence[Optional[Tensor]],
                     adaptive: bool) -> Tensor:
    """sum over all tensors of (s * g)^2 at kept entries, s = |w| (ASAM) or 1; a float64 0-d tensor."""
    total = torch.zeros((), dtype=torch.float64, device=grads[0].device if grads else "cpu")
    for i, (g, m) in enumerate(zip(grads, masks)):
        scaled = g.double() * weights[i].double().abs() if adaptive else g.double()  # weights read only when adaptive
        total = total + _kept(scaled, m).square().sum()
    return total


def sam_perturb(params: Sequence[Tensor], grads: Sequence[Tensor], masks: Sequence[Optional[Tensor]],
                rhos: Sequence[Tensor], sq_norm: Tensor, adaptive: bool, eps: float) -> List[Tensor]:
    """The ascent point ``w + e``, ``e = rho * s^2 * g / (||s*g|| + eps)`` (s = |w| or 1), kept entries only.

    rho: a 0-d tensor or one value per output channel. Computed in float64,
    rounded once to the parameter's dtype.
    """
    scale = 1.0 / (sq_norm.double().sqrt() + eps)
    out = []
    for w, g, m, rho in zip(params, grads, masks, rhos):
        w64 = w.double()
        e = _per_channel(rho.double(), w) * scale * g.double()
        if adaptive:
            e = e * w64.square()
        out.append(_kept_update(w64, w64 + e, m).to(w.dtype))
    return out


def _kept_update(old: Tensor, new: Tensor, mask: Optional[Tensor]) -> Tensor:
    return new if mask is None else torch.where(mask != 0, new, old)


def sgd_step(params: Sequence[Tensor], grads: Sequence[Tensor], momentum_buffers: Sequence[Tensor],
             masks: Sequence[Optional[Tensor]], lr: float, momentum: float, dampening: float,
             weight_decay: float, nesterov: bool, maximize: bool, first_step: bool) -> Tuple[List[Tensor], List[Tensor]]:
    """torch.optim.SGD's update, out of place, with pruned entries (weight and buffer) left as they are.

    Returns (new params, new momentum buffers); buffers are empty when momentum == 0.
    On the first step the buffer starts as the (decayed) gradient, as in torch.
    """
    new_params, new_buffers = [], []
    for i, (w, g, m) in enumerate(zip(params, grads, masks)):
        d = -g if maximize else g
        if weight_decay:
            d = d + weight_decay * w
        if momentum:
            buf = momentum_buffers[i]
            new_buf = d.clone() if first_step else buf * momentum + (1 - dampening) * d
            d = d + momentum * new_buf if nesterov else new_buf
            new_buffers.append(_kept_update(buf, new_buf, m))
        new_params.append(_kept_update(w, w - lr * d, m))
    return new_params, new_buffers


def sam_perturb_(out: Sequence[Tensor], params: Sequence[Tensor], grads: Sequence[Tensor],
                 masks: Sequence[Optional[Tensor]], rhos: Sequence[Tensor], sq_norm: Tensor, adaptive: bool,
                 eps: float) -> None:
    """In-place form of :func:`sam_perturb` (the op's signature)."""
    for o, value in zip(out, sam_perturb(params, grads, masks, rhos, sq_norm, adaptive, eps)):
        o.copy_(value)


def sgd_step_(params: Sequence[Tensor], grads: Sequence[Tensor], momentum_buffers: Sequence[Tensor],
              masks: Sequence[Optional[Tensor]], lr: float, momentum: float, dampening: float, weight_decay: float,
              nesterov: bool, maximize: bool, first_step: bool) -> None:
    """In-place form of :func:`sgd_step` (the op's signature)."""
    new_params, new_buffers = sgd_step(params, grads, momentum_buffers, masks, lr, momentum, dampening,
                                       weight_decay, nesterov, maximize, first_step)
    for p, value in zip(params, new_params):
        p.copy_(value)
    for b, value in zip(momentum_buffers, new_buffers):
        b.copy_(value)


# ---------------------------------------------------------------------------
# True sparse execution (DESIGN.md primitive 2): a weight kept as `values` at
# the entries of a CSR index (sparsesam/sparse/csr.py). The reference builds
# the dense weight from the CSR half only; the transposed index
# (ccol_indices, row_indices, csr_positions) is what the kernels use for dx
# and is checked against this definition, never used by it.


def _csr_dense(values: Tensor, crow_indices: Tensor, col_indices: Tensor, in_features: int) -> Tensor:
    """The dense weight: ``values`` at the CSR entries, zeros elsewhere."""
    out_features = crow_indices.numel() - 1
    rows = torch.repeat_interleave(torch.arange(out_features, device=values.device), crow_indices.diff().long())
    dense = values.new_zeros(out_features, in_features)
    dense[rows, col_indices.long()] = values
    return dense


def sparse_linear(x: Tensor, values: Tensor, crow_indices: Tensor, col_indices: Tensor, ccol_indices: Tensor,
                  row_indices: Tensor, csr_positions: Tensor, bias: Optional[Tensor] = None) -> Tensor:
    """y = x W^T + b over the last dimension of x, W the dense form of the CSR weight."""
    return F.linear(x, _csr_dense(values, crow_indices, col_indices, ccol_indices.numel() - 1), bias)


def sparse_linear_backward(grad_out: Tensor, x: Tensor, values: Tensor, crow_indices: Tensor, col_indices: Tensor,
                           ccol_indices: Tensor, row_indices: Tensor, csr_positions: Tensor,
                           output_mask: Sequence[bool]) -> Tuple[Tensor, Tensor]:
    """(dx, dvalues) of :func:`sparse_linear`: dvalues is dL/dW at the kept entries, in CSR order."""
    want_dx, want_dvalues = output_mask
    in_features = ccol_indices.numel() - 1
    dx = grad_out @ _csr_dense(values, crow_indices, col_indices, in_features) if want_dx else _empty_like_none(x)
    if want_dvalues:
        rows = torch.repeat_interleave(torch.arange(crow_indices.numel() - 1, device=values.device),
                                       crow_indices.diff().long())
        dvalues = (_rows(grad_out).t() @ _rows(x))[rows, col_indices.long()]
    else:
        dvalues = _empty_like_none(values)
    return dx, dvalues


def _conv_dense(values: Tensor, crow_indices: Tensor, col_indices: Tensor, in_channels: int,
                kernel_size: Sequence[int]) -> Tensor:
    """The dense 4-D conv weight of a CSR pattern over (out_channels, in_channels * kh * kw)."""
    kh, kw = kernel_size
    dense = _csr_dense(values, crow_indices, col_indices, in_channels * kh * kw)
    return dense.view(dense.shape[0], in_channels, kh, kw)


def sparse_conv2d(x: Tensor, values: Tensor, crow_indices: Tensor, col_indices: Tensor, ccol_indices: Tensor,
                  row_indices: Tensor, csr_positions: Tensor, bias: Optional[Tensor], kernel_size: Sequence[int],
                  stride: Sequence[int], padding: Sequence[int], dilation: Sequence[int]) -> Tensor:
    """F.conv2d with the dense form of the CSR weight (groups = 1)."""
    weight = _conv_dense(values, crow_indices, col_indices, x.shape[1], kernel_size)
    return F.conv2d(x, weight, bias, list(stride), list(padding), list(dilation))


def sparse_conv2d_backward(grad_out: Tensor, x: Tensor, values: Tensor, crow_indices: Tensor, col_indices: Tensor,
                           ccol_indices: Tensor, row_indices: Tensor, csr_positions: Tensor,
                           kernel_size: Sequence[int], stride: Sequence[int], padding: Sequence[int],
                           dilation: Sequence[int], output_mask: Sequence[bool]) -> Tuple[Tensor, Tensor]:
    """(dx, dvalues) of :func:`sparse_conv2d`: dvalues is dL/dW at the kept entries, in CSR order."""
    want_dx, want_dvalues = output_mask
    weight = _conv_dense(values, crow_indices, col_indices, x.shape[1], kernel_size)
    args = (list(stride), list(padding), list(dilation))
    dx = (torch.nn.grad.conv2d_input(tuple(x.shape), weight, grad_out, *args) if want_dx
          else _empty_like_none(x))
    if want_dvalues:
        dweight = torch.nn.grad.conv2d_weight(x, tuple(weight.shape), grad_out, *args).flatten(1)
        rows = torch.repeat_interleave(torch.arange(crow_indices.numel() - 1, device=values.device),
                                       crow_indices.diff().long())
        dvalues = dweight[rows, col_indices.long()]
    else:
        dvalues = _empty_like_none(values)
    return dx, dvalues
