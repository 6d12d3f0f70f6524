"""BSR magnitude pruning: keep or prune whole ``bh x bw`` blocks of a weight.

The masks it makes are block-structured, so a layer pruned this way runs in
the ``bsr`` form (``sparsesam.nn.BlockSparseLinear``, ``sparsesam.ops.bsr_linear``), where each kept
block is a small dense product. A block's score is the L2 (or L1) norm of its
weights; the exact number of blocks ``round(nblocks * (1 - sparsity))`` with
the largest scores is kept, ties going to the lower block index (row-major
over blocks), the same on every device.
"""
from __future__ import annotations

import math
import warnings

import torch

from ..sparse.bsr import check_blocksize
from ._common import check_choice, check_finite, check_fraction

BSR_NORMS = ("l2", "l1")


def bsr_scores(weight: torch.Tensor, blocksize=(4, 4), norm: str = "l2") -> torch.Tensor:
    """The norm of every ``blocksize`` block of ``weight`` viewed as (rows, columns), shape (rows / bh, columns / bw).

    A weight of more than 2 dimensions (a conv weight) is viewed as
    ``(shape[0], prod(shape[1:]))``, the layout of the sparse formats. Scores
    are computed in float64 (so ranking does not depend on the weight's dtype).
    """
    if not isinstance(weight, torch.Tensor):
        raise TypeError(f"weight must be a torch.Tensor, got {type(weight).__name__}")
    if not weight.is_floating_point():
        raise TypeError(f"weight must be a floating tensor, got {weight.dtype}")
    if weight.dim() < 2:
        raise ValueError(f"weight must have at least 2 dimensions, got shape {tuple(weight.shape)}")
    bh, bw = check_blocksize(blocksize)
    check_choice("norm", norm, BSR_NORMS)
    rows, cols = weight.shape[0], math.prod(weight.shape[1:])
    if rows % bh or cols % bw:
        raise ValueError(f"blocksize {(bh, bw)} does not divide the weight's shape {(rows, cols)} (as rows x columns)")
    w = weight.detach().reshape(rows, cols)
    check_finite("weight", w)
    blocks = w.double().reshape(rows // bh, bh, cols // bw, bw)
    if norm == "l1":
        return blocks.abs().sum(dim=(1, 3))
    return blocks.square().sum(dim=(1, 3)).sqrt()


def bsr_magnitude_mask(weight: torch.Tensor, sparsity: float, blocksize=(4, 4), norm: str = "l2") -> torch.Tensor:
    """A bool mask of ``weight``'s shape keeping the whole blocks with the largest norms.

    Exactly ``round(nblocks * (1 - sparsity))`` blocks are kept (ties to the
    lower block index), so the mask's sparsity is ``sparsity`` up to the
    rounding to whole blocks.
    """
    sparsity = check_fraction("sparsity", sparsity)
    scores = bsr_scores(weight, blocksize, norm)
    bh, bw = check_blocksize(blocksize)
    keep = round(scores.numel() * (1.0 - sparsity))
    flat = torch.zeros(scores.numel(), dtype=torch.bool, device=scores.device)
    if keep > 0:
        order = torch.sort(scores.flatten(), descending=True, stable=True).indices
        flat[order[:keep]] = True
    block_mask = flat.view(scores.shape)
    dense = block_mask.repeat_interleave(bh, dim=0).repeat_interleave(bw, dim=1)
    return dense.reshape(weight.shape)


def block_scores(weight: torch.Tensor, block=(4, 4), norm: str = "l2") -> torch.Tensor:
    """Deprecated name of :func:`bsr_scores` (``block`` is ``blocksize``)."""
    warnings.warn("sparsesam.pruning.block_scores is deprecated: use bsr_scores(weight, blocksize, norm)",
                  DeprecationWarning, stacklevel=2)
    return bsr_scores(weight, block, norm)


def block_magnitude_mask(weight: torch.Tensor, sparsity: float, block=(4, 4), norm: str = "l2") -> torch.Tensor:
    """Deprecated name of :func:`bsr_magnitude_mask` (``block`` is ``blocksize``)."""
    warnings.warn("sparsesam.pruning.block_magnitude_mask is deprecated: use bsr_magnitude_mask(weight, sparsity, "
                  "blocksize, norm)", DeprecationWarning, stacklevel=2)
    return bsr_magnitude_mask(weight, sparsity, block, norm)
