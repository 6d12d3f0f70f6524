"""The fused SAM step: three multi-tensor ops, one call each over every parameter.

* ``sam_grad_sq_norm``: the global squared gradient norm (of ``|w|*g`` for
  ASAM), pruned entries excluded; deterministic to the bit.
* ``sam_perturb_``: writes the ascent point ``w + e`` into persistent
  buffers (the optimizer swaps them in, so the weights are never modified
  and never need restoring).
* ``sgd_step_``: torch.optim.SGD's update in one pass, pruned entries frozen.

They run under ``torch.no_grad()`` inside the optimizer: no autograd.

Each face checks its arguments in Python (errors name the argument) unless
called with ``check_args=False``: the SAM optimizer and FusedMaskedSGD build
these lists from their own parameters on every step, check rho and the SGD
settings when they are set, and would pay more for the per-tensor Python
checks than for the fused pass itself. The kernels check every tensor's
dtype, shape and device either way.
"""
from __future__ import annotations

import math
import numbers
from typing import List, Optional, Sequence

import torch

from . import _checks

Tensor = torch.Tensor
MaskList = Sequence[Optional[Tensor]]


def _check_lists(params: Sequence[Tensor], grads: Sequence[Tensor], masks: MaskList, names=("params", "grads")) -> None:
    if len(params) != len(grads) or len(params) != len(masks):
        raise ValueError(f"{names[0]}, {names[1]} and masks must have one entry per parameter, "
                         f"got {len(params)}, {len(grads)} and {len(masks)}")
    for i, (p, g, m) in enumerate(zip(params, grads, masks)):
        _checks.tensor(f"{names[0]}[{i}]", p)
        _checks.tensor(f"{names[1]}[{i}]", g)
        if g.shape != p.shape or g.dtype != p.dtype or g.device != p.device:
            raise ValueError(f"{names[1]}[{i}] must match {names[0]}[{i}] in shape, dtype and device "
                             f"({tuple(g.shape)} {g.dtype} {g.device} vs {tuple(p.shape)} {p.dtype} {p.device})")
        if m is not None:
            if not isinstance(m, torch.Tensor):
                raise TypeError(f"masks[{i}] must be a tensor or None, got {type(m).__name__}")
            if not (m.dtype in (torch.bool, torch.uint8, torch.int8) or m.is_floating_point()):
                raise TypeError(f"masks[{i}] must be bool, uint8, int8 or floating, got {m.dtype}")
            if m.shape != p.shape or m.device != p.device:
                raise ValueError(f"masks[{i}] has shape {tuple(m.shape)} on {m.device}, "
                                 f"{names[0]}[{i}] has {tuple(p.shape)} on {p.device}")


