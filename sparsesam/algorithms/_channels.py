"""Structured (whole output channel) pruning for the baselines, the way AdaSAP prunes.

magnitude and sam_prune with ``granularity="channel"`` are the structured
baselines AdaSAP is compared with ("magnitude + fine-tune", "SAM + prune"):
they remove the same fraction of output channels by the same criterion
(L2 norm of the channel's weights), over the same unit (each layer or all
layers), with residual-coupled convolutions ranked together, and gate the
pruned channels so the masked model computes what the compacted one does.
Only the training around the pruning differs, which is what the
comparison is about.
"""
from __future__ import annotations

from typing import Any, Dict, Optional, Tuple

from torch import nn

from ..pruning import (channel_prune, channel_sparsity, compact_channels, coupled_channel_groups,
                       gate_pruned_channels, global_sparsity)
from .base import example_input, model_device

GRANULARITIES = ("unstructured", "channel")


def gate(model: nn.Module, loader) -> None:
    """Gates on the pruned channels; they read the masks at every forward, so loading a state later is fine."""
    gate_pruned_channels(model, example_input(loader).to(model_device(model)))


def prune_channels_l2(model: nn.Module, loader, fraction: float, scope: str) -> None:
    """Remove ``fraction`` of the output channels of the prunable layers by L2 norm, then gate them."""
    example = example_input(loader).to(model_device(model))
    coupled = coupled_channel_groups(model, example)
    channel_prune(model, fraction, criterion="l2", scope=scope, coupled=coupled)
    gate(model, loader)


def compact_summary(model: nn.Module, loader) -> Tuple[Dict[str, Any], Optional[nn.Module]]:
    """The summary fields and the physically smaller model of a channel-pruned model (as AdaSAP reports them)."""
    example = example_input(loader).to(model_device(model))
    compact, report = compact_channels(model, example)
    summary = {"channel_sparsity": channel_sparsity(model), "weight_sparsity": global_sparsity(model),
               "params_dense": report.params_before, "params_compact": report.params_after,
               "macs_dense": report.macs_before, "macs_compact": report.macs_after,
               "param_ratio": report.param_ratio, "macs_ratio": report.macs_ratio,
               "compact_max_abs_diff": report.max_abs_diff}
    return summary, compact
