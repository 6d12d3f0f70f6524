"""Mask-perturbation scoring: three multi-tensor ops over the masked layers.

Every op reads, per layer, G = dL/d(W*M) (``grads``) and W (``weights``) and
works on the mask gradient ``dM = G*W`` -- or on ``dM = grads[i]`` itself
where ``weights[i]`` is None (``weights=None``: for every layer), e.g. a soft
mask's ``.grad``. One pass over G, W and the op's mask or scores each:

* ``mask_grad_sq_norm``: ``sum ||dM||^2`` over all layers (C-SAM's global
  norm), float64, deterministic to the bit;
* ``mask_ascent_``: C-SAM's ascent ``clip(M + rho * dM / ||dM||, 0, 1)`` into
  persistent buffers;
* ``mask_score_grad``: HARP's straight-through gradients, ``sign(s) * dM``
  for the scores and ``sum(dM)`` per layer for the keep rates.

The math and the why are in ``sparsesam.reference``. These ops post-process
gradients (the algorithms call them under ``torch.no_grad()``), so they have
no autograd of their own.
"""
from __future__ import annotations

import math
from typing import List, Optional, Sequence, Tuple

import torch

from . import _checks

Tensor = torch.Tensor
WeightList = Optional[Sequence[Optional[Tensor]]]


def _check_grads(grads: Sequence[Tensor], weights: WeightList) -> List[Optional[Tensor]]:
    """grads: floating tensors on one device; weights: None, or one entry (None or G's partner) per grad."""
    if isinstance(grads, Tensor):
        raise TypeError("grads must be a sequence of tensors (one per layer), got a single tensor")
    for i, g in enumerate(grads):
        _checks.tensor(f"grads[{i}]", g)
        if g.device != grads[0].device:
            raise ValueError(f"grads[{i}] is on {g.device} but grads[0] is on {grads[0].device}: one call, one device")
    if weights is None:
        return [None] * len(grads)
    if isinstance(weights, Tensor):
        raise TypeError("weights must be a sequence (one entry per layer, None allowed) or None")
    if len(weights) != len(grads):
        raise ValueError(f"weights has {len(weights)} entries but grads has {len(grads)}")
    for i, (g, w) in enumerate(zip(grads, weights)):
        if w is not None:
            _partner(f"weights[{i}]", w, f"grads[{i}]", g)
    return list(weights)


def _partner(name: str, t, ref_name: str, ref: Tensor) -> None:
    """t must match ref in shape, dtype and device."""
    _checks.tensor(name, t)
    if t.dtype != ref.dtype:
        raise TypeError(f"{name} dtype {t.dtype} differs from {ref_name} dtype {ref.dtype}")
    if t.shape != ref.shape or t.device != ref.device:
        raise ValueError(f"{name} has shape {tuple(t.shape)} on {t.device}, {ref_name} has {tuple(ref.shape)} on {ref.device}")


def _check_list(name: str, values: Sequence, grads: Sequence[Tensor]) -> None:
    if isinstance(values, Tensor):
        raise TypeError(f"{name} must be a sequence of tensors (one per layer), got a single tensor")
    if len(values) != len(grads):
        raise ValueError(f"{name} has {len(values)} entries but grads has {len(grads)}")


def _contiguous(tensors: Sequence[Optional[Tensor]]) -> List[Optional[Tensor]]:
    return [t.contiguous() if t is not None else None for t in tensors]


def mask_grad_sq_norm(grads: Sequence[Tensor], weights: WeightList = None) -> Tensor:
    """``sum over layers of ||G*W||^2`` (``||G||^2`` where the weight is None): float64, 0-d, deterministic."""
    weights = _check_grads(grads, weights)
    if not len(grads):
        return torch.zeros((), dtype=torch.float64)  # no tensor to dispatch on: the empty sum, here
    return torch.ops.sparsesam.mask_grad_sq_norm.default(_contiguous(grads), _contiguous(weights))


def mask_ascent_(out: Sequence[Tensor], grads: Sequence[Tensor], weights: WeightList, masks: Sequence[Tensor],
                 sq_norm: Tensor, rho: float, eps: float = 1e-12) -> None:
    """``out[i] = clip(M_i + rho * dM_i / (sqrt(sq_norm) + eps), 0, 1)``: C-SAM's ascent point in mask space.

    masks: soft masks in the gradients' dtype; out: buffers like them
    (contiguous, not overlapping the inputs). sq_norm: from
    :func:`mask_grad_sq_norm` (read on the device: no host sync on GPU).
    """
    weights = _check_grads(grads, weights)
    _check_list("masks", masks, grads)
    _check_list("out", out, grads)
    for i, g in enumerate(grads):
        _partner(f"masks[{i}]", masks[i], f"grads[{i}]", g)
        _partner(f"out[{i}]", out[i], f"grads[{i}]", g)
        if not out[i].is_contiguous():
            raise ValueError(f"out[{i}] must be contiguous (the op writes it as flat memory)")
    if not isinstance(sq_norm, Tensor) or sq_norm.dim() != 0 or not sq_norm.is_floating_point():
        raise TypeError("sq_norm must be a floating 0-d tensor (from mask_grad_sq_norm)")
    if isinstance(rho, bool) or not isinstance(rho, (int, float)) or not math.isfinite(rho) or rho < 0:
        raise ValueError(f"rho must be a finite number >= 0, got {rho!r}")
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not math.isfinite(eps) or eps < 0:
        raise ValueError(f"eps must be a finite number >= 0, got {eps!r}")
    if not len(grads):
        return
    torch.ops.sparsesam.mask_ascent_.default(
        list(out), _contiguous(grads), _contiguous(weights), _contiguous(masks), sq_norm, float(rho), float(eps)
    )


def mask_score_grad(grads: Sequence[Tensor], weights: WeightList, scores: Sequence[Tensor]) -> Tuple[List[Tensor], Tensor]:
    """HARP's straight-through gradients: (``sign(s_i) * dM_i`` per layer, ``sum(dM_i)`` per layer as float64).

    The second is dL/dr_l for HARP's keep rate r_l; the chain through
    ``k_l = sigmoid(p_l) * (1 - k_min) + k_min`` is the caller's.
    """
    weights = _check_grads(grads, weights)
    _check_list("scores", scores, grads)
    for i, g in enumerate(grads):
        _partner(f"scores[{i}]", scores[i], f"grads[{i}]", g)
    if not len(grads):
        return [], torch.zeros(0, dtype=torch.float64)
    score_grads, rate_grads = torch.ops.sparsesam.mask_score_grad.default(
        _contiguous(grads), _contiguous(weights), _contiguous(scores)
    )
    return list(score_grads), rate_grads


@torch.library.register_fake("sparsesam::mask_grad_sq_norm")
def _mask_grad_sq_norm_fake(grads, weights):
    device = grads[0].device if len(grads) else torch.device("cpu")
    return torch.empty((), dtype=torch.float64, device=device)


@torch.library.register_fake("sparsesam::mask_ascent_")
def _mask_ascent_fake(out, grads, weights, masks, sq_norm, rho, eps):
    return None


@torch.library.register_fake("sparsesam::mask_score_grad")
def _mask_score_grad_fake(grads, weights, scores):
    device = grads[0].device if len(grads) else torch.device("cpu")
    score_grads = [torch.empty(s.shape, dtype=s.dtype, device=s.device) for s in scores]
    return score_grads, torch.empty((len(grads),), dtype=torch.float64, device=device)


__all__: List[str] = ["mask_grad_sq_norm", "mask_ascent_", "mask_score_grad"]
