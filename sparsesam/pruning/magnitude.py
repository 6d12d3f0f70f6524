"""Unstructured magnitude pruning of masked layers (layer-wise or global)."""
from __future__ import annotations

from typing import Dict

import torch
from torch import nn

from ..nn import masked_layers
from ._common import check_choice, check_finite, check_fraction

SCOPES = ("global", "layer")


def _keep_top(scores: torch.Tensor, keep: int) -> torch.Tensor:
    """A bool mask keeping exactly ``keep`` entries with the largest scores (ties broken by index)."""
    mask = torch.zeros(scores.numel(), dtype=torch.bool, device=scores.device)
    if keep > 0:
        mask[torch.topk(scores.flatten(), keep, sorted=False).indices] = True
    return mask.view_as(scores)


@torch.no_grad()
def magnitude_prune(model: nn.Module, sparsity: float, scope: str = "global") -> Dict[str, float]:
    """Set every masked layer's mask to keep the largest-|w| weights; returns sparsity per layer.

    scope="global" ranks all masked weights together (one threshold);
    scope="layer" prunes each layer to ``sparsity``. Already-pruned weights
    count with their current value, so pruning is not cumulative by itself.
    """
    sparsity = check_fraction("sparsity", sparsity)
    check_choice("scope", scope, SCOPES)
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    layers = list(masked_layers(model))
    if not layers:
        raise ValueError("model has no masked layers: call sparsesam.sparsify(model) first")
    for name, layer in layers:  # all checked before any mask changes
        check_finite(f"the weight of layer {name!r}", layer.weight)
    if scope == "layer":
        for _, layer in layers:
            keep = round(layer.weight.numel() * (1.0 - sparsity))
            layer.set_mask(_keep_top(layer.weight.abs(), keep))
    else:
        scores = torch.cat([layer.weight.abs().flatten().float() for _, layer in layers])
        keep_all = _keep_top(scores, round(scores.numel() * (1.0 - sparsity)))
        offset = 0
        for _, layer in layers:
            n = layer.weight.numel()
            layer.set_mask(keep_all[offset: offset + n].view_as(layer.weight))
            offset += n
    return {name: layer.sparsity for name, layer in layers}


def global_sparsity(model: nn.Module) -> float:
    """Fraction of masked-layer weights that are pruned."""
    total = pruned = 0
    for _, layer in masked_layers(model):
        total += layer.weight_mask.numel()
        pruned += layer.weight_mask.numel() - int(torch.count_nonzero(layer.weight_mask))
    return pruned / max(total, 1)
