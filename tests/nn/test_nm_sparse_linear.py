"""NMSparseLinear: the module over sparsesam.ops.nm_linear (conversions, state_dict, applicability)."""
from __future__ import annotations

import pytest
import torch

from sparsesam.nn import MaskedLinear, NMSparseLinear
from sparsesam.pruning.nm import nm_mask
from sparsesam.sparse import NMPattern


def _masked_layer(n_in=24, n_out=17, n=2, m=4, bias=True, dtype=torch.float32):
    layer = MaskedLinear(n_in, n_out, bias=bias, dtype=dtype)
    layer.set_mask(nm_mask(layer.weight.detach().abs(), n, m))
    return layer


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("nm", [(2, 4), (1, 4), (1, 8), (3, 8), (1, 16)], ids=str)
def test_masked_to_nm_to_masked_is_exact(bias, nm):
    masked = _masked_layer(n_in=48, bias=bias, n=nm[0], m=nm[1])
    sparse = NMSparseLinear.from_masked(masked)
    assert (sparse.n, sparse.m) == nm
    back = sparse.to_masked()
    assert torch.equal(back.weight_mask, masked.weight_mask)
    assert torch.equal(back.weight, masked.effective_weight().detach())
    assert (back.bias is None) == (not bias) and (not bias or torch.equal(back.bias, masked.bias))
    again = NMSparseLinear.from_masked(back)
    assert torch.equal(again.values, sparse.values) and torch.equal(again.indices, sparse.indices)


def test_nm_layer_computes_the_masked_layer():
    masked = _masked_layer(dtype=torch.float64)
    sparse = NMSparseLinear.from_masked(masked)
    x = torch.randn(11, 24, dtype=torch.float64)
    torch.testing.assert_close(sparse(x), masked(x))
    torch.testing.assert_close(sparse.to_dense()(x), masked(x))
    assert torch.equal(sparse.dense_weight(), masked.effective_weight().detach())
    dense = NMSparseLinear.from_linear(sparse.to_dense())  # zero weights are the pruned ones
    assert torch.equal(dense.pattern.mask(), masked.weight_mask)


def test_gradients_match_the_masked_layer():
    masked = _masked_layer(dtype=torch.float64)
    sparse = NMSparseLinear.from_masked(masked)
    x = torch.randn(7, 24, dtype=torch.float64)
    masked(x).square().sum().backward()
    sparse(x).square().sum().backward()
    torch.testing.assert_close(sparse.values.grad, sparse.pattern.gather(masked.weight.grad * masked.weight_mask))
    torch.testing.assert_close(sparse.bias.grad, masked.bias.grad)


def test_applicable():
    assert NMSparseLinear.applicable(nm_mask(torch.rand(5, 16), 2, 4)) is None
    assert NMSparseLinear.applicable(nm_mask(torch.rand(5, 6), 1, 2)) is None
    assert "not N:M" in NMSparseLinear.applicable(torch.rand(5, 16) < 0.5)
    assert "not N:M" in NMSparseLinear.applicable(torch.ones(5, 16, dtype=torch.bool))
    assert "not a multiple" in NMSparseLinear.applicable(torch.ones(5, 7, dtype=torch.bool))
    assert "2 dimensions" in NMSparseLinear.applicable(torch.ones(5, dtype=torch.bool))
    assert "must be a torch.Tensor" in NMSparseLinear.applicable([[1, 0]])


def test_from_masked_detects_the_smallest_m():
    halves = NMSparseLinear.from_masked(_masked_layer(n=1, m=2))  # every 1:2 mask is 2:4
    assert (halves.n, halves.m) == (2, 4)
    layer = NMSparseLinear.from_masked(_masked_layer(n=1, m=4))
    assert (layer.n, layer.m) == (1, 4) and layer.sparsity == 0.75


