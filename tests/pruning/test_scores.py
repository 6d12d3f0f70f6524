"""Score masks (HYDRA / HARP): the mask is top-k of |s| at the asked rate with
GetSubnet's kept count, the straight-through gradient equals the reference
sign(s) * G * W (G from plain autograd on W*M; summed over the channel for
channel scores), the rate gets sum(dL/dM), the fused ScoreToMask equals the
plain-Python straight-through estimator, freezing, bad input."""
import math

import pytest
import torch
from torch import nn
import torch.nn.functional as F
from torch.nn.utils import parametrize

import sparsesam
from sparsesam.models import SmallCNN
from sparsesam.nn import MaskedConv2d, MaskedLinear, masked_layers
from sparsesam.pruning import (attach_scores, freeze_scores, hydra_score_init, is_nm_sparse, kept_count, score_mask,
                               score_parameters, top_k_by_threshold)
from tolerance import assert_within_torch_error


def _reference_mask(scores, granularity, keep_rate=None, n=2, m=4, weight_shape=None):
    """Independent of the implementation: thresholds and sorts by hand."""
    a = scores.detach().abs()
    if granularity == "unstructured":
        # GetSubnet: sort, zero the lowest int((1 - k) * numel).
        pruned = int((1 - keep_rate) * a.numel())
        threshold = a.flatten().sort().values[pruned]
        return (a >= threshold).to(a.dtype)
    if granularity == "channel":
        # One score per output channel; GetSubnet keeps round(k * C).
        rows = a.flatten()
        k = round(keep_rate * rows.numel())
        keep = rows >= rows.sort(descending=True).values[k - 1]
        return keep.view(-1, *([1] * (len(weight_shape) - 1))).expand(*weight_shape).to(a.dtype)
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
    # Channels: one score per output channel, its L1 norm scaled (fan-in of a [C, 1, 1, 1] tensor: 1).
    c = hydra_score_init(w, "channel")
    norms = w.abs().flatten(1).sum(1)
    assert c.shape == (6, 1, 1, 1)
    torch.testing.assert_close(c.flatten(), math.sqrt(6) * norms / norms.max())


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

    mask = _reference_mask(scores, granularity, keep_rate, weight_shape=layer.weight.shape)
    effective = (layer.weight.detach() * mask).requires_grad_()
    ref_out = F.linear(x, effective, layer.bias) if kind == "linear" else F.conv2d(x, effective, layer.bias, padding=1)
    (ref_out * upstream).sum().backward()
    torch.testing.assert_close(out, ref_out)
    assert torch.equal(layer.weight_mask, mask)
    dmask = effective.grad * layer.weight.detach()
    if granularity == "channel":
        dmask = dmask.flatten(1).sum(1).view_as(scores)
    expected = torch.sign(scores.detach()) * dmask
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
        assert layer.sparsity == pytest.approx(sparsity, abs=0.02), name
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
        if granularity == "channel":
            # HYDRA init: the first mask keeps the channels of largest L1 norm.
            norms = layer.weight.detach().abs().flatten(1).sum(1)
            assert torch.equal(mask.flatten(1)[:, 0].bool(),
                               _reference_mask(norms, "channel", keep_rate, weight_shape=norms.shape).bool())
    # The scores are the only new parameters, and they are the mask parameters' storage.
    assert len(score_parameters(model)) == len(attached)
    F.cross_entropy(model(torch.randn(2, 1, 28, 28)), torch.tensor([1, 2])).backward()
    assert all(s.grad is not None and s.grad.abs().sum() > 0 for s in score_parameters(model))


def test_learnable_rate_receives_the_summed_mask_gradient():
    layer, x = _layer("linear")

    class SigmoidRate(nn.Module):  # HARP's k = sigmoid(p) * (1 - k_min) + k_min
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
    with pytest.raises(ValueError, match="keep_rate must be a number or a one-element tensor"):
        score_mask(torch.randn(4, 4), torch.tensor([0.5, 0.5]))
    with pytest.raises(TypeError, match="scores must be a floating"):
        score_mask(torch.ones(4, 4, dtype=torch.int64), 0.5)
    with pytest.raises(ValueError, match="scores contain NaN"):
        score_mask(torch.tensor([[1.0, float("nan")], [0.5, 2.0]]), 0.5)
    with pytest.raises(ValueError, match="keep_rate must be in"):
        score_mask(torch.randn(4, 4), torch.tensor(float("nan")))
    with pytest.raises(ValueError, match=r"scores have shape \(4, 4\), but channel masks .* need \(4, 1\)"):
        score_mask(torch.randn(4, 4), 0.5, granularity="channel", weight_shape=(4, 4))
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
    # The original model is untouched by exporting a copy (parametrize's classes are shared by copies).
    torch.testing.assert_close(model(x), expected, rtol=0, atol=0)
    assert all(parametrize.is_parametrized(layer, "weight_mask") for _, layer in masked_layers(model))
    layer = next(layer for _, layer in masked_layers(model))
    with pytest.raises(RuntimeError, match="freeze_scores"):
        layer.set_mask(torch.ones_like(layer.weight))


