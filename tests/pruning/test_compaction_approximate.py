"""compact_channels(exact=False) on torchvision's DenseNet: exact compaction keeps the growth channels (a zero
channel is a BatchNorm constant in every later layer), the opt-in non-exact one removes them, and its small
model is the masked model with exactly those BatchNorm constants dropped."""
import copy

import pytest
import torch
from torch import nn

import sparsesam
from sparsesam.pruning import channel_prune, compact_channels, coupled_channel_groups, gate_pruned_channels

pytest.importorskip("torch_pruning")
models = pytest.importorskip("torchvision.models")


def _pruned_densenet():
    torch.manual_seed(0)
    # torchvision's DenseNet with few channels: 2 layers per block, growth 8.
    model = models.DenseNet(growth_rate=8, block_config=(2, 2, 2, 2), num_init_features=16, bn_size=2,
                            num_classes=10)
    model = sparsesam.sparsify(model).double()
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.weight.uniform_(0.5, 1.5)
                module.bias.uniform_(-0.5, 0.5)
        model.train()
        model(torch.randn(4, 3, 32, 32, dtype=torch.float64))
    model.eval()
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    channel_prune(model, 0.5, coupled=coupled_channel_groups(model, x))
    gate_pruned_channels(model, x)
    return model, x


def test_exact_compaction_keeps_densenets_growth_channels():
    model, x = _pruned_densenet()
    small, report = compact_channels(model, x)
    assert report.max_abs_diff < 1e-12
    # Only the bottleneck convs (conv1, whose BatchNorm is their only consumer) lose channels.
    assert set(report.channels_removed) == {n for n, _ in model.named_modules() if n.endswith(".conv1")}
    assert small.features.denseblock1.denselayer1.conv2.out_channels == 8


def test_non_exact_compaction_removes_them_and_drops_only_their_batchnorm_constants():
    model, x = _pruned_densenet()
    _, exact = compact_channels(model, x)
    small, report = compact_channels(model, x, exact=False)
    assert report.param_ratio < 0.75 * exact.param_ratio
    assert small.features.denseblock1.denselayer1.conv2.out_channels == 4  # half the growth channels
    assert small.classifier.out_features == 10
    assert report.max_abs_diff > 1e-6  # not the same function: the constants are gone
    # The masked model with the removed channels' BatchNorm affine entries zeroed (so those channels are
    # exactly zero everywhere) is the small model's function, in eval and in train mode.
    reference = copy.deepcopy(model)
    modules = dict(reference.named_modules())
    with torch.no_grad():
        for name, kept in report.kept.items():
            if isinstance(modules[name], nn.BatchNorm2d):
                dropped = sorted(set(range(modules[name].num_features)) - set(kept["0"]))
                modules[name].weight[dropped] = 0
                modules[name].bias[dropped] = 0
        for train in (False, True):
            reference.train(train), small.train(train)
            torch.testing.assert_close(small(x), reference(x), rtol=1e-9, atol=1e-9)


def test_non_exact_compaction_still_keeps_live_and_protected_channels():
    model, x = _pruned_densenet()
    small, _ = compact_channels(model, x, exact=False, protect=["features.conv0"])
    assert small.features.conv0.out_channels == 16
    unpruned = sparsesam.sparsify(models.DenseNet(growth_rate=8, block_config=(2, 2), num_init_features=16,
                                                  bn_size=2, num_classes=10)).double().eval()
    small, report = compact_channels(unpruned, x, exact=False)  # nothing is pruned: nothing goes
    assert report.params_after == report.params_before and report.max_abs_diff == 0