def test_not_nm_mask_is_refused():
    layer = MaskedLinear(16, 5)
    layer.set_mask(torch.rand(5, 16) < 0.5)
    with pytest.raises(ValueError, match="not N:M"):
        NMSparseLinear.from_masked(layer)
    with pytest.raises(ValueError, match="trainable"):
        NMSparseLinear.from_masked(MaskedLinear(4, 3, mask_mode="trainable"))
    with pytest.raises(TypeError, match="must be a MaskedLinear"):
        NMSparseLinear.from_masked(torch.nn.Linear(4, 3))


def test_from_dense_with_given_nm():
    w = torch.randn(6, 16)
    mask = nm_mask(w.abs(), 1, 4)
    layer = NMSparseLinear.from_dense(w, mask, n=2, m=8)  # 1:4 is 2:8 too, when asked for
    assert (layer.n, layer.m) == (2, 8)
    assert torch.equal(layer.dense_weight(), w * mask)


def test_storage_is_values_plus_a_byte_per_entry():
    layer = NMSparseLinear.from_dense(torch.randn(300, 400), nm_mask(torch.rand(300, 400), 1, 8), torch.randn(300))
    tensors = list(layer.parameters()) + list(layer.buffers())
    stored = sum(t.numel() * t.element_size() for t in tensors)
    assert layer.nnz == 300 * 50
    assert stored == 5 * layer.nnz + 4 * 300


def test_training_step_moves_kept_values_only():
    masked = _masked_layer()
    sparse = NMSparseLinear.from_masked(masked)
    opt = torch.optim.SGD(sparse.parameters(), lr=0.1)
    before = sparse.values.detach().clone()
    sparse(torch.randn(8, 24)).square().sum().backward()
    opt.step()
    assert sparse.values.shape == before.shape and not torch.equal(sparse.values, before)
    assert torch.equal(sparse.to_masked().weight_mask, masked.weight_mask)


def test_state_dict_round_trip_with_another_pattern():
    source = NMSparseLinear.from_masked(_masked_layer(n=1, m=8))
    target = NMSparseLinear.from_masked(_masked_layer(n=2, m=4))
    state = source.state_dict()
    assert set(state) == {"values", "bias", "indices", "_extra_state"}
    target.load_state_dict(state)
    assert (target.n, target.m) == (1, 8) and target.values.shape == source.values.shape
    assert torch.equal(target.indices, source.indices)
    x = torch.randn(5, 24)
    assert torch.equal(target(x), source(x))


def test_state_dict_of_the_wrong_shape_or_a_bad_index_is_refused():
    target = NMSparseLinear.from_masked(_masked_layer())
    other = NMSparseLinear.from_masked(_masked_layer(n_out=9))
    with pytest.raises(RuntimeError, match="the pattern has shape"):
        target.load_state_dict(other.state_dict())
    state = target.state_dict()
    state["indices"] = state["indices"].clone()
    state["indices"][0, 0] = 7
    with pytest.raises(RuntimeError, match="indices"):
        target.load_state_dict(state)


def test_dtype_moves_keep_uint8_index():
    layer = NMSparseLinear.from_masked(_masked_layer()).double()
    assert layer.values.dtype == torch.float64 and layer.indices.dtype == torch.uint8
    x = torch.randn(4, 24, dtype=torch.float64)
    torch.testing.assert_close(layer(x), layer.to_dense()(x))


def test_constructor_checks():
    pattern = NMPattern.from_mask(nm_mask(torch.rand(3, 8), 2, 4), 2, 4)
    with pytest.raises(ValueError, match="pattern has shape"):
        NMSparseLinear(3, 8, pattern)
    with pytest.raises(TypeError, match="pattern must be"):
        NMSparseLinear(8, 3, torch.ones(3, 8))
    layer = NMSparseLinear(8, 3, pattern)
    assert layer.values.shape == (3, 4)
    assert layer.values.abs().max() <= 8 ** -0.5 and layer.bias.abs().max() <= 8 ** -0.5
    assert "n=2, m=4" in repr(layer)
