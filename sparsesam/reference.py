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
# Mask-perturbation scoring (DESIGN.md primitive 4). Multi-tensor ops over
# the masked layers of a model. For layer i, grads[i] is the effective
# weight's gradient G = dL/d(W*M) -- what a masked layer's backward holds --
# and weights[i] is W. Everything here is a function of the *mask gradient*
#
#     dM = dL/dM = G * W,
#
# because the loss sees the mask only through W*M. Where weights[i] is None,
# grads[i] is taken to be dM itself (e.g. the .grad of a soft-mask
# parameter, which the masked layers' backward already computed as G*W).
# All arithmetic is float64; outputs are rounded once.


def _mask_grad(grad: Tensor, weight: Optional[Tensor]) -> Tensor:
    """dM = G*W in float64 (or G itself when weight is None)."""
    return grad.double() if weight is None else grad.double() * weight.double()


def _weights_or_none(weights: Optional[Sequence[Optional[Tensor]]], n: int) -> List[Optional[Tensor]]:
    return [None] * n if weights is None else list(weights)


def mask_grad_sq_norm(grads: Sequence[Tensor], weights: Optional[Sequence[Optional[Tensor]]]) -> Tensor:
    """``||dM||^2`` summed over every layer: C-SAM's global normaliser, a float64 0-d tensor.

    The mask-space ascent moves all layers' masks together along the steepest
    direction of the loss, so, as in SAM, the step is normalised by the norm
    of the whole model's mask gradient, not per layer. The kernels reduce in
    a fixed order (bits independent of the thread count); with every weight
    given this equals ``sam_grad_sq_norm(grads, weights, None, adaptive=True)``.
    """
    weights = _weights_or_none(weights, len(grads))
    total = torch.zeros((), dtype=torch.float64, device=grads[0].device if len(grads) else "cpu")
    for g, w in zip(grads, weights):
        total = total + _mask_grad(g, w).square().sum()
    return total


def _clip01(v: Tensor) -> Tensor:
    """clip(v, 0, 1) with NaN propagated (as torch.clamp) and every v <= 0 sent to +0.0.

    Sending -0.0 to +0.0 too makes clipping commute with rounding (both are
    monotone, and 0 and 1 are exact in every dtype), so a kernel may clip
    after rounding -- in the narrow type, where it vectorises -- and still
    give these bits.
    """
    return torch.where(v <= 0, torch.zeros_like(v), torch.where(v >= 1, torch.ones_like(v), v))


def mask_ascent(grads: Sequence[Tensor], weights: Optional[Sequence[Optional[Tensor]]], masks: Sequence[Tensor],
                sq_norm: Tensor, rho: float, eps: float) -> List[Tensor]:
    """C-SAM's ascent point in mask space: ``M' = clip(M + rho * dM / (||dM|| + eps), 0, 1)``.

    C-SAM perturbs the (soft, [0, 1]) pruning mask rather than the weights:
    to first order the worst mask within an L2 ball of radius rho around M
    is M + rho * dM / ||dM|| (SAM's argument, in mask space), with ||dM|| the
    global norm of :func:`mask_grad_sq_norm`. Clipping keeps it a valid
    mask. The loss gradient at M' is then applied to M (the descent), so M'
    is written to separate buffers. Computed in float64 as
    ``M + (rho * scale) * dM``, ``scale = 1 / (sqrt(sq_norm) + eps)``, and
    rounded once to the mask's dtype.
    """
    weights = _weights_or_none(weights, len(grads))
    scale = 1.0 / (sq_norm.double().sqrt() + eps)
    coef = rho * scale
    return [_clip01(m.double() + coef * _mask_grad(g, w)).to(m.dtype) for g, w, m in zip(grads, weights, masks)]


def mask_ascent_(out: Sequence[Tensor], grads: Sequence[Tensor], weights: Optional[Sequence[Optional[Tensor]]],
                 masks: Sequence[Tensor], sq_norm: Tensor, rho: float, eps: float) -> None:
    """In-place form of :func:`mask_ascent` (the op's signature)."""
    for o, value in zip(out, mask_ascent(grads, weights, masks, sq_norm, rho, eps)):
        o.copy_(value)


def mask_score_grad(grads: Sequence[Tensor], weights: Optional[Sequence[Optional[Tensor]]],
                    scores: Sequence[Tensor]) -> Tuple[List[Tensor], Tensor]:
    """HARP's straight-through gradients of the scores and of the per-layer keep rates.

    HARP (Zhao & Wressnegger, ICLR 2023; github.com/intellisec/harp,
    models/layers.py) keeps in layer l the top-k_l fraction of |s| (s: a
    score per weight, k_l = sigmoid(p_l) * (1 - k_min) + k_min). The mask is
    a step function of both, so its ``GetSubnet.backward`` passes the mask
    gradient straight through: to |s| as dM itself (hence to s as
    ``sign(s) * dM``, torch's abs backward, sign(0) = 0), and to the rate as
    ``g_r = torch.sum(g)``, i.e. ``dL/dk_l = sum(dM_l)`` over *all* entries
    of the layer, kept and pruned -- the rate acts on every entry's chance to
    be kept. The chain through the sigmoid (and HARP's hardware loss) is
    scalar work left to the caller.

    Returns (score gradients in each score's dtype, rate gradients: float64,
    one per layer).
    """
    weights = _weights_or_none(weights, len(grads))
    score_grads, rates = [], []
    for g, w, s in zip(grads, weights, scores):
        dm = _mask_grad(g, w)
        score_grads.append((torch.sign(s.double()) * dm).to(s.dtype))
        rates.append(dm.sum())
    device = grads[0].device if len(grads) else "cpu"
    return score_grads, torch.stack(rates) if rates else torch.zeros(0, dtype=torch.float64, device=device)
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


