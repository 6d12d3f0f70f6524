"""N:M masks: exact structure along the input dimension, the largest scores kept
(against a loop reference), the structure check, model-level pruning, bad input."""
import itertools

import pytest
import torch

import sparsesam
from sparsesam.models import SmallCNN
from sparsesam.nn import masked_layers
from sparsesam.pruning import is_nm_sparse, nm_mask, nm_prune


def _reference_nm(scores, n, m):
    """Loop over every (out, spatial...) position and every group of m inputs; keep the n largest."""
    mask = torch.zeros_like(scores, dtype=torch.bool)
    spatial = [range(d) for d in scores.shape[2:]]
    for o in range(scores.shape[0]):
        for pos in itertools.product(*spatial):
            for start in range(0, scores.shape[1], m):
                idx = [(o, i, *pos) for i in range(start, start + m)]
                values = torch.stack([scores[i] for i in idx])
                for j in torch.argsort(values, descending=True, stable=True)[:n]:
                    mask[idx[int(j)]] = True
    return mask


@pytest.mark.parametrize("shape, n, m", [
    ((5, 8), 2, 4), ((5, 8), 1, 4), ((5, 8), 4, 4), ((3, 12, 3, 3), 2, 4), ((3, 12, 3, 3), 3, 6),
    ((4, 16, 1, 2), 2, 4), ((4, 16, 1, 2), 1, 8), ((7, 3), 2, 3),
])
def test_nm_mask_keeps_the_n_largest_of_each_group(shape, n, m):
    scores = torch.randn(shape)
    mask = nm_mask(scores.abs(), n, m)
    assert mask.dtype == torch.bool and mask.shape == scores.shape
    assert torch.equal(mask, _reference_nm(scores.abs(), n, m))
    assert is_nm_sparse(mask, n, m, exact=True)
    assert 1 - mask.float().mean().item() == pytest.approx(1 - n / m)


def test_groups_run_along_the_input_dimension_of_a_conv():
    scores = torch.zeros(1, 4, 2, 2)
    scores[0, 3] = 1.0  # for every (kh, kw): input channel 3 wins its group of 4
    scores[0, 1] = 0.5
    mask = nm_mask(scores, 2, 4)
    assert torch.equal(mask[0, :, 0, 0], torch.tensor([False, True, False, True]))
    assert torch.equal(mask.sum(dim=1), torch.full((1, 2, 2), 2))


def test_is_nm_sparse_detects_violations():
    mask = nm_mask(torch.rand(4, 8), 2, 4)
    assert is_nm_sparse(mask, 2, 4) and is_nm_sparse(mask, 3, 4) and not is_nm_sparse(mask, 1, 4)
    fewer = mask.clone()
    fewer[0, :4] = False
    assert is_nm_sparse(fewer, 2, 4) and not is_nm_sparse(fewer, 2, 4, exact=True)
    broken = mask.clone()
    broken[2, 4:] = True
    assert not is_nm_sparse(broken, 2, 4)
    # Groups are aligned to multiples of m: [0, 1, 1, 1 | 0, 0, 1, 1] breaks 2:4, [0, 1, 1, 0 | 0, 1, 1, 0] does not.
    assert is_nm_sparse(torch.tensor([[0, 1, 1, 1, 0, 0, 1, 1]]), 2, 4) is False
    assert is_nm_sparse(torch.tensor([[0, 1, 1, 0, 0, 1, 1, 0]]), 2, 4, exact=True)


def test_nm_prune_gives_each_layer_an_exact_nm_mask():
    model = sparsesam.sparsify(SmallCNN(width=8))
    x = torch.randn(2, 1, 28, 28)
    result = nm_prune(model, 2, 4)
    # features.0 has 1 input channel: left dense, like ASP does.
    assert "features.0" not in result and model.features[0].sparsity == 0.0
    assert set(result) == {name for name, _ in masked_layers(model)} - {"features.0"}
    for name, layer in masked_layers(model):
        if name in result:
            assert is_nm_sparse(layer.weight_mask, 2, 4, exact=True), name
            assert result[name] == pytest.approx(0.5)
            # Magnitude: the kept weights are the largest of their groups.
            assert torch.equal(layer.weight_mask, nm_mask(layer.weight.abs(), 2, 4))
    model(x)  # still runs
    with pytest.raises(ValueError, match="not a multiple of m=4"):
        nm_prune(model, 2, 4, skip_indivisible=False)


def test_nm_prune_with_given_scores_and_trainable_masks():
    model = sparsesam.sparsify(torch.nn.Sequential(torch.nn.Linear(8, 3)), mask_mode="trainable")
    scores = {"0": torch.arange(24, dtype=torch.float32).reshape(3, 8)}
    nm_prune(model, 1, 4, scores=scores)
    expected = torch.zeros(3, 8)
    expected[:, 3] = expected[:, 7] = 1
    assert torch.equal(model[0].weight_mask.detach(), expected)


def test_bad_arguments_name_the_argument():
    with pytest.raises(ValueError, match="n must be in"):
        nm_mask(torch.rand(2, 8), 5, 4)
    with pytest.raises(ValueError, match="n must be in"):
        nm_mask(torch.rand(2, 8), 0, 4)
    with pytest.raises(ValueError, match="m must be >= 1"):
        nm_mask(torch.rand(2, 8), 1, 0)
    with pytest.raises(TypeError, match="n must be an int"):
        nm_mask(torch.rand(2, 8), 2.0, 4)
    with pytest.raises(ValueError, match="scores has 6 inputs"):
        nm_mask(torch.rand(2, 6), 2, 4)
    with pytest.raises(ValueError, match="scores must have at least 2 dimensions"):
        nm_mask(torch.rand(8), 2, 4)
    with pytest.raises(ValueError, match="scores contains NaN"):
        nm_mask(torch.full((2, 4), float("nan")), 2, 4)
    with pytest.raises(ValueError, match="mask has 6 inputs"):
        is_nm_sparse(torch.ones(2, 6), 2, 4)
    model = sparsesam.sparsify(SmallCNN(width=8))
    with pytest.raises(ValueError, match="n must be in"):
        nm_prune(model, 8, 4)
    with pytest.raises(ValueError, match="scores has no entry for layer"):
        nm_prune(model, 2, 4, scores={})