# ---------------------------------------------------------------------------
# The fused ScoreToMask against the plain-Python straight-through estimator


class PythonGetSubnet(torch.autograd.Function):
    """HARP's / HYDRA's GetSubnet in plain PyTorch (models/layers.py): a full sort per forward,
    the mask gradient straight through to |s| and its sum to the rate."""

    @staticmethod
    def forward(ctx, abs_scores, rate, granularity):
        flat = abs_scores.flatten()
        out = torch.zeros_like(flat)
        order = flat.sort(stable=True, descending=True).indices  # ties: the lower index first
        total = flat.numel()
        rate_dtype = rate.dtype if isinstance(rate, torch.Tensor) else torch.float64  # GetSubnet: the rate's dtype
        kept = kept_count(float(rate), total, granularity, rate_dtype)
        out[order[:kept]] = 1
        return out.view_as(abs_scores)

    @staticmethod
    def backward(ctx, g):
        return g, g.sum(), None


class PythonNMStraightThrough(torch.autograd.Function):
    """N:M by a sort within each group of m, the gradient straight through."""

    @staticmethod
    def forward(ctx, abs_scores, n, m):
        moved = abs_scores.movedim(1, -1)
        groups = moved.reshape(*moved.shape[:-1], -1, m)
        ranks = groups.sort(dim=-1, descending=True, stable=True).indices.argsort(dim=-1)
        return (ranks < n).to(abs_scores.dtype).reshape(moved.shape).movedim(-1, 1)

    @staticmethod
    def backward(ctx, g):
        return g, None, None


def _python_mask(scores, rate, granularity, weight_shape):
    if granularity == "nm":
        return PythonNMStraightThrough.apply(scores.abs(), 2, 4)
    mask = PythonGetSubnet.apply(scores.abs(), rate, granularity)
    return mask.expand(*weight_shape) if granularity == "channel" else mask


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("granularity, rate_value", [(g, r) for g in ("unstructured", "channel")
                                                     for r in (1e-4, 0.3, 0.5, 1.0)] + [("nm", None)])
@pytest.mark.parametrize("weight_shape", [(6, 4, 3, 3), (10, 8), (1, 4)])
def test_fused_and_python_straight_through_give_the_same_gradients(dtype, granularity, weight_shape, rate_value):
    gen = torch.Generator().manual_seed(17)
    shape = (weight_shape[0],) + (1,) * (len(weight_shape) - 1) if granularity == "channel" else weight_shape
    base = torch.randn(shape, generator=gen, dtype=torch.float64)
    upstream = torch.randn(weight_shape, generator=gen, dtype=torch.float64)  # dL/dM

    def run(fused, dt):
        scores = base.to(dt).requires_grad_()
        rate = torch.tensor(rate_value, dtype=dt, requires_grad=True) if granularity != "nm" else None
        if fused:
            mask = score_mask(scores, rate, granularity, weight_shape=weight_shape)
        else:
            mask = _python_mask(scores, rate, granularity, weight_shape)
        (mask * upstream.to(dt)).sum().backward()
        return mask.detach(), scores.grad, None if rate is None else rate.grad

    mask, score_grad, rate_grad = run(True, dtype)
    py_mask, py_score_grad, py_rate_grad = run(False, dtype)
    _, ref_score_grad, ref_rate_grad = run(False, torch.float64)
    assert torch.equal(mask, py_mask)
    if granularity != "channel":
        # sign(s) * dM, one product each: the same bits.
        assert torch.equal(score_grad, py_score_grad)
    else:
        # Per-channel sums of dM: another summation order, PyTorch's own error at most (twice).
        assert_within_torch_error("channel score grad", score_grad, py_score_grad, ref_score_grad,
                                  reduction_size=upstream[0].numel())
    if granularity != "nm":
        assert_within_torch_error("rate grad", rate_grad.reshape(1), py_rate_grad.reshape(1),
                                  ref_rate_grad.reshape(1), reduction_size=upstream.numel())


