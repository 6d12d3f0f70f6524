"""BatchNorm running statistics across SAM's two forward passes.

SAM runs a second forward pass at the perturbed weights; without care,
BatchNorm layers update their running statistics twice per step, the second
time with activations of weights that are never kept. ``frozen_bn_stats``
makes a forward pass leave them exactly as they were.
"""
from __future__ import annotations

import contextlib
from typing import Iterator, List, Tuple

import torch
from torch import nn

_STAT_NAMES = ("running_mean", "running_var", "num_batches_tracked")


def _bn_stats(model: nn.Module) -> List[Tuple[nn.Module, str, torch.Tensor]]:
    stats = []
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._NormBase) and module.track_running_stats:
            for name in _STAT_NAMES:
                value = getattr(module, name, None)
                if value is not None:
                    stats.append((module, name, value))
    return stats


def snapshot_bn_stats(model: nn.Module) -> List[Tuple[torch.Tensor, torch.Tensor]]:
    """(live buffer, copy) pairs for every BatchNorm running statistic of ``model``."""
    return [(value, value.clone()) for _, _, value in _bn_stats(model)]


@torch.no_grad()
def restore_bn_stats(snapshot: List[Tuple[torch.Tensor, torch.Tensor]]) -> None:
    for live, saved in snapshot:
        live.copy_(saved)


@contextlib.contextmanager
def frozen_bn_stats(model: nn.Module) -> Iterator[None]:
    """Forward passes inside leave every BatchNorm running statistic bit-for-bit unchanged."""
    snapshot = snapshot_bn_stats(model)
    try:
        yield
    finally:
        restore_bn_stats(snapshot)
