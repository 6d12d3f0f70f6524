"""Structured compaction: the physically smaller plain model computes what the
masked model computes (float64, eval and train mode), on ResNet18 (residual
coupling, BatchNorm) and SmallCNN (BatchNorm, Linear with bias); channel gates
are what makes zeroed channels removable; unknown operations keep channels."""
import pytest
import torch
from torch import nn

import sparsesam
from sparsesam.models import ResNet18, SmallCNN
from sparsesam.nn import masked_layers
from sparsesam.pruning import (channel_prune, channel_sparsity, compact_channels, coupled_channel_groups,
                               gate_pruned_channels)

pytest.importorskip("torch_pruning")


def _with_statistics(model, shape):
    """Non-trivial BatchNorm running statistics and affine parameters, so that BN's constant is visible."""
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.weight.uniform_(0.5, 1.5)
                module.bias.uniform_(-0.5, 0.5)
        model.train()
        for _ in range(3):
            model(torch.randn(shape, dtype=torch.float64))
    return model.eval()


def _resnet():
    return _with_statistics(sparsesam.sparsify(ResNet18(width=8)).double(), (8, 3, 16, 16))


def _small_cnn():
    return _with_statistics(sparsesam.sparsify(SmallCNN(width=8)).double(), (8, 1, 28, 28))


def _assert_same_function(masked, small, shape):
    x = torch.randn(shape, dtype=torch.float64)
    for train in (False, True):
        masked.train(train)
        small.train(train)
        with torch.no_grad():
            torch.testing.assert_close(small(x), masked(x), rtol=1e-10, atol=1e-10)
    masked.eval()
    small.eval()


def _convs(model):
    return {n: m for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))}


def test_resnet18_coupled_channels_compact_exactly():
    model = _resnet()
    x = torch.randn(2, 3, 16, 16, dtype=torch.float64)
    groups = coupled_channel_groups(model, x)
    channel_prune(model, 0.5, coupled=groups)
    assert channel_sparsity(model) == pytest.approx(0.5, abs=0.01)
    gate_pruned_channels(model, x)
    small, report = compact_channels(model, x)

    _assert_same_function(model, small, (4, 3, 16, 16))
    assert report.max_abs_diff < 1e-10
    assert not list(masked_layers(small))  # a plain model
    kept = {name: int(layer.weight_mask.flatten(1).any(1).sum()) for name, layer in masked_layers(model)}
    for name, conv in _convs(small).items():
        assert conv.weight.shape[0] == kept[name], name  # exactly the masked channels are gone
    assert small.fc.out_features == 10
    assert report.params_after == sum(p.numel() for p in small.parameters())
    assert report.params_before == sum(p.numel() for p in ResNet18(width=8).parameters())
    assert report.param_ratio < 0.3 and report.macs_ratio < 0.3  # half the channels: about a quarter of the weights
    assert report.channels_removed["layers.6.conv1"] == 32


def test_small_cnn_compacts_exactly_including_linear_with_bias():
    model = _small_cnn()
    x = torch.randn(2, 1, 28, 28, dtype=torch.float64)
    channel_prune(model, 0.5, scope="global", normalize="mean")
    gates = gate_pruned_channels(model, x)
    # Convs are gated after their BatchNorm; the hidden Linear (no BN after it) on its own output.
    assert gates.gated["features.0"] == "features.1" and gates.gated["classifier.1"] == "classifier.1"
    small, report = compact_channels(model, x)
    _assert_same_function(model, small, (3, 1, 28, 28))
    kept = {name: int(layer.weight_mask.flatten(1).any(1).sum()) for name, layer in masked_layers(model)}
    for name, layer in _convs(small).items():
        assert layer.weight.shape[0] == kept[name], name
    assert small.classifier[3].out_features == 10
    assert report.params_after < 0.5 * report.params_before


