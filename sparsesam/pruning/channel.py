"""Structured (channel) masks: zero whole output channels of masked layers.

A channel mask has the weight's shape and is constant along every output
channel (dim 0 of a Linear's or Conv2d's weight). Ranking is per layer
(each layer loses ``fraction`` of its channels) or global (one threshold
over all channels, so layers lose different fractions). Layers whose
channels are tied together (the convolutions feeding one residual sum, see
coupled_channel_groups) can be ranked as one unit: their scores are summed
and the same channels go in all of them, which is what lets compaction
remove them physically. Layers tied to a grouped convolution (``groups=G``,
not depthwise: ResNeXt) lose the same positions in each of the G chunks of
their channels, so every group of the conv keeps as many channels as the
others (``alignment``, which coupled_channel_groups' result carries).

The new mask is the old one with the dropped channels zeroed: weights
pruned before stay pruned, and since the criteria score W*M a channel that
is already empty ranks lowest, so repeated calls prune cumulatively.
"""
from __future__ import annotations

from typing import Dict, List, Mapping, Optional, Sequence, Tuple

import torch
from torch import nn

from ..nn.sparsify import Selector
from ._common import check_choice, check_finite, check_fraction, output_channels, prunable_layers
from .channel_criteria import TaylorAccumulator, channel_scores

SCOPES = ("layer", "global")
NORMALIZATIONS = (None, "mean", "max")


def channel_mask(weight_shape: Sequence[int], keep: torch.Tensor) -> torch.Tensor:
    """A bool mask of ``weight_shape`` that is True exactly on the output channels where ``keep`` is True."""
    if not isinstance(keep, torch.Tensor) or keep.dim() != 1 or keep.shape[0] != weight_shape[0]:
        raise ValueError(f"keep must be a 1-D tensor with {weight_shape[0]} entries (one per output channel)")
    keep = keep.ne(0)
    return keep.view(-1, *([1] * (len(weight_shape) - 1))).expand(*weight_shape).clone()


def _normalized(scores: torch.Tensor, normalize: Optional[str]) -> torch.Tensor:
    scores = scores.detach().double()
    if normalize is None:
        return scores
    scale = scores.mean() if normalize == "mean" else scores.max()
    return scores / scale if scale > 0 else scores


def coupled_unit_scores(scores: Mapping[str, torch.Tensor], coupled: Optional[Sequence[Sequence[str]]] = None,
                        normalize: Optional[str] = None) -> List[Tuple[List[str], torch.Tensor]]:
    """The ranking units of ``scores``' layers with one score per channel each, float64 on the CPU.

    Each coupled group (coupled_channel_groups; members absent from
    ``scores`` are skipped) is one unit whose score is the mean of its
    layers' (normalised) scores, so tied and single layers rank on one
    scale; every other layer is its own unit. What prune_channels ranks, and
    what AdaSAP's radii are computed from.
    """
    check_choice("normalize", normalize, NORMALIZATIONS)
    units, seen = [], set()
    for group in coupled or ():
        members = [name for name in group if name in scores]
        if not members:
            continue
        channels = {scores[name].shape[0] for name in members}
        if len(channels) != 1:
            raise ValueError(f"coupled group {list(group)} mixes layers with different output channels {sorted(channels)}")
        if seen.intersection(members):
            raise ValueError(f"coupled groups overlap at {sorted(seen.intersection(members))}")
        seen.update(members)
        units.append(members)
    units += [[name] for name in scores if name not in seen]
    return [(unit, sum(_normalized(scores[name], normalize).cpu() for name in unit) / len(unit)) for unit in units]


def _unit_chunks(unit: Sequence[str], channels: int, alignment: Mapping[str, int]) -> int:
    """The number of chunks a unit's channels are pruned in (the largest of its layers'), checked to divide them."""
    g = max([1] + [alignment.get(name, 1) for name in unit])
    if isinstance(g, bool) or not isinstance(g, int) or g < 1 or channels % g:
        raise ValueError(f"alignment of {list(unit)} must be a positive int dividing their {channels} channels, got {g!r}")
    return g


def _keep_top(scores: torch.Tensor, keep: int) -> torch.Tensor:
    """Bool: the ``keep`` largest scores, ties going to the lower index (a stable sort, same on every device)."""
    order = torch.sort(scores, descending=True, stable=True).indices
    kept = torch.zeros_like(scores, dtype=torch.bool)
    kept[order[:keep]] = True
    return kept


