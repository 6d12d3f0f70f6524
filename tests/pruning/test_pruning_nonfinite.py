"""Pruning never ranks garbage: NaN / inf weights or scores are refused with a
message naming the layer (before any mask changes), sparsity must be a real
number, and include / exclude selectors of the wrong type are named."""
import pytest
import torch

import sparsesam
from sparsesam.models import SmallCNN
from sparsesam.nn import masked_layers
from sparsesam.pruning import (TaylorAccumulator, bsr_magnitude_mask, channel_prune, channel_scores,
                               magnitude_prune, nm_mask, nm_prune, prune_channels)

NAN, INF = float("nan"), float("inf")


def _model():
    torch.manual_seed(0)
    return sparsesam.sparsify(SmallCNN(width=8))


def _masks(model):
    return {name: layer.weight_mask.detach().clone() for name, layer in masked_layers(model)}


def _poison(model, layer_name, value):
    layer = dict(masked_layers(model))[layer_name]
    with torch.no_grad():
        layer.weight.view(-1)[3] = value


def _assert_masks_unchanged(model, before):
    for name, mask in _masks(model).items():
        assert torch.equal(mask, before[name]), name


@pytest.mark.parametrize("value", [NAN, INF, -INF])
@pytest.mark.parametrize("scope", ["global", "layer"])
def test_magnitude_prune_refuses_non_finite_weights(value, scope):
    model = _model()
    _poison(model, "features.3", value)
    before = _masks(model)
    with pytest.raises(ValueError, match=r"the weight of layer 'features.3' contains NaN or inf"):
        magnitude_prune(model, 0.5, scope=scope)
    _assert_masks_unchanged(model, before)


@pytest.mark.parametrize("sparsity, error, words", [("0.5", TypeError, "sparsity must be a float"),
                                                     (None, TypeError, "sparsity must be a float"),
                                                     (True, TypeError, "sparsity must be a float"),
                                                     (NAN, ValueError, r"sparsity must be in \[0, 1\)"),
                                                     (1.0, ValueError, r"sparsity must be in \[0, 1\)")])
def test_magnitude_prune_sparsity_must_be_a_number_in_range(sparsity, error, words):
    with pytest.raises(error, match=words):
        magnitude_prune(_model(), sparsity)


def test_magnitude_prune_still_prunes_finite_weights():
    model = _model()
    result = magnitude_prune(model, 0.5, scope="layer")
    assert all(s == pytest.approx(0.5, abs=0.01) for s in result.values())


@pytest.mark.parametrize("value", [NAN, INF])
def test_channel_criteria_refuse_non_finite_weights_and_scores(value):
    model = _model()
    _poison(model, "features.3", value)
    before = _masks(model)
    with pytest.raises(ValueError, match=r"the weight of layer 'features.3' contains NaN or inf"):
        channel_prune(model, 0.25)
    _assert_masks_unchanged(model, before)

    model = _model()
    scores = channel_scores(model)
    scores["features.7"][1] = value       # +inf would pass for a reserved channel in global ranking
    before = _masks(model)
    for scope in ("layer", "global"):
        with pytest.raises(ValueError, match=r"scores\['features.7'\] contains NaN or inf"):
            prune_channels(model, scores, 0.25, scope=scope)
    _assert_masks_unchanged(model, before)


def test_taylor_scores_of_a_non_finite_loss_are_refused():
    model = _model()
    x, y = torch.randn(4, 1, 28, 28), torch.randint(0, 10, (4,))
    with TaylorAccumulator(model) as taylor:
        (torch.nn.functional.cross_entropy(model(x), y) * NAN).backward()
    with pytest.raises(ValueError, match="the Taylor scores of layer 'features.0' contains NaN or inf"):
        channel_scores(model, "taylor", taylor)


@pytest.mark.parametrize("value", [NAN, INF])
def test_nm_refuses_non_finite_weights_and_scores(value):
    scores = torch.rand(4, 8)
    scores[2, 5] = value
    with pytest.raises(ValueError, match="scores contains NaN or inf"):
        nm_mask(scores, 2, 4)
    model = _model()
    _poison(model, "features.7", value)
    before = _masks(model)
    with pytest.raises(ValueError, match=r"the weight of layer 'features.7' contains NaN or inf"):
        nm_prune(model, 2, 4)
    _assert_masks_unchanged(model, before)       # features.3 comes first: it was not pruned either


@pytest.mark.parametrize("value", [NAN, INF])
def test_block_pruning_refuses_non_finite_weights(value):
    weight = torch.randn(8, 8)
    weight[5, 1] = value
    with pytest.raises(ValueError, match="weight contains NaN or inf"):
        bsr_magnitude_mask(weight, 0.5, (2, 2))


@pytest.mark.parametrize("argument", ["include", "exclude"])
def test_pruning_selectors_of_the_wrong_type_name_the_argument(argument):
    with pytest.raises(TypeError, match=f"{argument} must be a glob pattern"):
        nm_prune(_model(), 2, 4, **{argument: 123})
    with pytest.raises(TypeError, match=f"{argument} must be a glob pattern"):
        channel_prune(_model(), 0.25, **{argument: 4.5})
    # A single pattern string still means one pattern (not its characters).
    result = nm_prune(_model(), 2, 4, include="features.3")
    assert set(result) == {"features.3"}
