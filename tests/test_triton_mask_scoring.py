"""The Triton mask-scoring kernels (sparsesam.triton_kernels: mask_grad_sq_norm,
mask_ascent_, mask_score_grad) vs sparsesam.reference.

They run on CPU under the Triton interpreter:

    TRITON_INTERPRET=1 python -m pytest -m triton tests/test_triton_mask_scoring.py

TRITON_INTERPRET must be set before triton is imported, so the module skips
itself when it is not. Sizes: 1, 7, 129 (one partial block), 3x5x3x3, 0
elements, a 0-d tensor, 1030 (a full block and a tail) and 33x130 (two
chunks).

* Elementwise kernels compute in float64 and round like torch's ``.to``, so
  ascent points and score gradients must equal the reference bit for bit.
* The reductions add in another (fixed) order: float64 error bounds, and the
  same bits twice.

bfloat16 is not tested: the interpreter keeps it as raw uint16 bits and does
arithmetic on the bit patterns. float16 stands in for the 16-bit path.
"""
import math
import os

import pytest

pytestmark = pytest.mark.triton

if os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("needs TRITON_INTERPRET=1 set before triton is imported", allow_module_level=True)

pytest.importorskip("triton")

import torch  # noqa: E402

from sparsesam import reference  # noqa: E402
from sparsesam.triton_kernels import (mask_ascent_, mask_grad_sq_norm, mask_score_grad,  # noqa: E402
                                      sam_grad_sq_norm)

DTYPES = [torch.float32, torch.float64, torch.float16]
SHAPES = [(1,), (7,), (129,), (3, 5, 3, 3), (0,), (), (1030,), (33, 130)]
_BITS = {2: torch.int16, 4: torch.int32, 8: torch.int64}


def _bits(t):
    return t.reshape(-1).view(_BITS[t.element_size()])


def _assert_all_bits(name, ours, ref):
    assert len(ours) == len(ref)
    for i, (o, r) in enumerate(zip(ours, ref)):
        assert o.shape == r.shape and o.dtype == r.dtype, f"{name}[{i}]: {o.shape} {o.dtype} vs {r.shape} {r.dtype}"
        assert torch.equal(_bits(o), _bits(r)), f"{name}[{i}]: {int((_bits(o) != _bits(r)).sum())} entries differ"


def _randn(shape, dtype):
    # Drawn in float64 and rounded once, so every dtype sees the same values.
    return torch.randn(shape, dtype=torch.float64).to(dtype)


def _case(dtype, weights="mixed", shapes=SHAPES):
    g = [_randn(s, dtype) for s in shapes]
    w = [_randn(s, dtype) for s in shapes]
    if weights == "none":
        w = [None] * len(shapes)
    elif weights == "mixed":
        w = [x if i % 2 == 0 else None for i, x in enumerate(w)]
    return g, w


# --- mask_grad_sq_norm ---------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("weights", ["all", "none", "mixed"])
def test_mask_grad_sq_norm(dtype, weights):
    g, w = _case(dtype, weights)
    ours = mask_grad_sq_norm(g, w)
    ref = reference.mask_grad_sq_norm(g, w)
    assert ours.dtype == torch.float64 and ours.dim() == 0
    # Blocks summed in float32 (float64 for float64 inputs), partials in float64.
    rel = 1e-13 if dtype == torch.float64 else 1e-5
    assert abs(ours.item() - ref.item()) <= rel * ref.item()
    assert torch.equal(_bits(ours), _bits(mask_grad_sq_norm(g, w)))


def test_mask_grad_sq_norm_is_the_sam_norm_kernel():
    g, w = _case(torch.float32, "all")
    assert torch.equal(_bits(mask_grad_sq_norm(g, w)), _bits(sam_grad_sq_norm(g, w, [None] * len(g), True)))


# --- mask_ascent_ ----------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("weights", ["all", "mixed"])
def test_mask_ascent_bitwise(dtype, weights):
    g, w = _case(dtype, weights)
    masks = [torch.rand(s, dtype=torch.float64).to(dtype) for s in SHAPES]
    sq = reference.mask_grad_sq_norm(g, w)
    for rho in (0.05, 3.0):
        out = [torch.full_like(m, float("nan")) for m in masks]
        mask_ascent_(out, g, w, masks, sq, rho, 1e-12)
        _assert_all_bits("out", out, reference.mask_ascent(g, w, masks, sq, rho, 1e-12))


def test_mask_ascent_noncontiguous_out_and_nan():
    g = [_randn((6, 9), torch.float32), torch.tensor([float("nan"), 1.0, -1.0])]
    masks = [torch.rand(6, 9), torch.tensor([0.5, 0.5, 0.5])]
    out = [torch.empty(9, 6).t(), torch.empty(3)]
    sq = torch.tensor(4.0, dtype=torch.float64)
    mask_ascent_(out, g, [None, None], masks, sq, 0.7, 0.0)
    ref = reference.mask_ascent(g, [None, None], masks, sq, 0.7, 0.0)
    assert torch.equal(out[0], ref[0])
    assert math.isnan(out[1][0].item()) and torch.equal(out[1][1:], torch.tensor([0.85, 0.15]))


# --- mask_score_grad ---------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("weights", ["all", "none", "mixed"])
def test_mask_score_grad(dtype, weights):
    g, w = _case(dtype, weights)
    scores = [_randn(s, dtype) for s in SHAPES]
    scores[1] = torch.zeros_like(scores[1])
    score_grads, rates = mask_score_grad(g, w, scores)
    ref_grads, ref_rates = reference.mask_score_grad(g, w, scores)
    _assert_all_bits("score_grads", score_grads, ref_grads)
    assert rates.dtype == torch.float64 and rates.shape == (len(g),)
    magnitude = torch.stack([reference._mask_grad(x, y).abs().sum() for x, y in zip(g, w)])
    assert bool(((rates - ref_rates).abs() <= 1e-13 * magnitude).all())
    assert torch.equal(_bits(rates), _bits(mask_score_grad(g, w, scores)[1]))


# --- empty, bad input ------------------------------------------------------------


def test_empty_lists_and_tensors():
    assert mask_grad_sq_norm([], []).item() == 0.0
    mask_ascent_([], [], [], [], torch.tensor(1.0), 0.1, 0.0)
    score_grads, rates = mask_score_grad([], [], [])
    assert score_grads == [] and rates.shape == (0,)
    e = [torch.empty(0), torch.empty(3, 0)]
    assert mask_grad_sq_norm(e, e).item() == 0.0
    score_grads, rates = mask_score_grad(e, [None, None], e)
    assert rates.tolist() == [0.0, 0.0] and [s.shape for s in score_grads] == [(0,), (3, 0)]


def test_bad_input():
    a = torch.zeros(4, 3)
    with pytest.raises(ValueError, match="weights"):
        mask_grad_sq_norm([a], [])
    with pytest.raises(TypeError, match=r"weights\[0\]"):
        mask_grad_sq_norm([a], [a.double()])
    with pytest.raises(TypeError, match=r"out\[0\]"):
        mask_ascent_([a.half()], [a], [None], [a], torch.tensor(1.0), 0.1, 0.0)
    with pytest.raises(ValueError, match="sq_norm"):
        mask_ascent_([a.clone()], [a], [None], [a], torch.ones(2), 0.1, 0.0)
    with pytest.raises(ValueError, match=r"scores\[0\]"):
        mask_score_grad([a], [None], [torch.zeros(3, 4)])
