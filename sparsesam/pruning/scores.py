"""Score-based masks with a straight-through estimator (HYDRA; HARP's connection scores).

Each masked layer gets a score tensor s of the weight's shape; its mask is
the top ``keep_rate`` fraction of |s| (unstructured), of whole output
channels ranked by ``sum |s|`` over the channel (channel), or the top ``n``
of every ``m`` inputs (N:M). Forward uses that binary mask; backward sends
the mask's gradient straight through to |s| (HYDRA's ``GetSubnet``), so with
the masked layer's ``dL/dM = G*W`` the scores get ``sign(s) * G * W``.

The scores *are* the layer's trainable mask parameter: attach_scores() puts
a ScoreMask on ``weight_mask`` with torch.nn.utils.parametrize, so
``layer.weight_mask`` reads the binary mask, the scores live in
``layer.parametrizations.weight_mask.original`` and no extra weight-sized
tensor exists. The layers need ``mask_mode="trainable"``
(``sparsify(model, mask_mode="trainable")``). freeze_scores() turns the
current binary masks back into ordinary masks for fine-tuning.

The rate may be a float, a 0-dim tensor, an nn.Parameter or an nn.Module
returning the rate (HARP's learnable ``sigmoid(p) * (1 - r_min) + r_min``):
a rate that requires grad receives ``sum(dL/dM)``, HARP's straight-through
rate gradient (the mask's total gradient says whether keeping more helps).
"""
from __future__ import annotations

import math
from typing import Dict, List, Mapping, Optional, Union

import torch
from torch import nn
from torch.nn.utils import parametrize

from ..nn.sparsify import Selector
from ._common import check_choice, check_nm, prunable_layers
from .nm import nm_mask

GRANULARITIES = ("unstructured", "channel", "nm")
SCORE_INITS = ("hydra", "kaiming_uniform")
Rate = Union[float, torch.Tensor, nn.Module]


def hydra_score_init(weight: torch.Tensor) -> torch.Tensor:
    """HYDRA's scaled score init: ``sqrt(6 / fan_in) * w / max|w|``, the range of Kaiming-uniform, ordered like |w|."""
    fan_in = weight[0].numel()
    peak = weight.detach().abs().max()
    if peak == 0:
        raise ValueError("weight is all zero: its magnitude cannot initialise scores")
    return math.sqrt(6.0 / fan_in) * weight.detach() / peak


def _kept_count(rate: float, total: int) -> int:
    return min(total, max(1, round(rate * total)))


def topk_mask(abs_scores: torch.Tensor, keep_rate: float, granularity: str = "unstructured",
              n: int = 2, m: int = 4) -> torch.Tensor:
    """The binary mask (the scores' dtype) that score_mask's forward produces; no gradient."""
    check_choice("granularity", granularity, GRANULARITIES)
    if granularity == "nm":
        return nm_mask(abs_scores, n, m).to(abs_scores.dtype)
    if granularity == "channel":
        per_channel = abs_scores.reshape(abs_scores.shape[0], -1).sum(dim=1)
        keep = torch.zeros_like(per_channel, dtype=torch.bool)
        keep[torch.topk(per_channel, _kept_count(keep_rate, per_channel.numel())).indices] = True
        return keep.view(-1, *([1] * (abs_scores.dim() - 1))).expand_as(abs_scores).to(abs_scores.dtype)
    flat = abs_scores.reshape(-1)
    mask = torch.zeros_like(flat)
    mask[torch.topk(flat, _kept_count(keep_rate, flat.numel())).indices] = 1
    return mask.view_as(abs_scores)


class TopKStraightThrough(torch.autograd.Function):
    """Forward: topk_mask(|s|). Backward: the gradient passes straight through to |s|; the rate gets its sum."""

    @staticmethod
    def forward(abs_scores, keep_rate, granularity, n, m):
        rate = float(keep_rate) if granularity != "nm" else 1.0
        return topk_mask(abs_scores, rate, granularity, n, m)

    @staticmethod
    def setup_context(ctx, inputs, output):
        keep_rate = inputs[1]
        ctx.rate_like = keep_rate if isinstance(keep_rate, torch.Tensor) else None

    @staticmethod
    def backward(ctx, grad):
        grad_rate = None
        if ctx.needs_input_grad[1]:
            grad_rate = grad.sum().to(ctx.rate_like.dtype).reshape(ctx.rate_like.shape)
        return grad, grad_rate, None, None, None


