"""Channel pruning through grouped and depthwise convolutions (torchvision's ResNeXt-50 and MobileNetV2):
the layers tied to a grouped conv lose the same positions in every group (torch-pruning's rule), so the
compacted model is a valid grouped network computing the masked model's function."""
import copy

import pytest
import torch
from torch import nn

import sparsesam
from sparsesam.algorithms import _compacted
from sparsesam.nn import masked_layers
from sparsesam.pruning import (channel_prune, compact_channels, coupled_channel_groups, gate_pruned_channels,
                               prune_channels)
from sparsesam.pruning._common import output_channels

pytest.importorskip("torch_pruning")
models = pytest.importorskip("torchvision.models")


def _with_statistics(model, shape):
    """Non-trivial BatchNorm statistics and affine parameters (so a BatchNorm constant would show), float64."""
    torch.manual_seed(0)
    model = sparsesam.sparsify(model).double()
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.weight.uniform_(0.5, 1.5)
                module.bias.uniform_(-0.5, 0.5)
        model.train()
        for _ in range(2):
            model(torch.randn(shape, dtype=torch.float64))
    return model.eval()


def _assert_same_function(masked, small, shape):
    x = torch.randn(shape, dtype=torch.float64)
    for train in (False, True):
        masked.train(train), small.train(train)
        with torch.no_grad():
            torch.testing.assert_close(small(x), masked(x), rtol=1e-9, atol=1e-9)
    masked.eval(), small.eval()


def _assert_aligned(model):
    """Every grouped (not depthwise) conv: the kept output channels are the same positions in each group."""
    grouped = 0
    for name, layer in masked_layers(model):
        if isinstance(layer, nn.Conv2d) and 1 < layer.groups < layer.in_channels:
            keep = output_channels(layer.weight_mask).view(layer.groups, -1)
            assert (keep == keep[0]).all(), name
            grouped += 1
    return grouped


def _tiny_resnext(groups=4, width_per_group=2):
    # torchvision's ResNeXt (Bottleneck with groups), one block per stage: few channels, same structure.
    return models.resnet.ResNet(models.resnet.Bottleneck, [1, 1, 1, 1], groups=groups,
                                width_per_group=width_per_group, num_classes=10)


def test_alignment_prunes_the_same_positions_in_every_chunk():
    model = sparsesam.sparsify(nn.Sequential(nn.Conv2d(3, 8, 1), nn.Conv2d(8, 8, 3, groups=2)))
    # Position 1 scores low in chunk 0 and high in chunk 1; position 3 is low in both.
    scores = {"0": torch.tensor([5., 0., 4., 1., 5., 9., 4., 1.]), "1": torch.ones(8)}
    prune_channels(model, scores, 0.25, coupled=[], alignment={"0": 2}, keep_output_layer=False, include=["0"])
    keep = output_channels(model[0].weight_mask)
    # Mean over chunks: [5, 4.5, 4, 1] -> position 3 goes, in both chunks (not channels 1 and 3 of chunk 0).
    assert keep.tolist() == [True, True, True, False, True, True, True, False]


def test_alignment_counts_every_chunk_in_global_ranking():
    model = sparsesam.sparsify(nn.Sequential(nn.Conv2d(3, 8, 1), nn.Conv2d(8, 4, 1)))
    scores = {"0": torch.arange(8.) + 10, "1": torch.tensor([0., 1., 2., 3.])}
    # 12 channels, 0.5 -> 6 go: layer 1 loses 3 (its low ones, min_channels keeps one), and one position of
    # layer 0 (2 channels, the lowest mean score: position 0) brings the total to 5 or 7, 5 being as close.
    pruned = prune_channels(model, scores, 0.5, scope="global", alignment={"0": 2}, keep_output_layer=False)
    assert output_channels(model[1].weight_mask).tolist() == [False, False, False, True]
    assert (~output_channels(model[0].weight_mask)).sum() in (2, 4)
    assert pruned["0"] * 8 % 2 == 0