def _finite_scalar(name: str, value, *, non_negative: bool = True) -> float:
    """A finite Python number (>= 0 unless told): a NaN or infinite lr or eps
    would silently turn every parameter, or the ascent point, into NaN."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    value = float(value)
    if not math.isfinite(value) or (non_negative and value < 0):
        raise ValueError(f"{name} must be finite{' and >= 0' if non_negative else ''}, got {value}")
    return value


def _check_rho_values(rhos: Sequence[Tensor]) -> None:
    """Every rho finite and >= 0 (a negative rho steps downhill, a NaN one poisons the ascent point).

    A data-dependent check, so only on CPU (one read, no device sync) and not
    while torch.compile traces; on accelerators the SAM optimizer checks rho
    when it is set (as ops/_checks.mask does for masks).
    """
    if torch.compiler.is_compiling():
        return
    for i, rho in enumerate(rhos):
        if rho.device.type == "cpu" and rho.numel() and not bool(((rho >= 0) & torch.isfinite(rho)).all()):
            raise ValueError(f"rhos[{i}] must be finite and >= 0, got {rho.tolist()}")


def _contiguous(name: str, tensors: Sequence[Tensor]) -> None:
    for i, t in enumerate(tensors):
        if t is not None and not t.is_contiguous():
            raise ValueError(f"{name}[{i}] must be contiguous (the op writes or reads it as flat memory)")


def sam_grad_sq_norm(grads: Sequence[Tensor], weights: Sequence[Tensor], masks: MaskList, adaptive: bool = False, *,
                     check_args: bool = True) -> Tensor:
    """Sum over all tensors of ``(s*g)^2`` at kept entries (``s = |w|`` if adaptive, else 1), float64, 0-d."""
    if check_args and (adaptive or len(weights)):
        _check_lists(weights, grads, masks, names=("weights", "grads"))
    elif check_args:
        _check_lists(grads, grads, masks, names=("grads", "grads"))
    if not len(grads):
        # No tensor to dispatch on: the empty sum, here.
        return torch.zeros((), dtype=torch.float64)
    grads = [g.contiguous() for g in grads]
    weights = [w.contiguous() for w in weights] if adaptive else list(weights)
    masks = [m.contiguous() if m is not None else None for m in masks]
    return torch.ops.sparsesam.sam_grad_sq_norm.default(grads, weights, masks, bool(adaptive))


def sam_perturb_(out: Sequence[Tensor], params: Sequence[Tensor], grads: Sequence[Tensor], masks: MaskList,
                 rhos: Sequence[Tensor], sq_norm: Tensor, adaptive: bool = False, eps: float = 1e-12, *,
                 check_args: bool = True) -> None:
    """``out[i] = w + rho * s^2 * g / (sqrt(sq_norm) + eps)`` at kept entries, ``w`` at pruned ones."""
    if check_args:
        _check_perturb_args(out, params, grads, masks, rhos, sq_norm, eps)
    torch.ops.sparsesam.sam_perturb_.default(
        list(out), list(params), [g.contiguous() for g in grads], [m.contiguous() if m is not None else None for m in masks],
        list(rhos), sq_norm, bool(adaptive), float(eps),
    )


def _check_perturb_args(out, params, grads, masks, rhos, sq_norm, eps) -> None:
    _check_lists(params, grads, masks)
    _check_lists(params, out, masks, names=("params", "out"))
    if len(rhos) != len(params):
        raise ValueError(f"rhos must have one entry per parameter, got {len(rhos)} for {len(params)}")
    for i, (p, rho) in enumerate(zip(params, rhos)):
        if not isinstance(rho, torch.Tensor) or not rho.is_floating_point():
            raise TypeError(f"rhos[{i}] must be a floating tensor")
        if rho.dim() not in (0, 1) or (rho.dim() == 1 and (p.dim() == 0 or rho.numel() != p.shape[0])):
            raise ValueError(f"rhos[{i}] must be 0-d or hold one value per output channel "
                             f"({p.shape[0] if p.dim() else 1}), got shape {tuple(rho.shape)}")
        if rho.device != p.device:
            raise ValueError(f"rhos[{i}] is on {rho.device} but params[{i}] is on {p.device}")
    _check_rho_values(rhos)
    if not isinstance(sq_norm, torch.Tensor) or sq_norm.dim() != 0:
        raise TypeError("sq_norm must be a 0-d tensor (from sam_grad_sq_norm)")
    _finite_scalar("eps", eps)
    _contiguous("out", out)
    _contiguous("params", params)


def sgd_step_(params: Sequence[Tensor], grads: Sequence[Tensor], momentum_buffers: Sequence[Tensor], masks: MaskList, *,
              lr: float, momentum: float = 0.0, dampening: float = 0.0, weight_decay: float = 0.0,
              nesterov: bool = False, maximize: bool = False, first_step: bool = False,
              check_args: bool = True) -> None:
    """torch.optim.SGD's update in place, in one pass per element; pruned entries (weight and buffer) frozen."""
    if check_args:
        _check_sgd_args(params, grads, momentum_buffers, masks, lr, momentum, dampening, weight_decay, nesterov)
    if not len(params):
        return
    torch.ops.sparsesam.sgd_step_.default(
        list(params), [g.contiguous() for g in grads], list(momentum_buffers),
        [m.contiguous() if m is not None else None for m in masks],
        float(lr), float(momentum), float(dampening), float(weight_decay), bool(nesterov), bool(maximize), bool(first_step),
    )


def _check_sgd_args(params, grads, momentum_buffers, masks, lr, momentum, dampening, weight_decay, nesterov) -> None:
    _check_lists(params, grads, masks)
    lr = _finite_scalar("lr", lr)
    momentum = _finite_scalar("momentum", momentum)
    dampening = _finite_scalar("dampening", dampening, non_negative=False)
    weight_decay = _finite_scalar("weight_decay", weight_decay)
    if momentum:
        _check_lists(params, momentum_buffers, masks, names=("params", "momentum_buffers"))
        _contiguous("momentum_buffers", momentum_buffers)
    elif len(momentum_buffers):
        raise ValueError("momentum_buffers must be empty when momentum == 0")
    if nesterov and (momentum <= 0 or dampening != 0):
        raise ValueError("nesterov needs momentum > 0 and dampening == 0 (as in torch.optim.SGD)")
    _contiguous("params", params)


@torch.library.register_fake("sparsesam::sam_grad_sq_norm")
def _sam_grad_sq_norm_fake(grads, weights, masks, adaptive):
    device = grads[0].device if len(grads) else torch.device("cpu")
    return torch.empty((), dtype=torch.float64, device=device)


@torch.library.register_fake("sparsesam::sam_perturb_")
def _sam_perturb_fake(out, params, grads, masks, rhos, sq_norm, adaptive, eps):
    return None


@torch.library.register_fake("sparsesam::sgd_step_")
def _sgd_step_fake(params, grads, momentum_buffers, masks, lr, momentum, dampening, weight_decay, nesterov, maximize, first_step):
    return None


__all__: List[str] = ["sam_grad_sq_norm", "sam_perturb_", "sgd_step_"]