def _check_rate_value(rate) -> None:
    value = float(rate.detach()) if isinstance(rate, torch.Tensor) else float(rate)
    if not 0.0 < value <= 1.0:
        raise ValueError(f"keep_rate must be in (0, 1], got {value}")


def score_mask(scores: torch.Tensor, keep_rate: Union[float, torch.Tensor, None] = None,
               granularity: str = "unstructured", n: int = 2, m: int = 4) -> torch.Tensor:
    """Binary mask from ``scores`` (top ``keep_rate`` of |s|, or N:M), differentiable by straight-through."""
    check_choice("granularity", granularity, GRANULARITIES)
    if not isinstance(scores, torch.Tensor) or not scores.is_floating_point():
        raise TypeError("scores must be a floating torch.Tensor")
    if granularity == "nm":
        check_nm(n, m)
        if keep_rate is not None:
            raise ValueError(f"keep_rate must be None for granularity='nm' (the rate is n/m = {n}/{m})")
    else:
        if keep_rate is None:
            raise ValueError(f"keep_rate is required for granularity={granularity!r}")
        if isinstance(keep_rate, torch.Tensor) and keep_rate.numel() != 1:
            raise ValueError(f"keep_rate must be a number or a one-element tensor, got shape {tuple(keep_rate.shape)}")
        _check_rate_value(keep_rate)
    return TopKStraightThrough.apply(scores.abs(), keep_rate, granularity, n, m)


class ScoreMask(nn.Module):
    """The parametrization ``scores -> binary mask`` that attach_scores() puts on ``weight_mask``.

    Subclass and override keep_rate() for a rate computed another way.
    """

    def __init__(self, keep_rate: Optional[Rate], granularity: str = "unstructured", n: int = 2, m: int = 4) -> None:
        super().__init__()
        self.granularity = check_choice("granularity", granularity, GRANULARITIES)
        self.n, self.m = check_nm(n, m) if granularity == "nm" else (n, m)
        if granularity == "nm":
            if keep_rate is not None:
                raise ValueError(f"keep_rate must be None for granularity='nm' (the rate is n/m = {n}/{m})")
        elif keep_rate is None:
            raise ValueError(f"keep_rate is required for granularity={granularity!r}")
        elif isinstance(keep_rate, nn.Module):
            self.rate = keep_rate  # a submodule: its parameters belong to the model
        elif isinstance(keep_rate, torch.Tensor):
            _check_rate_value(keep_rate)
            if isinstance(keep_rate, nn.Parameter):
                self.rate = keep_rate
            else:
                self.register_buffer("rate", keep_rate.detach().clone())
        else:
            if isinstance(keep_rate, bool) or not isinstance(keep_rate, (int, float)):
                raise TypeError(f"keep_rate must be a float, a tensor or an nn.Module, got {type(keep_rate).__name__}")
            _check_rate_value(keep_rate)
            self.rate = float(keep_rate)
        if granularity == "nm":
            self.rate = None

    def keep_rate(self) -> Union[float, torch.Tensor, None]:
        """The fraction of weights (or channels) kept now."""
        return self.rate() if isinstance(self.rate, nn.Module) else self.rate

    def forward(self, scores: torch.Tensor) -> torch.Tensor:
        return score_mask(scores, self.keep_rate(), self.granularity, self.n, self.m)

    def extra_repr(self) -> str:
        rate = "n/m" if self.granularity == "nm" else ("learned" if not isinstance(self.rate, float) else self.rate)
        return f"granularity={self.granularity}, keep_rate={rate}" + (f", n={self.n}, m={self.m}" if self.granularity == "nm" else "")


def _is_scored(layer: nn.Module) -> bool:
    return parametrize.is_parametrized(layer, "weight_mask") and any(
        isinstance(p, ScoreMask) for p in layer.parametrizations.weight_mask)


