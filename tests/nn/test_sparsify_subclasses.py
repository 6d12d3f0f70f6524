"""Subclasses of nn.Linear / nn.Conv2d: those with their own forward (timm's Conv2dSame) are masked and compute
with W*M; those that keep the torch layer's forward (MultiheadAttention's out_proj) are left dense and named."""
import warnings

import pytest
import torch
from torch import nn
import torch.nn.functional as F

import sparsesam
from sparsesam.nn import export, left_dense, masked_layers, set_execution
from sparsesam.pruning import magnitude_prune


class PaddedConv(nn.Conv2d):
    """A conv with its own forward (reflect-pads by one, then convolves): like timm's Conv2dSame."""

    def forward(self, x):
        return F.conv2d(F.pad(x, (1, 1, 1, 1), mode="reflect"), self.weight, self.bias, self.stride, 0,
                        self.dilation, self.groups)


class ReadDirectly(nn.Linear):
    """A subclass with the torch forward, whose weight the parent reads without calling it (as MHA does)."""


class Parent(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = PaddedConv(3, 4, 3)
        self.head = ReadDirectly(4, 2)

    def forward(self, x):
        return F.linear(self.conv(x).mean((2, 3)), self.head.weight, self.head.bias)


def _sparsified(model):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        sparsesam.sparsify(model)
    return [str(w.message) for w in caught]


def test_own_forward_subclass_is_masked_and_computes_with_w_times_m():
    torch.manual_seed(0)
    model = Parent()
    dense_state = {k: v.clone() for k, v in model.state_dict().items()}
    messages = _sparsified(model)
    conv = model.conv
    assert isinstance(conv, PaddedConv) and type(conv).__name__ == "MaskedPaddedConv"
    assert [name for name, _ in masked_layers(model)] == ["conv"]
    mask = torch.rand_like(conv.weight) > 0.5
    conv.set_mask(mask)
    x = torch.rand(2, 3, 6, 6)
    expected = F.conv2d(F.pad(x, (1, 1, 1, 1), mode="reflect"), conv.weight * mask, conv.bias)
    torch.testing.assert_close(conv(x), expected)
    assert isinstance(conv.weight, nn.Parameter)  # the parameter is back after the call
    conv(x).square().sum().backward()
    assert conv.weight.grad[~mask].abs().max() == 0 and conv.weight.grad[mask].abs().max() > 0
    # The subclass left dense is named, once.
    assert len(messages) == 1 and "head (ReadDirectly)" in messages[0]
    assert left_dense(model) == {"head": "ReadDirectly"}
    # A dense checkpoint loads (the mask stays); keys are the dense ones plus the mask.
    assert set(model.state_dict()) == set(dense_state) | {"conv.weight_mask"}
    model.load_state_dict(dense_state)
    assert torch.equal(conv.weight_mask, mask)


def test_excluded_layers_are_not_reported():
    model = Parent()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        sparsesam.sparsify(model, exclude="head")
    assert left_dense(model) == {"head": "ReadDirectly"}


def test_export_gives_back_the_subclass_with_baked_weights():
    torch.manual_seed(0)
    model = Parent()
    _sparsified(model)
    magnitude_prune(model, 0.5)
    x = torch.rand(2, 3, 6, 6)
    plain = export(model)
    assert type(plain.conv) is PaddedConv and not hasattr(plain.conv, "weight_mask")
    torch.testing.assert_close(plain(x), model(x))
    assert (plain.conv.weight == 0).float().mean() >= 0.5


def test_sparse_execution_keeps_the_subclass_dense():
    torch.manual_seed(0)
    model = nn.Sequential(PaddedConv(3, 4, 3), nn.Flatten(), nn.Linear(4 * 36, 2))
    _sparsified(model)
    magnitude_prune(model, 0.8)
    x = torch.rand(2, 3, 6, 6)
    expected = model(x)
    set_execution(model, "sparse")
    assert type(model[0]).__name__ == "MaskedPaddedConv"  # its forward is its own: no sparse form
    torch.testing.assert_close(model(x), expected)


def test_timm_conv2d_same_in_an_efficientnet():
    timm = pytest.importorskip("timm")
    from timm.layers import Conv2dSame
    torch.manual_seed(0)
    model = timm.create_model("tf_efficientnet_b0", pretrained=False, num_classes=5).eval()
    same = [name for name, m in model.named_modules() if type(m) is Conv2dSame]
    assert same  # the TF-ported EfficientNet pads "same" dynamically
    messages = _sparsified(model)
    assert not messages and not left_dense(model)
    masked = dict(masked_layers(model))
    assert all(isinstance(masked[name], Conv2dSame) for name in same)
    magnitude_prune(model, 0.7)
    x = torch.rand(1, 3, 33, 33)  # odd size: Conv2dSame pads asymmetrically
    with torch.no_grad():
        torch.testing.assert_close(export(model).eval()(x), model(x))
        # The masks act: the same weights without masks give another function.
        unmasked = export(model)
        for name, layer in masked_layers(model):
            dict(unmasked.named_modules())[name].weight.copy_(layer.weight)
        assert not torch.allclose(unmasked.eval()(x), model(x))