def test_fused_gradients_through_a_masked_layer_equal_the_python_estimator():
    # The fused path takes dM = G*W from the masked layer's own backward: same gradients as plain autograd on W*M.
    torch.manual_seed(3)
    layer = MaskedConv2d(4, 6, 3, padding=1, mask_mode="trainable", dtype=torch.float64)
    rate = nn.Parameter(torch.tensor(0.4, dtype=torch.float64))
    attach_scores(nn.Sequential(layer), rate, keep_output_layer=False)
    (scores,) = score_parameters(nn.Sequential(layer))
    with torch.no_grad():
        scores.copy_(torch.randn_like(scores))
    x = torch.randn(2, 4, 5, 5, dtype=torch.float64)
    layer(x).square().sum().backward()

    py_scores = scores.detach().clone().requires_grad_()
    py_rate = rate.detach().clone().requires_grad_()
    weight = layer.weight.detach()
    F.conv2d(x, weight * _python_mask(py_scores, py_rate, "unstructured", weight.shape), layer.bias,
             padding=1).square().sum().backward()
    torch.testing.assert_close(scores.grad, py_scores.grad, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(rate.grad, py_rate.grad, rtol=1e-12, atol=1e-12)


def test_threshold_selection_keeps_exactly_k_and_breaks_ties_by_index():
    values = torch.tensor([3.0, 1.0, 2.0, 2.0, 2.0, 0.5, 2.0, 3.0])
    for k in range(1, values.numel() + 1):
        kept = top_k_by_threshold(values, k)
        expected = torch.zeros(values.numel(), dtype=torch.bool)
        expected[values.sort(descending=True, stable=True).indices[:k]] = True
        assert torch.equal(kept, expected), k
    # All equal: the first k.
    assert top_k_by_threshold(torch.zeros(2, 3), 4).flatten().tolist() == [True] * 4 + [False] * 2
    # Against a sort on random data of several shapes.
    gen = torch.Generator().manual_seed(0)
    for shape in [(1,), (17,), (5, 4, 3, 3), (100, 33)]:
        v = torch.randn(shape, generator=gen).abs()
        for k in (1, v.numel() // 3 + 1, v.numel()):
            expected = torch.zeros(v.numel(), dtype=torch.bool)
            expected[v.flatten().topk(k).indices] = True
            assert torch.equal(top_k_by_threshold(v, k).flatten(), expected)


@pytest.mark.parametrize("rate, total, granularity, expected", [
    (0.3, 72, "unstructured", 22),   # GetSubnet: 72 - int(0.7 * 72) = 72 - 50
    (1.0, 10, "unstructured", 10),
    (1e-6, 10, "unstructured", 1),   # at least one kept
    (0.25, 8, "channel", 2),         # round(0.25 * 8)
    (0.01, 8, "channel", 1),         # round would keep none: at least one
    (0.3125, 8, "channel", 2),       # round(2.5) = 2: half to even, as torch.round
])
def test_kept_count_is_get_subnets(rate, total, granularity, expected):
    assert kept_count(rate, total, granularity) == expected


def test_rates_at_the_extremes_still_get_their_gradient():
    scores = torch.randn(5, 6, dtype=torch.float64, requires_grad=True)
    for value, kept in [(1.0, 30), (1e-9, 1)]:
        rate = torch.tensor(value, dtype=torch.float64, requires_grad=True)
        mask = score_mask(scores, rate)
        assert int(mask.sum()) == kept
        upstream = torch.randn(5, 6, dtype=torch.float64)
        (mask * upstream).sum().backward()
        torch.testing.assert_close(rate.grad, upstream.sum())
        scores.grad = None


def test_kept_count_rounds_in_the_rates_dtype_as_getsubnet():
    # intellisec/harp GetSubnet: j = int((1 - k) * numel) with k a float32 tensor, so the product is
    # float32: for k = float32(0.001) and 1000 weights it is 999.0 (keeps 1), where double gives 998.99..
    # (keeps 2).
    rate = torch.tensor(0.001, dtype=torch.float32)
    official = 1000 - int((1 - rate) * 1000)
    assert official == 1
    assert kept_count(float(rate), 1000, "unstructured", torch.float32) == official
    assert kept_count(float(rate), 1000, "unstructured", torch.float64) == 2
    mask = score_mask(torch.arange(1.0, 1001.0), rate)
    assert int(mask.sum()) == official
