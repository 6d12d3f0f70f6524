"""Score masks (HYDRA-style): the mask is top-k of |s| at the asked rate, the
straight-through gradient equals the reference sign(s) * G * W (G from plain
autograd on W*M), the rate gets sum(dL/dM), freezing, bad input."""
import math

import pytest
import torch
from torch import nn
import torch.nn.functional as F

import sparsesam
from sparsesam.models import SmallCNN
from sparsesam.nn import MaskedConv2d, MaskedLinear, masked_layers
from sparsesam.pruning import (attach_scores, freeze_scores, hydra_score_init, is_nm_sparse, score_mask,
                               score_parameters)


def _reference_mask(scores, granularity, keep_rate=None, n=2, m=4):
    """Independent of the implementation: thresholds and sorts by hand."""
    a = scores.detach().abs()
    if granularity == "unstructured":
        k = round(keep_rate * a.numel())
        threshold = a.flatten().sort(descending=True).values[k - 1]
        return (a >= threshold).to(a.dtype)
    if granularity == "channel":
        rows = a.flatten(1).sum(dim=1)
        k = round(keep_rate * rows.numel())
        keep = rows >= rows.sort(descending=True).values[k - 1]
        return keep.view(-1, *([1] * (a.dim() - 1))).expand_as(a).to(a.dtype)
    moved = a.movedim(1, -1)
    groups = moved.reshape(*moved.shape[:-1], -1, m)
    ranks = groups.argsort(dim=-1, descending=True).argsort(dim=-1)
    return (ranks < n).to(a.dtype).reshape(moved.shape).movedim(-1, 1)


def _layer(kind):
    if kind == "linear":
        return MaskedLinear(16, 10, mask_mode="trainable", dtype=torch.float64), torch.randn(5, 16, dtype=torch.float64)
    return (MaskedConv2d(8, 6, 3, padding=1, mask_mode="trainable", dtype=torch.float64),
            torch.randn(2, 8, 5, 5, dtype=torch.float64))


def test_hydra_init_is_scaled_weight():
    w = torch.randn(6, 4, 3, 3)
    s = hydra_score_init(w)
    torch.testing.assert_close(s, math.sqrt(6 / 36) * w / w.abs().max())
    assert torch.equal(s.abs().argsort(), w.abs().argsort())  # the first mask is the magnitude mask