def csr_linear(x: Tensor, values: Tensor, crow_indices: Tensor, col_indices: Tensor, ccol_indices: Tensor,
                  row_indices: Tensor, csr_positions: Tensor, bias: Optional[Tensor] = None) -> Tensor:
    """y = x W^T + b over the last dimension of x, W the dense form of the CSR weight."""
    return F.linear(x, _csr_dense(values, crow_indices, col_indices, ccol_indices.numel() - 1), bias)


def csr_linear_backward(grad_out: Tensor, x: Tensor, values: Tensor, crow_indices: Tensor, col_indices: Tensor,
                           ccol_indices: Tensor, row_indices: Tensor, csr_positions: Tensor,
                           output_mask: Sequence[bool]) -> Tuple[Tensor, Tensor]:
    """(dx, dvalues) of :func:`csr_linear`: dvalues is dL/dW at the kept entries, in CSR order."""
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


# Block-sparse execution: a weight kept as `values` (nblocks, bh, bw) at the
# blocks of a BSR index (sparsesam/sparse/bsr.py). As for CSR, the reference
# builds the dense weight from the BSR half only; the transposed block index
# (ccol_indices, row_indices, bsr_positions) is what the kernels use for dx.


def _bsr_dense(values: Tensor, crow_indices: Tensor, col_indices: Tensor, in_features: int) -> Tensor:
    """The dense weight: the blocks ``values`` at the BSR block positions, zeros elsewhere."""
    _, bh, bw = values.shape
    block_rows, block_cols = crow_indices.numel() - 1, in_features // bw
    rows = torch.repeat_interleave(torch.arange(block_rows, device=values.device), crow_indices.diff().long())
    dense = values.new_zeros(block_rows, block_cols, bh, bw)
    dense[rows, col_indices.long()] = values
    return dense.permute(0, 2, 1, 3).reshape(block_rows * bh, in_features)


def bsr_linear(x: Tensor, values: Tensor, crow_indices: Tensor, col_indices: Tensor, ccol_indices: Tensor,
               row_indices: Tensor, bsr_positions: Tensor, bias: Optional[Tensor] = None) -> Tensor:
    """y = x W^T + b over the last dimension of x, W the dense form of the BSR weight."""
    in_features = (ccol_indices.numel() - 1) * values.shape[2]
    return F.linear(x, _bsr_dense(values, crow_indices, col_indices, in_features), bias)


def bsr_linear_backward(grad_out: Tensor, x: Tensor, values: Tensor, crow_indices: Tensor, col_indices: Tensor,
                        ccol_indices: Tensor, row_indices: Tensor, bsr_positions: Tensor,
                        output_mask: Sequence[bool]) -> Tuple[Tensor, Tensor]:
    """(dx, dvalues) of :func:`bsr_linear`: dvalues is dL/dW at the kept blocks, (nblocks, bh, bw) in BSR order."""
    want_dx, want_dvalues = output_mask
    _, bh, bw = values.shape
    block_rows, block_cols = crow_indices.numel() - 1, ccol_indices.numel() - 1
    in_features = block_cols * bw
    dx = grad_out @ _bsr_dense(values, crow_indices, col_indices, in_features) if want_dx else _empty_like_none(x)
    if want_dvalues:
        dweight = _rows(grad_out).t() @ _rows(x)
        blocks = dweight.reshape(block_rows, bh, block_cols, bw).permute(0, 2, 1, 3)
        rows = torch.repeat_interleave(torch.arange(block_rows, device=values.device), crow_indices.diff().long())
        dvalues = blocks[rows, col_indices.long()].contiguous()
    else:
        dvalues = _empty_like_none(values)
    return dx, dvalues


# --- nm_linear: an N:M weight (sparsesam/sparse/nm.py) -------------------------------


def _nm_dense(values: Tensor, indices: Tensor, n: int, m: int) -> Tensor:
    """The dense (out_features, in_features) weight of N:M values; duplicate positions would add up."""
    out_features, groups = values.shape[0], values.shape[1] // n
    dense = values.new_zeros(out_features, groups, m)
    dense.scatter_add_(-1, indices.long().view(out_features, groups, n), values.reshape(out_features, groups, n))
    return dense.view(out_features, groups * m)


def nm_linear(x: Tensor, values: Tensor, indices: Tensor, n: int, m: int, bias: Optional[Tensor] = None) -> Tensor:
    """y = x W^T + b over the last dimension of x, W the dense form of the N:M weight."""
    return F.linear(x, _nm_dense(values, indices, n, m), bias)


def nm_linear_backward(grad_out: Tensor, x: Tensor, values: Tensor, indices: Tensor, n: int, m: int,
                       output_mask: Sequence[bool]) -> Tuple[Tensor, Tensor]:
    """(dx, dvalues) of :func:`nm_linear`: dvalues is dL/dW at the kept entries, in the values' layout."""
    want_dx, want_dvalues = output_mask
    dx = grad_out @ _nm_dense(values, indices, n, m) if want_dx else _empty_like_none(x)
    if want_dvalues:
        out_features, groups = values.shape[0], values.shape[1] // n
        dweight = (_rows(grad_out).t() @ _rows(x)).view(out_features, groups, m)
        dvalues = dweight.gather(-1, indices.long().view(out_features, groups, n)).reshape(values.shape)
    else:
        dvalues = _empty_like_none(values)
    return dx, dvalues
