"""Inference latency of a 50%-channel compacted ResNet-18 vs the dense, unpruned one.

ResNet-18 at the demo's width (0.5) and input (1x28x28, 10 classes). The compacted model:
``sparsify`` -> ``channel_prune(0.5, coupled=coupled_channel_groups(...))`` (L2 criterion,
half the output channels of every conv, the classifier's outputs kept; residual partners
lose the same channels) -> ``gate_pruned_channels`` -> ``compact_channels``: a plain,
physically smaller model. Both in eval mode under ``torch.no_grad()``, batch 1 (latency)
and 512 (the demo's evaluation batch). Parameters and MACs per image come from
compact_channels' report (torch-pruning's counter).

In the report: ``.venv/bin/python bench/report.py --suite compact_inference``
"""
from __future__ import annotations

import pytest
import torch
from torch import nn

import sparsesam
from sparsesam.models import build_model
from sparsesam.pruning import (channel_prune, channel_sparsity, compact_channels, coupled_channel_groups,
                               gate_pruned_channels)

IN_CHANNELS, SIZE, CLASSES, WIDTH = 1, 28, 10, 0.5
CHANNEL_FRACTION = 0.5
BATCHES = [1, 512]
KERNEL = "compact_inference"  # report.py groups and tabulates by this


def dense_model() -> nn.Module:
    torch.manual_seed(0)
    return build_model("resnet18", IN_CHANNELS, CLASSES, width=WIDTH).eval()


def compacted_model():
    """(the compacted plain model, its CompactionReport, the channel sparsity reached)."""
    model = sparsesam.sparsify(dense_model())
    example = torch.randn(2, IN_CHANNELS, SIZE, SIZE, generator=torch.Generator().manual_seed(2))
    channel_prune(model, CHANNEL_FRACTION, coupled=coupled_channel_groups(model, example))
    gate_pruned_channels(model, example)
    small, report = compact_channels(model, example)
    return small.eval(), report, channel_sparsity(model)


@pytest.fixture(scope="module")
def models():
    small, report, reached = compacted_model()
    return {"dense": (dense_model(), report.params_before, report.macs_before),
            "compact": (small, report.params_after, report.macs_after), "channel_sparsity": reached}


@pytest.mark.parametrize("impl", ["dense", "compact"])
@pytest.mark.parametrize("batch", BATCHES)
def test_compact_inference(benchmark, models, impl, batch):
    model, params, macs = models[impl]
    x = torch.randn(batch, IN_CHANNELS, SIZE, SIZE, generator=torch.Generator().manual_seed(1))
    benchmark.group = f"ResNet-18 w{WIDTH} inference {IN_CHANNELS}x{SIZE}x{SIZE} batch={batch}"
    benchmark.extra_info.update(kernel=KERNEL, batch=batch, params=params, macs_per_image=macs,
                                channel_sparsity=models["channel_sparsity"])

    def infer():
        with torch.no_grad():
            model(x)
    big = batch > 8
    benchmark.pedantic(infer, rounds=7 if big else 100, warmup_rounds=2 if big else 10)
