"""What every pruning function checks first: its numbers, and which masked layers it may prune."""
from __future__ import annotations

import numbers
from typing import List, Tuple

import torch
from torch import nn

from ..nn import masked_layers
from ..nn.masked import _MaskedWeight
from ..nn.sparsify import Selector, check_selector, matches_selector


def check_fraction(name: str, value) -> float:
    """A sparsity / fraction of channels: a real number in [0, 1) (1 would remove everything; NaN fails)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a float in [0, 1), got {type(value).__name__} {value!r}")
    if not 0.0 <= value < 1.0:
        raise ValueError(f"{name} must be in [0, 1), got {value}")
    return float(value)


def check_finite(name: str, values: torch.Tensor) -> None:
    """Weights or scores to rank must be finite: NaN sorts above every number
    (so NaN weights would be kept as the largest) and inf is no magnitude."""
    if values.is_floating_point() and not bool(torch.isfinite(values).all()):
        nan, inf = int(torch.isnan(values).sum()), int(torch.isinf(values).sum())
        raise ValueError(f"{name} contains NaN or inf ({nan} NaN, {inf} inf): cannot rank it for pruning")


def check_choice(name: str, value, choices) -> str:
    if value not in choices:
        raise ValueError(f"{name} must be one of {tuple(choices)}, got {value!r}")
    return value


def check_nm(n, m) -> Tuple[int, int]:
    """N:M sparsity keeps n of every m consecutive weights: 1 <= n <= m."""
    for name, value in (("n", n), ("m", m)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if m < 1:
        raise ValueError(f"m must be >= 1, got {m}")
    if not 1 <= n <= m:
        raise ValueError(f"n must be in [1, m={m}], got {n}")
    return n, m


def output_layer_name(model: nn.Module) -> str:
    """The masked layer taken as the classifier: the last one in module order.

    Torchvision's ResNet / VGG / MobileNet, timm's models and sparsesam's own
    models register the classifier last; its outputs are the classes, so
    channel pruning must never remove them.
    """
    names = [name for name, _ in masked_layers(model)]
    if not names:
        raise ValueError("model has no masked layers: call sparsesam.sparsify(model) first")
    return names[-1]


def prunable_layers(model: nn.Module, include: Selector = None, exclude: Selector = None,
                    keep_output_layer: bool = True) -> List[Tuple[str, _MaskedWeight]]:
    """The masked layers a pruning function acts on, in module order.

    include / exclude are sparsify()'s selectors (glob patterns on module
    names, a list of them, or a callable); keep_output_layer leaves the
    classifier (see output_layer_name) alone.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    include = check_selector("include", include)
    exclude = check_selector("exclude", exclude)
    skip = output_layer_name(model) if keep_output_layer else None
    layers = [(name, layer) for name, layer in masked_layers(model)
              if name != skip
              and (include is None or matches_selector(include, name, layer))
              and (exclude is None or not matches_selector(exclude, name, layer))]
    if not layers:
        raise ValueError("no masked layer is left to prune: check include / exclude / keep_output_layer")
    return layers


def output_channels(mask: torch.Tensor) -> torch.Tensor:
    """Bool per output channel (dim 0): True where the channel keeps any weight."""
    return mask.detach().reshape(mask.shape[0], -1).ne(0).any(dim=1)
