"""BSR magnitude pruning (sparsesam.pruning.bsr): exact block counts, deterministic ties, block-structured masks."""
from __future__ import annotations

import pytest
import torch

from sparsesam.pruning import bsr_magnitude_mask, bsr_scores
from sparsesam.sparse import BSRPattern, block_structure_error


def test_keeps_the_blocks_with_the_largest_norms():
    w = torch.zeros(8, 8)
    w[0:4, 4:8] = 3.0   # norm 12
    w[4:8, 0:4] = -2.0  # norm 8
    w[0:4, 0:4] = 1.0   # norm 4
    mask = bsr_magnitude_mask(w, 0.5, blocksize=4)
    expected = torch.zeros(8, 8, dtype=torch.bool)
    expected[0:4, 4:8] = True
    expected[4:8, 0:4] = True
    assert torch.equal(mask, expected)
    assert mask.dtype == torch.bool and mask.shape == w.shape


def test_l1_and_l2_rank_differently():
    # Block 0: one large weight (L2 4, L1 4); block 1: four weights of 1.5 (L2 3, L1 6).
    w = torch.zeros(2, 8)
    w[0, 0] = 4.0
    w[:, 4:6] = 1.5
    l2 = bsr_magnitude_mask(w, 0.5, blocksize=(2, 4), norm="l2")
    l1 = bsr_magnitude_mask(w, 0.5, blocksize=(2, 4), norm="l1")
    assert l2[:, :4].all() and not l2[:, 4:].any()
    assert l1[:, 4:].all() and not l1[:, :4].any()
    torch.testing.assert_close(bsr_scores(w, (2, 4), "l2"), torch.tensor([[4.0, 3.0]], dtype=torch.float64))


@pytest.mark.parametrize("sparsity", [0.0, 0.3, 0.5, 0.9, 0.99])
@pytest.mark.parametrize("block", [(4, 4), (8, 8), (1, 8), (2, 3)], ids=str)
def test_exact_block_count_and_block_structure(sparsity, block):
    w = torch.randn(48, 96)
    mask = bsr_magnitude_mask(w, sparsity, blocksize=block)
    nblocks = (48 // block[0]) * (96 // block[1])
    kept = round(nblocks * (1 - sparsity))
    assert int(mask.sum()) == kept * block[0] * block[1]
    assert block_structure_error(mask, block) is None
    assert BSRPattern.from_mask(mask, block).nblocks == kept


def test_ties_go_to_the_lower_block_index_and_are_deterministic():
    w = torch.ones(4, 12)  # every 2x2 block has the same norm
    mask = bsr_magnitude_mask(w, 0.5, blocksize=2)
    expected = torch.zeros(2, 6, dtype=torch.bool)
    expected.view(-1)[:6] = True  # the first 6 of 12 blocks, row-major
    assert torch.equal(mask, expected.repeat_interleave(2, 0).repeat_interleave(2, 1))
    assert torch.equal(mask, bsr_magnitude_mask(w, 0.5, blocksize=2))


def test_dtype_does_not_change_the_ranking():
    w = torch.randn(32, 32, dtype=torch.float64)
    assert torch.equal(bsr_magnitude_mask(w, 0.7, 4), bsr_magnitude_mask(w.float(), 0.7, 4))


def test_conv_weight_is_viewed_as_rows_by_columns():
    w = torch.randn(8, 4, 3, 3)  # (8, 36) as a matrix
    mask = bsr_magnitude_mask(w, 0.5, blocksize=(4, 4))
    assert mask.shape == w.shape
    assert block_structure_error(mask.reshape(8, 36), (4, 4)) is None


def test_bad_input():
    w = torch.randn(8, 8)
    with pytest.raises(ValueError, match="sparsity must be in"):
        bsr_magnitude_mask(w, 1.0)
    with pytest.raises(TypeError, match="sparsity must be"):
        bsr_magnitude_mask(w, "half")
    with pytest.raises(ValueError, match="does not divide"):
        bsr_magnitude_mask(w, 0.5, blocksize=3)
    with pytest.raises(ValueError, match="norm must be one of"):
        bsr_magnitude_mask(w, 0.5, norm="linf")
    with pytest.raises(ValueError, match="blocksize must be positive"):
        bsr_magnitude_mask(w, 0.5, blocksize=(0, 2))
    with pytest.raises(ValueError, match="weight contains NaN"):
        bsr_magnitude_mask(torch.full((4, 4), float("nan")), 0.5, blocksize=2)
    with pytest.raises(ValueError, match="at least 2 dimensions"):
        bsr_magnitude_mask(torch.randn(8), 0.5)
    with pytest.raises(TypeError, match="weight must be a floating"):
        bsr_magnitude_mask(torch.ones(4, 4, dtype=torch.int64), 0.5, blocksize=2)


def test_block_names_are_deprecated_aliases_of_the_bsr_ones():
    from sparsesam.pruning import block_magnitude_mask, block_scores
    w = torch.randn(8, 8, generator=torch.Generator().manual_seed(3))
    with pytest.warns(DeprecationWarning, match="use bsr_magnitude_mask"):
        old = block_magnitude_mask(w, 0.5, block=(2, 4))
    assert torch.equal(old, bsr_magnitude_mask(w, 0.5, blocksize=(2, 4)))
    with pytest.warns(DeprecationWarning, match="use bsr_scores"):
        scores = block_scores(w, (2, 4))
    assert torch.equal(scores, bsr_scores(w, (2, 4)))
