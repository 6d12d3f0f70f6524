"""apply_mask and masked_weight_grad (the fused epilogue) vs sparsesam.reference."""
import itertools

import pytest
import torch

from sparsesam import reference
from sparsesam.ops import apply_mask, masked_weight_grad

from op_cases import DTYPES, MASK_KINDS, make_mask, noncontiguous

# The CPU kernels take float16 too (computing in float32, like bfloat16): test it beside the others.
CPU_DTYPES = (*DTYPES, torch.float16)

SHAPES = [(1,), (7,), (129, 7), (0, 5), (3, 5, 3, 3), (65537,)]


@pytest.mark.parametrize("dtype", CPU_DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("mask_kind", MASK_KINDS)
def test_apply_mask_is_exact(dtype, shape, mask_kind):
    # One multiply (or select) per element: bitwise equal to the reference.
    w = torch.randn(shape).to(dtype)
    m = make_mask(shape, mask_kind, dtype)
    assert torch.equal(apply_mask(w, m), reference.apply_mask(w, m))
    if len(shape) >= 2:
        assert torch.equal(apply_mask(noncontiguous(w), noncontiguous(m)), reference.apply_mask(w, m))


@pytest.mark.parametrize("dtype", CPU_DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize(
    "mask_kind, output_mask",
    # A bool mask has no gradient (refused: tested below).
    [(k, o) for k in ("bool", "float") for o in itertools.product([True, False], repeat=2) if k == "float" or not o[1]],
    ids=str,
)
def test_masked_weight_grad_is_exact(dtype, shape, mask_kind, output_mask):
    g, w = torch.randn(shape).to(dtype), torch.randn(shape).to(dtype)
    m = make_mask(shape, mask_kind, dtype)
    ours = masked_weight_grad(g, w, m, output_mask)
    ref = reference.masked_weight_grad(g, w, m, output_mask)
    for a, b in zip(ours, ref):
        assert a.dtype == b.dtype and torch.equal(a, b)


def test_bool_mask_gradient_is_refused():
    with pytest.raises(TypeError, match="bool mask has no gradient"):
        masked_weight_grad(torch.randn(3), torch.randn(3), torch.ones(3, dtype=torch.bool), (True, True))


@pytest.mark.parametrize("mask_kind", ["bool", "float"])
def test_apply_mask_gradcheck_and_opcheck(mask_kind):
    w = torch.randn(5, 4, dtype=torch.float64, requires_grad=True)
    m = make_mask((5, 4), mask_kind, torch.float64)
    if mask_kind == "float":
        m.requires_grad_()
    assert torch.autograd.gradcheck(apply_mask, (w, m))
    torch.library.opcheck(torch.ops.sparsesam.apply_mask.default, (w, m))
    for want in itertools.product([True, False], repeat=2):
        if mask_kind == "bool" and want[1]:
            continue
        torch.library.opcheck(torch.ops.sparsesam.masked_weight_grad.default, (torch.randn(5, 4, dtype=torch.float64), w.detach(), m.detach(), list(want)))


def test_grad_shape_mismatch_names_the_argument():
    with pytest.raises(ValueError, match="grad_weight has shape"):
        masked_weight_grad(torch.randn(3, 2), torch.randn(2, 3), torch.ones(2, 3, dtype=torch.bool), (True, False))