def test_alignment_must_divide_the_channels():
    model = sparsesam.sparsify(nn.Sequential(nn.Conv2d(3, 6, 1), nn.Conv2d(6, 4, 1)))
    with pytest.raises(ValueError, match="alignment"):
        prune_channels(model, {"0": torch.ones(6), "1": torch.ones(4)}, 0.5, alignment={"0": 4},
                       keep_output_layer=False)


def test_tiny_resnext_compacts_exactly_into_a_grouped_network():
    model = _with_statistics(_tiny_resnext(), (4, 3, 16, 16))
    x = torch.randn(2, 3, 16, 16, dtype=torch.float64)
    groups = coupled_channel_groups(model, x)
    # The 1x1 conv feeding a grouped conv, and the grouped conv itself, are aligned to its 4 groups.
    assert groups.alignment["layer1.0.conv1"] == groups.alignment["layer1.0.conv2"] == 4
    assert "layer1.0.conv3" not in groups.alignment
    channel_prune(model, 0.5, coupled=groups)
    assert _assert_aligned(model) == 4
    gate_pruned_channels(model, x)
    small, report = compact_channels(model, x)
    _assert_same_function(model, small, (2, 3, 16, 16))
    conv2 = small.layer1[0].conv2
    assert conv2.groups == 4 and conv2.in_channels == conv2.out_channels == 4  # 8 channels, half kept
    assert report.param_ratio < 0.5


def test_tiny_resnext_compacted_in_place_rebuilds_and_expands():
    model = _with_statistics(_tiny_resnext(), (4, 3, 16, 16))
    x = torch.randn(2, 3, 16, 16, dtype=torch.float64)
    channel_prune(model, 0.5, coupled=coupled_channel_groups(model, x))
    gate_pruned_channels(model, x)
    compact = copy.deepcopy(model)
    record = _compacted.compact_in_place(compact, x)
    fresh = copy.deepcopy(model)
    _compacted.rebuild_compact(fresh, record, x)
    fresh.load_state_dict(compact.state_dict())  # strict: same keys and shapes, grouped convs included
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), model(x), rtol=1e-9, atol=1e-9)
        _compacted.expand_in_place(compact, record, x)
        torch.testing.assert_close(compact(x), model(x), rtol=1e-9, atol=1e-9)
    assert compact.layer1[0].conv2.weight.shape == model.layer1[0].conv2.weight.shape


def test_resnext50_channel_pruning_compacts_exactly():
    """torchvision's ResNeXt-50 (32x4d): failed in torch-pruning with 'INDICES element is out of DATA bounds'."""
    model = _with_statistics(models.resnext50_32x4d(num_classes=10), (2, 3, 32, 32))
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    groups = coupled_channel_groups(model, x)
    channel_prune(model, 0.5, coupled=groups)
    assert _assert_aligned(model) == 16  # one grouped conv per bottleneck
    gate_pruned_channels(model, x)
    small, report = compact_channels(model, x)
    assert report.max_abs_diff < 1e-9
    conv2 = small.layer3[2].conv2
    assert conv2.groups == 32 and conv2.out_channels == 256 and conv2.in_channels == 256  # 512, half kept
    assert report.param_ratio < 0.35


def test_mobilenetv2_channel_pruning_compacts_exactly():
    """torchvision's MobileNetV2: each depthwise conv is tied to the expansion conv before it."""
    # No dropout, so that train mode is deterministic and the two models can be compared there too.
    model = _with_statistics(models.mobilenet_v2(num_classes=10, width_mult=0.5, dropout=0.0), (2, 3, 32, 32))
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    groups = coupled_channel_groups(model, x)
    assert ["features.2.conv.0.0", "features.2.conv.1.0"] in groups  # expansion conv + its depthwise conv
    assert not groups.alignment  # depthwise convs set no alignment (torch-pruning's rule)
    channel_prune(model, 0.5, coupled=groups)
    gate_pruned_channels(model, x)
    small, report = compact_channels(model, x)
    _assert_same_function(model, small, (2, 3, 32, 32))
    depthwise = small.features[2].conv[1][0]
    assert depthwise.groups == depthwise.in_channels == depthwise.out_channels < 48
    assert report.param_ratio < 0.5