@torch.no_grad()
def prune_channels(model: nn.Module, scores: Mapping[str, torch.Tensor], fraction: float, scope: str = "layer",
                   normalize: Optional[str] = None, min_channels: int = 1,
                   coupled: Optional[Sequence[Sequence[str]]] = None, include: Selector = None,
                   exclude: Selector = None, keep_output_layer: bool = True,
                   alignment: Optional[Mapping[str, int]] = None) -> Dict[str, float]:
    """Zero the lowest-scored ``fraction`` of output channels; returns each layer's fraction of channels pruned.

    scores: {layer name: one score per output channel} (channel_scores(),
    TaylorAccumulator.scores(), or your own). scope="layer" prunes
    ``round(fraction * channels)`` of every layer (or coupled unit);
    "global" ranks all channels together. normalize ("mean" / "max")
    divides each layer's scores by their mean / max first, which makes
    global ranking fair across layers of different fan-in. Every layer keeps
    at least ``min_channels`` channels, so no layer is cut off. The
    classifier is left alone unless keep_output_layer=False.

    alignment: {layer name: G}: that layer's channels are G equal chunks
    that must lose the same positions (layers tied to a grouped conv). Its
    scores are averaged over the chunks (torch-pruning's MetaPruner rule),
    positions are ranked, and each pruned position removes G channels.
    Default: ``coupled.alignment`` when ``coupled`` is coupled_channel_groups'
    result, else none.
    """
    fraction = check_fraction("fraction", fraction)
    if alignment is None:
        alignment = getattr(coupled, "alignment", None) or {}
    if not isinstance(alignment, Mapping):
        raise TypeError(f"alignment must be a mapping {{layer name: chunks}}, got {type(alignment).__name__}")
    check_choice("scope", scope, SCOPES)
    check_choice("normalize", normalize, NORMALIZATIONS)
    if isinstance(min_channels, bool) or not isinstance(min_channels, int) or min_channels < 1:
        raise ValueError(f"min_channels must be an int >= 1, got {min_channels!r}")
    if not isinstance(scores, Mapping):
        raise TypeError(f"scores must be a mapping {{layer name: tensor}}, got {type(scores).__name__}")
    layers = prunable_layers(model, include, exclude, keep_output_layer)
    for name, layer in layers:
        if name not in scores:
            raise ValueError(f"scores has no entry for layer {name!r}")
        s = scores[name]
        if not isinstance(s, torch.Tensor) or s.shape != (layer.weight.shape[0],):
            raise ValueError(f"scores[{name!r}] must be a tensor of shape ({layer.weight.shape[0]},)")
        check_finite(f"scores[{name!r}]", s)  # +inf also marks reserved channels below

    by_name = dict(layers)
    # A unit's score is the mean of its layers' scores, so tied and single layers rank on one scale.
    ranked = coupled_unit_scores({name: scores[name] for name, _ in layers}, coupled, normalize)
    units = [[(name, by_name[name]) for name in unit] for unit, _ in ranked]
    chunks = [_unit_chunks(unit, score.numel(), alignment) for unit, score in ranked]
    # Ranked by position within a chunk: the mean of that position's scores over the chunks.
    unit_scores = [score.view(g, -1).mean(0) for (_, score), g in zip(ranked, chunks)]
    if scope == "layer":
        keeps = []
        for s, g in zip(unit_scores, chunks):
            n = s.numel()
            keeps.append(_keep_top(s, max(n - round(fraction * n), min(-(-min_channels // g), n))))
    else:
        # Reserve each unit's best min_channels (score +inf), then one threshold over everything.
        reserved = []
        for s, g in zip(unit_scores, chunks):
            r = s.clone()
            r[_keep_top(s, min(-(-min_channels // g), s.numel()))] = float("inf")  # positions of g channels
            reserved.append(r)
        flat = torch.cat(reserved)
        # A channel of a unit of k tied layers is k layer channels: count it k times toward the target.
        weight = torch.cat([torch.full((s.numel(),), len(unit) * g, dtype=torch.float64)
                            for unit, s, g in zip(units, unit_scores, chunks)])
        order = torch.sort(flat, stable=True).indices  # lowest first; reserved (+inf) last
        pruned_weight = torch.cat([torch.zeros(1, dtype=torch.float64), torch.cumsum(weight[order], 0)])
        limit = int(torch.isfinite(flat).sum())  # reserved channels are never pruned
        # Prune the number of lowest channels whose total weight comes closest to the target.
        cut = int((pruned_weight[:limit + 1] - fraction * float(weight.sum())).abs().argmin())
        kept = torch.ones_like(flat, dtype=torch.bool)
        kept[order[:cut]] = False
        keeps = list(torch.split(kept, [s.numel() for s in unit_scores]))

    pruned = {}
    for unit, keep, g in zip(units, keeps, chunks):
        keep = keep.repeat(g)  # the kept positions, in every chunk
        for name, layer in unit:
            mask = layer.weight_mask.detach()
            keep_here = channel_mask(mask.shape, keep.to(mask.device))
            layer.set_mask(torch.where(keep_here, mask, torch.zeros((), dtype=mask.dtype, device=mask.device)))
            pruned[name] = 1.0 - float(output_channels(layer.weight_mask).float().mean())
    return pruned


def channel_prune(model: nn.Module, fraction: float, criterion: str = "l2", taylor: Optional[TaylorAccumulator] = None,
                  scope: str = "layer", normalize: Optional[str] = None, min_channels: int = 1,
                  coupled: Optional[Sequence[Sequence[str]]] = None, include: Selector = None,
                  exclude: Selector = None, keep_output_layer: bool = True,
                  alignment: Optional[Mapping[str, int]] = None) -> Dict[str, float]:
    """channel_scores(criterion) then prune_channels(): the one call for L2 or Taylor channel pruning."""
    check_fraction("fraction", fraction)
    layers = prunable_layers(model, include, exclude, keep_output_layer)
    names = [name for name, _ in layers]
    scores = channel_scores(model, criterion, taylor, include=names)
    return prune_channels(model, scores, fraction, scope=scope, normalize=normalize, min_channels=min_channels,
                          coupled=coupled, include=names, keep_output_layer=False, alignment=alignment)


def channel_sparsity(model: nn.Module, include: Selector = None, exclude: Selector = None,
                     keep_output_layer: bool = True) -> float:
    """Fraction of the selected layers' output channels whose mask is all zero."""
    layers = prunable_layers(model, include, exclude, keep_output_layer)
    total = sum(layer.weight.shape[0] for _, layer in layers)
    empty = sum(int((~output_channels(layer.weight_mask)).sum()) for _, layer in layers)
    return empty / total
