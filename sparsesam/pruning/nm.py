"""N:M masks: keep ``n`` of every ``m`` consecutive weights along the input dimension (e.g. 2:4).

The groups run along the reduction (input) dimension, as sparse tensor cores
expect: for a Linear weight ``[out, in]`` over ``in``; for a Conv2d weight
``[out, in, kh, kw]`` over ``in`` at each (out, kh, kw) position, the layout
NVIDIA's ASP uses. The input dimension must be a multiple of ``m``.
"""
from __future__ import annotations

from typing import Dict, Optional, Mapping

import torch
from torch import nn

from ..nn.sparsify import Selector
from ._common import check_finite, check_nm, prunable_layers


def _grouped(t: torch.Tensor, m: int, name: str) -> torch.Tensor:
    """``t`` as ``[..., in/m, m]`` with the input dimension last (a view or copy; see _ungrouped)."""
    if t.dim() < 2:
        raise ValueError(f"{name} must have at least 2 dimensions (out, in, ...), got shape {tuple(t.shape)}")
    if t.shape[1] % m:
        raise ValueError(f"{name} has {t.shape[1]} inputs (dim 1), not a multiple of m={m}")
    moved = t.movedim(1, -1)
    return moved.reshape(*moved.shape[:-1], t.shape[1] // m, m)


def _ungrouped(g: torch.Tensor, shape) -> torch.Tensor:
    moved_shape = (shape[0], *shape[2:], shape[1])
    return g.reshape(moved_shape).movedim(-1, 1)


def nm_mask(scores: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Bool mask of ``scores``' shape keeping the ``n`` largest scores of each group of ``m`` inputs.

    Ties go to the lower input index (stable sort), the same on every device.
    Pass ``weight.abs()`` for magnitude N:M.
    """
    n, m = check_nm(n, m)
    if not isinstance(scores, torch.Tensor):
        raise TypeError(f"scores must be a torch.Tensor, got {type(scores).__name__}")
    check_finite("scores", scores)
    groups = _grouped(scores.detach(), m, "scores")
    top = torch.sort(groups, dim=-1, descending=True, stable=True).indices[..., :n]
    kept = torch.zeros(groups.shape, dtype=torch.bool, device=scores.device).scatter_(-1, top, True)
    return _ungrouped(kept, scores.shape).contiguous()


def is_nm_sparse(mask: torch.Tensor, n: int, m: int, exact: bool = False) -> bool:
    """True when every group of ``m`` inputs holds at most ``n`` non-zeros (exactly ``n`` with exact=True)."""
    n, m = check_nm(n, m)
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"mask must be a torch.Tensor, got {type(mask).__name__}")
    counts = _grouped(mask.detach().ne(0), m, "mask").sum(dim=-1)
    return bool((counts == n).all() if exact else (counts <= n).all())


@torch.no_grad()
def nm_prune(model: nn.Module, n: int = 2, m: int = 4, scores: Optional[Mapping[str, torch.Tensor]] = None,
             include: Selector = None, exclude: Selector = None, keep_output_layer: bool = False,
             skip_indivisible: bool = True) -> Dict[str, float]:
    """Give every selected masked layer an N:M mask; returns the sparsity of each layer it pruned.

    scores: {layer name: tensor of the weight's shape}; by default the
    magnitude ``|W*M|`` (weights pruned before rank lowest, so an existing
    mask is refined, not undone). The N:M mask replaces the old one. Layers
    whose input dimension is not a multiple of ``m`` (a 3-channel stem) are
    left as they are when skip_indivisible (the default; ASP does the same),
    else they raise ValueError. The classifier is pruned too unless
    keep_output_layer: N:M keeps every output.
    """
    check_nm(n, m)
    if scores is not None and not isinstance(scores, Mapping):
        raise TypeError(f"scores must be a mapping {{layer name: tensor}}, got {type(scores).__name__}")
    result, masks = {}, []
    for name, layer in prunable_layers(model, include, exclude, keep_output_layer):
        if layer.weight.shape[1] % m and skip_indivisible:
            continue
        if scores is None:
            s = layer.effective_weight().detach().abs()
            check_finite(f"the weight of layer {name!r}", s)
        else:
            if name not in scores:
                raise ValueError(f"scores has no entry for layer {name!r}")
            s = scores[name]
            if not isinstance(s, torch.Tensor) or s.shape != layer.weight.shape:
                raise ValueError(f"scores[{name!r}] must be a tensor of the weight's shape {tuple(layer.weight.shape)}")
            check_finite(f"scores[{name!r}]", s)
        masks.append((name, layer, nm_mask(s.to(layer.weight.device), n, m)))
    # Every layer's mask is made (and its scores checked) before any is set.
    for name, layer, mask in masks:
        layer.set_mask(mask)
        result[name] = layer.sparsity
    return result