@torch.no_grad()
def attach_scores(model: nn.Module, keep_rate: Union[Rate, Mapping[str, Rate], None] = None,
                  granularity: str = "unstructured", n: int = 2, m: int = 4, init: str = "hydra",
                  include: Selector = None, exclude: Selector = None,
                  keep_output_layer: Optional[bool] = None) -> Dict[str, ScoreMask]:
    """Make the selected layers' masks ``topk(|scores|)``; returns {layer name: its ScoreMask}.

    keep_rate: the fraction kept, one for all layers or {layer name: rate}
    (each a float, a tensor / nn.Parameter, or an nn.Module computing it);
    None for granularity="nm". init="hydra" starts the scores at
    hydra_score_init(weight) (so the first mask is the magnitude mask);
    "kaiming_uniform" is HYDRA's random start. Layers must have
    mask_mode="trainable". For granularity="nm", layers whose input
    dimension is not a multiple of m are left dense. keep_output_layer
    (default: only for granularity="channel", whose masks would remove
    classes) leaves the classifier without scores.
    """
    check_choice("granularity", granularity, GRANULARITIES)
    check_choice("init", init, SCORE_INITS)
    if keep_output_layer is None:
        keep_output_layer = granularity == "channel"
    # Check everything first, then change the model: a bad argument leaves it as it was.
    planned = []
    for name, layer in prunable_layers(model, include, exclude, keep_output_layer):
        if _is_scored(layer):
            raise ValueError(f"layer {name!r} already has scores (call freeze_scores first)")
        if layer.mask_mode != "trainable":
            raise ValueError(f"layer {name!r} has mask_mode={layer.mask_mode!r}: scores need "
                             "sparsify(model, mask_mode='trainable')")
        if granularity == "nm" and layer.weight.shape[1] % m:
            continue
        if isinstance(keep_rate, Mapping) and name not in keep_rate and granularity != "nm":
            raise ValueError(f"keep_rate has no entry for layer {name!r}")
        rate = keep_rate.get(name) if isinstance(keep_rate, Mapping) else keep_rate
        if init == "hydra":
            start = hydra_score_init(layer.weight)
        else:
            start = torch.empty_like(layer.weight)
            nn.init.kaiming_uniform_(start, a=math.sqrt(5))
        planned.append((name, layer, ScoreMask(rate, granularity, n, m), start))
    if not planned:
        raise ValueError("no layer received scores")
    attached = {}
    for name, layer, score_mask_module, start in planned:
        layer.weight_mask.copy_(start.to(layer.weight_mask.dtype))
        # The existing mask Parameter becomes `original`: the scores, in place, same object.
        parametrize.register_parametrization(layer, "weight_mask", score_mask_module)
        attached[name] = score_mask_module
    return attached


def score_parameters(model: nn.Module) -> List[nn.Parameter]:
    """The score tensors of every scored layer (give them to the optimizer; weights stay frozen in HYDRA)."""
    return [layer.parametrizations.weight_mask.original for layer in model.modules() if _is_scored(layer)]


@torch.no_grad()
def freeze_scores(model: nn.Module, mask_mode: str = "fixed") -> Dict[str, float]:
    """Replace every layer's scores by its current binary mask; returns each layer's sparsity.

    mask_mode="fixed" makes it a bool buffer (fine-tuning with the mask
    fixed, as HYDRA / HARP do); "trainable" keeps a float 0/1 mask Parameter.
    """
    check_choice("mask_mode", mask_mode, ("fixed", "trainable"))
    frozen = {}
    for name, layer in list(model.named_modules()):
        if not (parametrize.is_parametrized(layer, "weight_mask") and _is_scored(layer)):
            continue
        mask = layer.weight_mask.detach().clone()
        parametrize.remove_parametrizations(layer, "weight_mask", leave_parametrized=False)
        del layer.weight_mask
        layer._init_mask(mask_mode, mask)
        frozen[name] = layer.sparsity
    if not frozen:
        raise ValueError("model has no scored layers (see attach_scores)")
    return frozen