def test_without_gates_batchnorm_constant_keeps_channels_and_stays_exact():
    model = _resnet()
    x = torch.randn(2, 3, 16, 16, dtype=torch.float64)
    channel_prune(model, 0.5, coupled=coupled_channel_groups(model, x))
    before = model(x)
    # A zeroed conv channel is not zero after BatchNorm: gating changes the function...
    with gate_pruned_channels(model, x):
        assert (model(x) - before).abs().max() > 1e-3
    assert torch.equal(model(x), before)  # ...and removing the gates restores it.
    small, report = compact_channels(model, x)
    # ...so, ungated, no BatchNorm-followed channel may go: nothing is removed, and the function is kept.
    assert report.params_after == report.params_before and not report.channels_removed
    _assert_same_function(model, small, (2, 3, 16, 16))


def test_uncoupled_pruning_removes_only_what_is_dead_everywhere():
    model = _resnet()
    x = torch.randn(2, 3, 16, 16, dtype=torch.float64)
    channel_prune(model, 0.5)  # each layer alone: residual partners drop different channels
    gate_pruned_channels(model, x)
    small, report = compact_channels(model, x)
    _assert_same_function(model, small, (2, 3, 16, 16))
    small_convs = _convs(small)
    assert small_convs["layers.0.conv1"].out_channels == 4  # inside a block: nothing tied, all dead go
    # The residual stream keeps a channel while any tied conv still feeds it.
    stream = ["conv1", "layers.0.conv2", "layers.1.conv2"]
    layers = dict(masked_layers(model))
    alive = torch.stack([layers[n].weight_mask.flatten(1).any(1) for n in stream]).any(0)
    assert all(small_convs[n].out_channels == int(alive.sum()) for n in stream)


class _ActivationNet(nn.Module):
    def __init__(self, act):
        super().__init__()
        self.conv = nn.Conv2d(2, 6, 3, padding=1)
        self.act = act
        self.conv2 = nn.Conv2d(6, 4, 3, padding=1)
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        return self.fc(self.conv2(self.act(self.conv(x))).mean(dim=(2, 3)))


# sigmoid(0) = 0.5 and hardtanh clamps 0 up to 0.5: a dead channel is not zero afterwards.
@pytest.mark.parametrize("act", [nn.Sigmoid(), nn.Hardtanh(0.5, 1.0)], ids=["sigmoid", "hardtanh"])
def test_operations_that_do_not_keep_zero_keep_the_channel(act):
    model = sparsesam.sparsify(_ActivationNet(act)).double().eval()
    x = torch.randn(2, 2, 8, 8, dtype=torch.float64)
    channel_prune(model, 0.5)
    gate_pruned_channels(model, x)
    small, report = compact_channels(model, x)
    _assert_same_function(model, small, (2, 2, 8, 8))
    assert small.conv.out_channels == 6  # kept (exact) rather than removed (wrong)
    assert small.conv2.out_channels == 2  # mean and the Linear keep zeros: removed


def test_depthwise_convs_are_tied_to_the_layer_before():
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU6(),
        nn.Conv2d(8, 8, 3, padding=1, groups=8, bias=False), nn.BatchNorm2d(8), nn.ReLU6(),
        nn.Conv2d(8, 6, 1, bias=False), nn.BatchNorm2d(6), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, 5),
    )
    model = _with_statistics(sparsesam.sparsify(model).double(), (4, 3, 8, 8))
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    groups = coupled_channel_groups(model, x)
    assert ["0", "3"] in groups
    channel_prune(model, 0.5, coupled=groups)
    gate_pruned_channels(model, x)
    small, _ = compact_channels(model, x)
    _assert_same_function(model, small, (2, 3, 8, 8))
    assert small[0].out_channels == small[3].out_channels == small[3].groups == 4
    assert small[6].out_channels == 3


def test_bad_arguments():
    with pytest.raises(ValueError, match="no masked layers"):
        compact_channels(SmallCNN(), torch.randn(1, 1, 28, 28))
    model = _small_cnn()
    x = torch.randn(1, 1, 28, 28, dtype=torch.float64)
    with pytest.raises(ValueError, match="protect names modules the model does not have"):
        compact_channels(model, x, protect=["head"])
    gate_pruned_channels(model, x)
    with pytest.raises(ValueError, match="already gated"):
        gate_pruned_channels(model, x)
