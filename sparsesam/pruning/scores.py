"""Score-based masks with a straight-through estimator (HYDRA; HARP's connection scores).

Each masked layer gets scores s; its mask keeps the largest |s|: the top
``keep_rate`` fraction of the weights (unstructured; s has the weight's
shape), of the output channels (channel; one score per channel, s is
``[C, 1, ...]``), or the top ``n`` of every ``m`` inputs (N:M). Forward
uses that binary mask; backward sends the mask's gradient straight through
to |s| (HYDRA's / HARP's ``GetSubnet``), so with the masked layer's
``dL/dM = G*W`` the scores get ``sign(s) * G * W`` (summed over the
channel for channel scores). Both directions are score_to_mask.ScoreToMask:
a threshold selection (no sort) forward, the fused ``mask_score_grad``
backward.

The scores *are* the layer's trainable mask parameter: attach_scores() puts
a ScoreMask on ``weight_mask`` with torch.nn.utils.parametrize, so
``layer.weight_mask`` reads the binary mask and the scores live in
``layer.parametrizations.weight_mask.original``. The layers stay ordinary
masked layers that know nothing of scores; they need
``mask_mode="trainable"`` (``sparsify(model, mask_mode="trainable")``).
freeze_scores() turns the current binary masks back into ordinary masks for
fine-tuning.

The rate may be a float, a 0-dim tensor, an nn.Parameter or an nn.Module
returning the rate (HARP's learnable ``sigmoid(p) * (1 - k_min) + k_min``):
a rate that requires grad receives ``sum(dL/dM)``, GetSubnet's
straight-through rate gradient (the mask's total gradient says whether
keeping more helps).
"""
from __future__ import annotations

import math
from typing import Dict, List, Mapping, Optional, Sequence, Tuple, Union

import torch
from torch import nn
from torch.nn.utils import parametrize

from ..nn.sparsify import Selector
from ._common import check_choice, check_nm, prunable_layers
from .score_to_mask import GRANULARITIES, ScoreToMask

SCORE_INITS = ("hydra", "kaiming_uniform")
Rate = Union[float, torch.Tensor, nn.Module]


def score_shape(weight_shape, granularity: str) -> Tuple[int, ...]:
    """The scores' shape: the weight's, or one per output channel (``[C, 1, ...]``) for channel masks."""
    weight_shape = tuple(weight_shape)
    if granularity == "channel":
        return (weight_shape[0],) + (1,) * (len(weight_shape) - 1)
    return weight_shape


def hydra_score_init(weight: torch.Tensor, granularity: str = "unstructured") -> torch.Tensor:
    """HYDRA's / HARP's scaled score init (utils/model.py initialize_scaled_score).

    Weights: ``sqrt(6 / fan_in) * w / max|w|``, Kaiming-uniform's range,
    ordered like |w|. Channels: the channel's L1 norm ``c = sum |w_c|``,
    ``sqrt(6 / fan_in) * c / max c`` with the fan-in of the ``[C, 1, ...]``
    score tensor (1), as the official code computes it. (The official code
    sums ``|W.reshape(in_channels, -1)|``, which on a ``[out, in, kh, kw]``
    weight mixes channels; we take each output channel's own weights, the
    norm the comment there names.)
    """
    check_choice("granularity", granularity, GRANULARITIES)
    w = weight.detach()
    if granularity == "channel":
        w = w.abs().reshape(w.shape[0], -1).sum(dim=1).reshape(score_shape(w.shape, "channel"))
    fan_in = w[0].numel()
    peak = w.abs().max()
    if peak == 0:
        raise ValueError("weight is all zero: its magnitude cannot initialise scores")
    return math.sqrt(6.0 / fan_in) * w / peak


def _check_rate_value(rate) -> None:
    value = float(rate.detach()) if isinstance(rate, torch.Tensor) else float(rate)
    if not 0.0 < value <= 1.0:
        raise ValueError(f"keep_rate must be in (0, 1], got {value}")


def score_mask(scores: torch.Tensor, keep_rate: Union[float, torch.Tensor, None] = None,
               granularity: str = "unstructured", n: int = 2, m: int = 4,
               weight_shape: Optional[Sequence[int]] = None) -> torch.Tensor:
    """Binary mask from ``scores`` (top ``keep_rate`` of |s|, or N:M), differentiable by straight-through.

    weight_shape: the mask's shape (default: the scores'); channel scores
    are ``[C, 1, ...]`` and their mask is broadcast to the weight's shape.
    See score_to_mask.ScoreToMask for the forward and backward.
    """
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
        # Its value (in (0, 1]) is checked by ScoreToMask, where it is read anyway.
    weight_shape = tuple(scores.shape) if weight_shape is None else tuple(weight_shape)
    if tuple(scores.shape) != score_shape(weight_shape, granularity):
        raise ValueError(f"scores have shape {tuple(scores.shape)}, but {granularity} masks of a weight of shape "
                         f"{weight_shape} need {score_shape(weight_shape, granularity)}")
    return ScoreToMask.apply(scores, keep_rate, granularity, n, m, weight_shape)


class ScoreMask(nn.Module):
    """The parametrization ``scores -> binary mask`` that attach_scores() puts on ``weight_mask``.

    weight_shape: the mask's shape (the weight's; for channel masks the
    scores are ``[C, 1, ...]``). Subclass and override keep_rate() for a rate
    computed another way.
    """

    def __init__(self, keep_rate: Optional[Rate], granularity: str = "unstructured", n: int = 2, m: int = 4,
                 weight_shape: Optional[Sequence[int]] = None) -> None:
        super().__init__()
        self.weight_shape = None if weight_shape is None else tuple(int(d) for d in weight_shape)
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
        return score_mask(scores, self.keep_rate(), self.granularity, self.n, self.m, self.weight_shape)

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
            start = hydra_score_init(layer.weight, granularity)
        else:
            # HYDRA / HARP layers' own init of popup_scores.
            start = torch.empty(score_shape(layer.weight.shape, granularity), dtype=layer.weight.dtype,
                                device=layer.weight.device)
            nn.init.kaiming_uniform_(start, a=math.sqrt(5))
        planned.append((name, layer, ScoreMask(rate, granularity, n, m, layer.weight.shape), start))
    if not planned:
        raise ValueError("no layer received scores")
    attached = {}
    for name, layer, score_mask_module, start in planned:
        if start.shape == layer.weight_mask.shape:
            # The existing mask Parameter becomes `original`: the scores, in place, same object.
            layer.weight_mask.copy_(start.to(layer.weight_mask.dtype))
        else:
            # Channel scores: one per output channel, a new (smaller) Parameter in the mask's place.
            layer.weight_mask = nn.Parameter(start.to(layer.weight_mask.dtype))
        # unsafe: the scores' shape may differ from the mask's (channel); ScoreMask checks it at every forward.
        parametrize.register_parametrization(layer, "weight_mask", score_mask_module, unsafe=True)
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