@pytest.mark.parametrize("kind", ["linear", "conv"])
@pytest.mark.parametrize("granularity, keep_rate", [("unstructured", 0.3), ("channel", 0.5), ("nm", None)])
def test_ste_gradient_equals_reference(kind, granularity, keep_rate):
    layer, x = _layer(kind)
    attach_scores(nn.Sequential(layer), keep_rate, granularity=granularity, keep_output_layer=False)
    (scores,) = score_parameters(nn.Sequential(layer))
    with torch.no_grad():
        scores.copy_(torch.randn_like(scores))  # signs mixed, so sign(s) matters

    out = layer(x)
    upstream = torch.randn_like(out)
    (out * upstream).sum().backward()

    mask = _reference_mask(scores, granularity, keep_rate)
    effective = (layer.weight.detach() * mask).requires_grad_()
    ref_out = F.linear(x, effective, layer.bias) if kind == "linear" else F.conv2d(x, effective, layer.bias, padding=1)
    (ref_out * upstream).sum().backward()
    torch.testing.assert_close(out, ref_out)
    assert torch.equal(layer.weight_mask, mask)
    expected = torch.sign(scores.detach()) * effective.grad * layer.weight.detach()
    torch.testing.assert_close(scores.grad, expected, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("granularity, keep_rate, sparsity", [("unstructured", 0.2, 0.8), ("channel", 0.25, 0.75),
                                                               ("nm", None, 0.5)])
def test_model_masks_reach_the_rate(granularity, keep_rate, sparsity):
    model = sparsesam.sparsify(SmallCNN(width=8), mask_mode="trainable")
    attached = attach_scores(model, keep_rate, granularity=granularity)
    if granularity == "nm":
        assert "features.0" not in attached  # 1 input channel: not a multiple of m, left dense
    for name, layer in masked_layers(model):
        if name not in attached:
            continue
        assert layer.sparsity == pytest.approx(sparsity, abs=0.01), name
        mask = layer.weight_mask
        assert set(mask.unique().tolist()) <= {0.0, 1.0}
        if granularity == "channel":
            rows = mask.flatten(1)
            assert bool(((rows == 1).all(1) | (rows == 0).all(1)).all())
        if granularity == "nm":
            assert is_nm_sparse(mask, 2, 4, exact=True)
        if granularity == "unstructured":
            # HYDRA init: the first mask keeps the largest |w|.
            assert torch.equal(mask.bool(), _reference_mask(layer.weight, "unstructured", keep_rate).bool())
    # The scores are the only new parameters, and they are the mask parameters' storage.
    assert len(score_parameters(model)) == len(attached)
    F.cross_entropy(model(torch.randn(2, 1, 28, 28)), torch.tensor([1, 2])).backward()
    assert all(s.grad is not None and s.grad.abs().sum() > 0 for s in score_parameters(model))


def test_learnable_rate_receives_the_summed_mask_gradient():
    layer, x = _layer("linear")

    class SigmoidRate(nn.Module):  # HARP's r = sigmoid(p) * (1 - r_min) + r_min
        def __init__(self):
            super().__init__()
            self.p = nn.Parameter(torch.tensor(0.0, dtype=torch.float64))

        def forward(self):
            return torch.sigmoid(self.p) * 0.9 + 0.1

    rate = SigmoidRate()
    model = nn.Sequential(layer)
    attach_scores(model, {"0": rate})
    assert any(p is rate.p for p in model.parameters())  # the rate is part of the model
    assert layer.sparsity == pytest.approx(1 - 0.55, abs=0.01)
    out = layer(x)
    out.sum().backward()
    mask = layer.weight_mask.detach()
    effective = (layer.weight.detach() * mask).requires_grad_()
    F.linear(x, effective, layer.bias).sum().backward()
    dmask = effective.grad * layer.weight.detach()
    expected = dmask.sum() * 0.9 * torch.sigmoid(torch.tensor(0.0)) * (1 - torch.sigmoid(torch.tensor(0.0)))
    torch.testing.assert_close(rate.p.grad, expected.to(torch.float64))

    # A plain tensor / Parameter rate works too.
    layer2, x2 = _layer("linear")
    p = nn.Parameter(torch.tensor(0.5, dtype=torch.float64))
    attach_scores(nn.Sequential(layer2), p)
    layer2(x2).sum().backward()
    assert p.grad is not None and layer2.sparsity == pytest.approx(0.5, abs=0.01)


def test_freeze_scores_keeps_the_mask():
    model = sparsesam.sparsify(SmallCNN(width=8), mask_mode="trainable")
    attach_scores(model, 0.3)
    x = torch.randn(2, 1, 28, 28)
    model.eval()
    expected = model(x)
    masks = {name: layer.weight_mask.detach().clone() for name, layer in masked_layers(model)}
    sparsity = freeze_scores(model)
    assert sparsity["features.3"] == pytest.approx(0.7, abs=0.01)
    assert not score_parameters(model)
    for name, layer in masked_layers(model):
        assert type(layer) in (MaskedConv2d, MaskedLinear) and layer.mask_mode == "fixed"
        assert torch.equal(layer.weight_mask, masks[name].bool())
    torch.testing.assert_close(model(x), expected)
    exported = sparsesam.export(model)  # an ordinary masked model again
    torch.testing.assert_close(exported(x), expected, rtol=1e-5, atol=1e-5)


def test_bad_arguments_name_the_argument():
    fixed = sparsesam.sparsify(SmallCNN(width=8))
    with pytest.raises(ValueError, match="mask_mode='fixed'.*mask_mode='trainable'"):
        attach_scores(fixed, 0.5)
    model = sparsesam.sparsify(SmallCNN(width=8), mask_mode="trainable")
    for bad in (0.0, 1.5, -0.2):
        with pytest.raises(ValueError, match="keep_rate must be in"):
            attach_scores(model, bad)
    with pytest.raises(ValueError, match="granularity must be one of"):
        attach_scores(model, 0.5, granularity="block")
    with pytest.raises(ValueError, match="keep_rate must be None for granularity='nm'"):
        attach_scores(model, 0.5, granularity="nm")
    with pytest.raises(ValueError, match="keep_rate is required"):
        attach_scores(model, None)
    with pytest.raises(ValueError, match="n must be in"):
        attach_scores(model, None, granularity="nm", n=5, m=4)
    with pytest.raises(ValueError, match="init must be one of"):
        attach_scores(model, 0.5, init="snip")
    with pytest.raises(ValueError, match="keep_rate has no entry"):
        attach_scores(model, {"features.0": 0.5})
    with pytest.raises(ValueError, match="keep_rate must be in"):
        score_mask(torch.randn(4, 4), torch.tensor(2.0))
    with pytest.raises(ValueError, match="no scored layers"):
        freeze_scores(model)
    attach_scores(model, 0.5)
    with pytest.raises(ValueError, match="already has scores"):
        attach_scores(model, 0.5)


def test_a_bad_argument_leaves_the_model_unchanged():
    model = sparsesam.sparsify(SmallCNN(width=8), mask_mode="trainable")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="keep_rate has no entry for layer 'features.3'"):
        attach_scores(model, {"features.0": 0.5})  # features.0 would be valid: nothing may change yet
    assert not score_parameters(model)
    after = model.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)


def test_scored_model_state_dict_round_trip():
    model = sparsesam.sparsify(SmallCNN(width=8), mask_mode="trainable")
    attach_scores(model, 0.4)
    with torch.no_grad():
        for s in score_parameters(model):
            s.copy_(torch.randn_like(s))  # masks no longer the magnitude ones
    state = model.state_dict()
    assert "features.3.parametrizations.weight_mask.original" in state
    clone = sparsesam.sparsify(SmallCNN(width=8), mask_mode="trainable")
    attach_scores(clone, 0.4)
    clone.load_state_dict(state)
    x = torch.randn(2, 1, 28, 28)
    torch.testing.assert_close(clone.eval()(x), model.eval()(x))
    for (_, a), (_, b) in zip(masked_layers(model), masked_layers(clone)):
        assert torch.equal(a.weight_mask, b.weight_mask)


def test_scored_layers_export_their_current_mask_and_refuse_set_mask():
    model = sparsesam.sparsify(SmallCNN(width=8), mask_mode="trainable")
    attach_scores(model, 0.3)
    model.eval()
    x = torch.randn(2, 1, 28, 28)
    expected = model(x)
    exported = sparsesam.export(model)
    assert not any(True for _ in masked_layers(exported))
    torch.testing.assert_close(exported(x), expected, rtol=1e-5, atol=1e-5)
    layer = next(layer for _, layer in masked_layers(model))
    with pytest.raises(RuntimeError, match="freeze_scores"):
        layer.set_mask(torch.ones_like(layer.weight))
