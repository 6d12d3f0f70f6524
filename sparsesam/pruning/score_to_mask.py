"""HYDRA's / HARP's score-to-mask step as one autograd Function over fused pieces.

Forward (``GetSubnet`` in intellisec/harp and inspire-group/hydra,
models/layers.py): the binary mask keeping the largest |s|

* unstructured: the ``kept_count(k, numel)`` largest |s| of the layer, where
  GetSubnet sorts the scores and zeroes the lowest ``int((1 - k) * numel)``;
* channel: one score per output channel, the ``round(k * channels)`` largest
  (GetSubnet's ``torch.topk(..., k=round(k * C))``), broadcast over the
  channel's weights;
* N:M: the ``n`` largest of every ``m`` inputs (nm_mask; the rate is n/m).

The selection is by threshold, not by a sort: ``torch.kthvalue`` finds the
k-th largest value (a quickselect on CPU, a radix select on CUDA; O(numel),
where GetSubnet's full sort is O(numel log numel) on every forward), the
mask is ``|s| >= t``; where several entries equal t (a count read on the
host tells), the lowest flat indices among them until exactly k are kept.
So the kept count is exact and ties are broken the same way on every
device (GetSubnet's unstable sort breaks them arbitrarily). N:M selects within groups of m (a sort of m values each).

Backward (GetSubnet's straight-through estimator): the mask's gradient
``dM = dL/dM`` goes to |s| unchanged and its sum to the rate, so
``ds = sign(s) * dM`` and ``dk = sum(dM)``. Both come from one fused pass of
``sparsesam.ops.mask_score_grad`` (CPU / Triton / CUDA). The masked layers'
own backward already forms ``dM = G * W`` in its epilogue (G the effective
weight's gradient), so the Function receives dM and calls the op with
``weights=None``: G*W is never formed twice. For channel masks the score of
a channel is one number: dM is first summed over the channel's weights (the
gradient the official [C, 1, 1, 1] scores get through broadcasting), then
the op gives ``sign(s_c) * dM_c`` and the rate gradient ``sum(dM)``.
"""
from __future__ import annotations

from typing import Optional, Sequence, Union

import torch

from ..ops import mask_score_grad
from .nm import nm_mask

GRANULARITIES = ("unstructured", "channel", "nm")


def kept_count(rate: float, total: int, granularity: str = "unstructured",
               dtype: torch.dtype = torch.float64) -> int:
    """How many of ``total`` entries (weights, or channels) rate k keeps: GetSubnet's count, at least one.

    Weights: ``total - int((1 - k) * total)`` (the sort zeroes the lowest
    ``int((1 - k) * total)``); channels: ``round(k * total)``. GetSubnet can
    keep none (k * total < 0.5 channels); a layer here keeps at least one, so
    no layer is cut through. The arithmetic is done in ``dtype``, the rate's
    own (HARP's rates are float32 tensors, as in intellisec/harp, where
    ``(1 - k) * numel`` is a float32 product): in double, a product that
    float32 rounds across an integer would keep one entry more or less.
    """
    k = torch.tensor(rate, dtype=dtype)
    if granularity == "channel":
        kept = int(torch.round(k * total))
    else:
        kept = total - int((1 - k) * total)
    return min(total, max(1, kept))


def top_k_by_threshold(values: torch.Tensor, k: int) -> torch.Tensor:
    """Bool mask of ``values``' shape keeping its ``k`` largest entries; ties go to the lower flat index.

    The k-th largest value t comes from torch.kthvalue (a selection, no
    sort); ``values >= t`` keeps exactly k entries unless several equal t.
    Only then (a count read on the host decides) are the ties resolved: every
    value above t, then the first ``k - #(v > t)`` entries equal to t in
    flat order. NaN (above every number for kthvalue, never ``>= t``) makes
    the count come out wrong too, and is refused there.
    """
    flat = values.reshape(-1)
    total = flat.numel()
    if k >= total:
        return torch.ones_like(values, dtype=torch.bool)
    threshold = torch.kthvalue(flat, total - k + 1).values
    kept = flat >= threshold
    if int(kept.sum()) != k:
        if torch.isnan(flat).any():
            raise ValueError("scores contain NaN")
        above = flat > threshold
        at = flat == threshold
        kept = above | (at & (torch.cumsum(at, 0) <= k - above.sum()))
    return kept.view_as(values)


def select_mask(abs_scores: torch.Tensor, rate: Optional[float], granularity: str, n: int, m: int,
                weight_shape: Sequence[int], rate_dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """The binary mask (the scores' dtype, ``weight_shape``) the forward produces from |s|; no gradient.

    rate_dtype: the dtype the rate's kept count is computed in (see kept_count)."""
    if granularity == "nm":
        mask = nm_mask(abs_scores, n, m)
    elif granularity == "channel":
        per_channel = abs_scores.reshape(-1)
        keep = top_k_by_threshold(per_channel, kept_count(rate, per_channel.numel(), "channel", rate_dtype))
        mask = keep.view(-1, *([1] * (len(weight_shape) - 1))).expand(*weight_shape)
    else:
        mask = top_k_by_threshold(abs_scores, kept_count(rate, abs_scores.numel(), dtype=rate_dtype))
    return mask.to(abs_scores.dtype).contiguous()


class ScoreToMask(torch.autograd.Function):
    """``(s, k) -> M``: the top-k mask of |s| (forward) with GetSubnet's straight-through gradients (backward).

    scores: the raw scores s (the weight's shape; ``[C, 1, ...]`` for
    channel masks); rate: a float, or a one-element tensor that may require
    grad (HARP's rate); None for N:M. weight_shape: the mask's shape.
    """

    @staticmethod
    def forward(scores: torch.Tensor, rate: Union[float, torch.Tensor, None], granularity: str, n: int, m: int,
                weight_shape: Sequence[int]) -> torch.Tensor:
        value = None if rate is None else float(rate)  # one host read of the rate per forward
        if value is not None and not 0.0 < value <= 1.0:
            raise ValueError(f"keep_rate must be in (0, 1], got {value}")
        rate_dtype = rate.dtype if isinstance(rate, torch.Tensor) else torch.float64
        return select_mask(scores.detach().abs(), value, granularity, n, m, weight_shape, rate_dtype)

    @staticmethod
    def setup_context(ctx, inputs, output):
        scores, rate, granularity = inputs[0], inputs[1], inputs[2]
        ctx.granularity = granularity
        ctx.rate_like = rate if isinstance(rate, torch.Tensor) else None
        if ctx.needs_input_grad[0] or ctx.needs_input_grad[1]:
            ctx.save_for_backward(scores)

    @staticmethod
    def backward(ctx, grad_mask):
        (scores,) = ctx.saved_tensors
        dm = grad_mask.to(scores.dtype)
        if ctx.granularity == "channel":
            # The channel's one score gets the sum over its weights (broadcasting's gradient).
            dm = dm.reshape(dm.shape[0], -1).sum(dim=1).view_as(scores)
        score_grads, rate_grads = mask_score_grad([dm], None, [scores])
        grad_scores = score_grads[0] if ctx.needs_input_grad[0] else None
        grad_rate = None
        if ctx.needs_input_grad[1]:
            grad_rate = rate_grads[0].to(ctx.rate_like.dtype).reshape(ctx.rate_like.shape)
        return grad_scores, grad_rate, None, None, None, None
