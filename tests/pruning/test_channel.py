"""Channel criteria (L2, Taylor) against plain-autograd references, channel masks
(whole channels, targets within 1%, classifier kept, coupled layers pruned alike)."""
import pytest
import torch
from torch import nn
import torch.nn.functional as F

import sparsesam
from sparsesam.models import ResNet18, SmallCNN
from sparsesam.nn import masked_layers
from sparsesam.pruning import (TaylorAccumulator, accumulate_taylor, channel_l2_norms, channel_prune, channel_scores,
                               channel_sparsity, coupled_channel_groups, prune_channels)


def _small_cnn(width=8):
    model = sparsesam.sparsify(SmallCNN(width=width))
    for _, layer in masked_layers(model):  # some unstructured sparsity first: criteria must read W*M
        layer.set_mask(torch.rand_like(layer.weight) > 0.3)
    return model


def _is_channel_mask(mask):
    rows = mask.reshape(mask.shape[0], -1).ne(0)
    return bool((rows.all(dim=1) | ~rows.any(dim=1)).all())


def test_l2_norms_are_the_effective_weights_row_norms():
    model = _small_cnn()
    for name, layer in masked_layers(model):
        expected = (layer.weight * layer.weight_mask).detach().double().flatten(1).norm(dim=1)
        torch.testing.assert_close(channel_l2_norms(layer).double(), expected, rtol=1e-6, atol=1e-7)


def test_taylor_accumulator_matches_plain_autograd_over_batches():
    model = _small_cnn().train()
    plain = sparsesam.export(model).train()  # nn layers holding W*M: their grad is G = dL/d(W*M)
    batches = [(torch.randn(4, 1, 28, 28), torch.randint(0, 10, (4,))) for _ in range(3)]
    expected = {name: torch.zeros(layer.weight.shape[0], dtype=torch.float64) for name, layer in masked_layers(model)}
    plain_layers = dict(plain.named_modules())
    for x, y in batches:
        plain.zero_grad()
        F.cross_entropy(plain(x), y).backward()
        for name in expected:
            w = plain_layers[name].weight
            expected[name] += (w.double() * w.grad.double()).flatten(1).sum(dim=1).abs() / len(batches)

    with TaylorAccumulator(model) as taylor:
        for x, y in batches:
            model.zero_grad()
            F.cross_entropy(model(x), y).backward()
    assert taylor.num_batches == 3
    got = taylor.scores()
    assert got.keys() == expected.keys()
    for name in expected:
        torch.testing.assert_close(got[name].double(), expected[name], rtol=1e-4, atol=1e-7)
    # Hooks are off after the block: more backward passes change nothing.
    F.cross_entropy(model(batches[0][0]), batches[0][1]).backward()
    assert taylor.num_batches == 3

    # The one-call helper gives the same and leaves .grad as it was.
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    again = accumulate_taylor(model, batches, F.cross_entropy, num_batches=3)
    for name in expected:
        torch.testing.assert_close(again[name].double(), expected[name], rtol=1e-4, atol=1e-7)
    for n, p in model.named_parameters():
        assert torch.equal(p.grad, grads[n])


@pytest.mark.parametrize("scope", ["layer", "global"])
@pytest.mark.parametrize("criterion", ["l2", "taylor"])
def test_channel_prune_reaches_target_with_whole_channels(scope, criterion):
    model = sparsesam.sparsify(ResNet18(width=16))
    taylor = None
    if criterion == "taylor":
        taylor = TaylorAccumulator(model)
        with taylor:
            for _ in range(2):
                F.cross_entropy(model(torch.randn(4, 3, 16, 16)), torch.randint(0, 10, (4,))).backward()
    pruned = channel_prune(model, 0.4, criterion=criterion, taylor=taylor, scope=scope,
                           normalize="mean" if scope == "global" else None)
    assert "fc" not in pruned  # the classifier keeps its outputs by default
    assert model.fc.sparsity == 0.0
    assert channel_sparsity(model) == pytest.approx(0.4, abs=0.01)
    for name, layer in masked_layers(model):
        assert _is_channel_mask(layer.weight_mask), name
        if scope == "layer" and name != "fc":
            assert pruned[name] == pytest.approx(0.4, abs=1.0 / layer.weight.shape[0])


def test_channel_prune_keeps_the_highest_scores_and_is_cumulative():
    model = sparsesam.sparsify(nn.Sequential(nn.Linear(6, 10), nn.ReLU(), nn.Linear(10, 3)))
    layer = model[0]
    with torch.no_grad():
        layer.weight.copy_(torch.arange(1, 11, dtype=torch.float32).flip(0).unsqueeze(1).expand(10, 6))
    channel_prune(model, 0.3)  # rows 7, 8, 9 have the smallest norms
    assert torch.equal(layer.weight_mask.any(dim=1), torch.arange(10) < 7)
    # Scores read W*M: the empty rows rank lowest, so more pruning adds to them.
    channel_prune(model, 0.5)
    assert torch.equal(layer.weight_mask.any(dim=1), torch.arange(10) < 5)
    # min_channels: a layer never loses all its channels.
    assert prune_channels(model, {"0": torch.zeros(10)}, 0.99, min_channels=2)["0"] == pytest.approx(0.8)


def test_coupled_layers_lose_the_same_channels():
    pytest.importorskip("torch_pruning")
    model = sparsesam.sparsify(ResNet18(width=8))
    groups = coupled_channel_groups(model, torch.randn(2, 3, 16, 16))
    # The stem and the residual stream of stage 1, and each later stage's stream, are tied.
    assert groups[0] == ["conv1", "layers.0.conv2", "layers.1.conv2"]
    assert ["layers.2.conv2", "layers.2.shortcut.0", "layers.3.conv2"] in groups
    channel_prune(model, 0.5, coupled=groups, scope="global")
    layers = dict(masked_layers(model))
    for group in groups:
        kept = [layers[name].weight_mask.flatten(1).any(dim=1) for name in group]
        assert all(torch.equal(k, kept[0]) for k in kept), group
    assert channel_sparsity(model) == pytest.approx(0.5, abs=0.01)


def test_bad_arguments_name_the_argument():
    model = _small_cnn()
    for bad in (1.0, -0.1, 1.5):
        with pytest.raises(ValueError, match="fraction must be in"):
            channel_prune(model, bad)
    with pytest.raises(ValueError, match="criterion must be one of"):
        channel_prune(model, 0.5, criterion="hessian")
    with pytest.raises(ValueError, match="scope must be one of"):
        channel_prune(model, 0.5, scope="network")
    with pytest.raises(ValueError, match="normalize must be one of"):
        channel_prune(model, 0.5, normalize="l1")
    with pytest.raises(TypeError, match="needs taylor=TaylorAccumulator"):
        channel_prune(model, 0.5, criterion="taylor")
    with pytest.raises(ValueError, match="min_channels"):
        channel_prune(model, 0.5, min_channels=0)
    scores = channel_scores(model)
    del scores["features.0"]
    with pytest.raises(ValueError, match="scores has no entry for layer 'features.0'"):
        prune_channels(model, scores, 0.5)
    with pytest.raises(ValueError, match=r"scores\['features.3'\] must be a tensor of shape"):
        prune_channels(model, {**channel_scores(model), "features.3": torch.ones(3)}, 0.5)
    with pytest.raises(ValueError, match="saw no backward pass|no backward pass was recorded"):
        TaylorAccumulator(model).scores()
    with pytest.raises(ValueError, match="no masked layers"):
        channel_prune(SmallCNN(), 0.5)
