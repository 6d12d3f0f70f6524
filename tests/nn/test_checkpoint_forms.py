"""A fixed-mask model's state_dict loads into the model in any other form (dense masked <-> CSR, BSR,
N:M; conv and linear), exactly and with strict=True: the same state as converting the saved model."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import sparsesam
from sparsesam.nn import MaskedLinear, execution_summary, set_execution
from sparsesam.pruning import bsr_magnitude_mask, nm_mask

LAYERS = ("conv1", "conv2", "fc1", "fc2")


class SmallCNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 16, 3, stride=2, padding=1)
        self.fc1 = nn.Linear(16 * 4 * 4, 64)
        self.fc2 = nn.Linear(64, 16)

    def forward(self, x):
        h = torch.relu(self.conv2(torch.relu(self.conv1(x))))
        return self.fc2(torch.relu(self.fc1(h.flatten(1))))


def _top_mask(weight: torch.Tensor, sparsity: float) -> torch.Tensor:
    keep = round(weight.numel() * (1 - sparsity))
    mask = torch.zeros(weight.numel(), dtype=torch.bool)
    mask[weight.detach().abs().flatten().topk(keep).indices] = True
    return mask.view(weight.shape)


def _linear_mask(weight: torch.Tensor, fmt: str) -> torch.Tensor:
    # 90% sparse, with the structure the format needs (N:M: 1:8, the supported M nearest 90%, 87.5%).
    if fmt == "bsr":
        return bsr_magnitude_mask(weight.detach(), 0.9, blocksize=(8, 8))
    if fmt == "nm":
        return nm_mask(weight.detach().abs(), 1, 8)
    return _top_mask(weight, 0.9)


def _cnn(fmt: str, seed: int) -> nn.Module:
    """A masked SmallCNN at 90% sparsity whose linear masks suit ``fmt``; the pruned weights are
    left non-zero (the mask, not the weight, prunes), so a test sees that they do not leak."""
    torch.manual_seed(seed)
    model = sparsesam.sparsify(SmallCNN()).double()
    for name in ("conv1", "conv2"):
        layer = model.get_submodule(name)
        layer.set_mask(_top_mask(torch.randn_like(layer.weight), 0.9))  # random positions: another mask per seed
    for name in ("fc1", "fc2"):
        layer = model.get_submodule(name)
        layer.set_mask(_linear_mask(torch.randn_like(layer.weight), fmt))
    return model


def _forms(fmt: str) -> dict:
    return {"conv1": "csr", "conv2": "csr", "fc1": fmt, "fc2": fmt}


def _same_state(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        if isinstance(a[key], torch.Tensor):
            assert a[key].dtype == b[key].dtype and torch.equal(a[key], b[key]), key
        else:
            assert a[key] == b[key], key


def _x():
    return torch.randn(5, 3, 8, 8, dtype=torch.float64)


@pytest.mark.parametrize("fmt", ["csr", "bsr", "nm"])
def test_dense_checkpoint_loads_into_the_sparse_forms(fmt):
    saved = _cnn(fmt, seed=0)
    model = set_execution(_cnn(fmt, seed=1), _forms(fmt))  # other weights, other masks of the same structure
    assert execution_summary(model, formats=True) == _forms(fmt)
    model.load_state_dict(saved.state_dict(), strict=True)
    assert execution_summary(model, formats=True) == _forms(fmt)
    # exactly what converting the saved model gives: kept weights, index, bias
    _same_state(model.state_dict(), set_execution(copy.deepcopy(saved), _forms(fmt)).state_dict())
    for name in LAYERS:
        back, original = model.get_submodule(name).to_masked(), saved.get_submodule(name)
        assert torch.equal(back.weight_mask, original.weight_mask)
        assert torch.equal(back.weight, original.effective_weight().detach())
        assert torch.equal(back.bias, original.bias)
    x = _x()
    torch.testing.assert_close(model(x), saved(x))


@pytest.mark.parametrize("fmt", ["csr", "bsr", "nm"])
def test_sparse_checkpoint_loads_into_the_dense_model(fmt):
    saved = set_execution(_cnn(fmt, seed=0), _forms(fmt))
    model = _cnn("csr", seed=1)  # dense masked, other weights and masks
    model.load_state_dict(saved.state_dict(), strict=True)
    assert set(execution_summary(model).values()) == {"dense"}
    _same_state(model.state_dict(), set_execution(copy.deepcopy(saved), "dense").state_dict())
    x = _x()
    torch.testing.assert_close(model(x), saved(x))
    # and a freshly sparsified model (masks of ones) takes it too
    fresh = sparsesam.sparsify(SmallCNN()).double()
    fresh.load_state_dict(saved.state_dict(), strict=True)
    _same_state(fresh.state_dict(), model.state_dict())


def test_one_sparse_format_loads_into_another():
    saved = set_execution(_cnn("bsr", seed=0), _forms("bsr"))
    model = set_execution(_cnn("bsr", seed=1), _forms("csr"))
    model.load_state_dict(saved.state_dict(), strict=True)
    assert execution_summary(model, formats=True) == _forms("csr")
    _same_state(model.state_dict(), set_execution(copy.deepcopy(saved), _forms("csr")).state_dict())


def test_a_mask_without_the_format_structure_is_refused():
    saved = _cnn("csr", seed=0)  # unstructured linear masks
    model = set_execution(_cnn("nm", seed=1), _forms("nm"))
    with pytest.raises(RuntimeError, match="fc1: the checkpoint holds this layer in dense form, which cannot load "
                                           "into its nm form"):
        model.load_state_dict(saved.state_dict(), strict=True)


def test_a_plain_dense_checkpoint_keeps_the_sparse_layers_mask():
    """A plain nn.Linear's state (no mask) loads into a masked layer keeping its mask; the sparse
    forms do the same: the kept weights are read at the current pattern."""
    torch.manual_seed(2)
    plain = nn.Linear(16, 8).double()
    layer = sparsesam.sparsify(nn.Linear(16, 8).double())
    layer.set_mask(torch.rand(8, 16) < 0.3)
    masked = copy.deepcopy(layer)
    sparse = set_execution(copy.deepcopy(layer), "csr")
    masked.load_state_dict(plain.state_dict(), strict=True)
    sparse.load_state_dict(plain.state_dict(), strict=True)
    assert torch.equal(sparse.to_masked().weight, masked.effective_weight().detach())
    assert torch.equal(sparse.pattern.mask(), layer.weight_mask)


def test_a_bad_sparse_checkpoint_names_the_layer():
    saved = set_execution(_cnn("csr", seed=0), _forms("csr")).state_dict()
    saved["fc2.values"] = saved["fc2.values"][:-1]  # one value short of the pattern
    with pytest.raises(RuntimeError, match="fc2: the checkpoint holds this layer in csr form"):
        _cnn("csr", seed=1).load_state_dict(saved, strict=True)
    assert isinstance(_cnn("csr", seed=1).fc2, MaskedLinear)


@pytest.mark.parametrize("fmt", ["csr", "bsr", "nm"])
def test_resume_in_sparse_form_continues_bit_for_bit(fmt):
    """Save a sparse-form model, its optimizer and its forms mid-training; resume by loading into the
    dense model, restoring the forms, then the optimizer: the next steps match the uninterrupted run."""
    x, target = _x(), torch.randn(5, 16, dtype=torch.float64)

    def step(model, opt):
        opt.zero_grad(set_to_none=True)
        torch.nn.functional.mse_loss(model(x), target).backward()
        opt.step()

    model = set_execution(_cnn(fmt, seed=0), _forms(fmt))
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    step(model, opt)
    saved = copy.deepcopy({"model": model.state_dict(), "opt": opt.state_dict(),
                           "forms": execution_summary(model, formats=True)})
    step(model, opt)

    resumed = _cnn("csr", seed=3)  # as a resume builds it: dense, its own init
    resumed.load_state_dict(saved["model"], strict=True)
    resumed = set_execution(resumed, saved["forms"])
    resumed_opt = torch.optim.SGD(resumed.parameters(), lr=0.05, momentum=0.9)
    resumed_opt.load_state_dict(saved["opt"])
    step(resumed, resumed_opt)
    _same_state(resumed.state_dict(), model.state_dict())
