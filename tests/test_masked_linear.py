"""masked_linear (C++ CPU kernel through the registered op) vs sparsesam.reference."""
import pytest
import torch

import sparsesam
from sparsesam import reference
from sparsesam.ops import masked_linear

from op_cases import DTYPES, MASK_KINDS, make_mask, noncontiguous, outputs_and_grads, to64
from tolerance import assert_within_torch_error

# The CPU kernels take float16 too (computing in float32, like bfloat16): test it beside the others.
CPU_DTYPES = (*DTYPES, torch.float16)

# (leading dims of x, in_features, out_features): odd sizes, 1s, a batch of 0, 3-D and 1-D
# input, layers with no inputs or no outputs.
SHAPES = [((1,), 1, 1), ((7,), 7, 7), ((5,), 129, 7), ((129,), 33, 129), ((0,), 7, 5), ((2, 3), 7, 4),
          ((), 7, 3), ((3,), 0, 4), ((3,), 5, 0)]


def _inputs(lead, n_in, n_out, dtype, mask_kind, bias=True, contiguous=True):
    x = torch.randn(*lead, n_in, dtype=torch.float64).to(dtype)
    w = torch.randn(n_out, n_in, dtype=torch.float64).to(dtype)
    m = make_mask((n_out, n_in), mask_kind, dtype)
    b = torch.randn(n_out, dtype=torch.float64).to(dtype) if bias else None
    if not contiguous:
        x, w, m = noncontiguous(x), noncontiguous(w), noncontiguous(m)
    return dict(x=x, weight=w, mask=m, bias=b)


@pytest.mark.parametrize("dtype", CPU_DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("mask_kind", MASK_KINDS)
@pytest.mark.parametrize("contiguous", [True, False], ids=["contig", "noncontig"])
def test_forward_backward_vs_reference(dtype, shape, mask_kind, contiguous):
    inputs = _inputs(*shape, dtype, mask_kind, contiguous=contiguous)
    ours, ours_grads = outputs_and_grads(masked_linear, inputs)
    torch_own, torch_grads = outputs_and_grads(reference.masked_linear, inputs)
    ref, ref_grads = outputs_and_grads(reference.masked_linear, to64(inputs))
    assert_within_torch_error("y", ours, torch_own, ref)
    assert set(ours_grads) == set(ref_grads)
    for name in ref_grads:
        assert_within_torch_error(f"d{name}", ours_grads[name], torch_grads[name], ref_grads[name])


def test_without_bias_and_only_some_grads():
    inputs = _inputs((4,), 9, 6, torch.float64, "float", bias=False)
    x, w, m = inputs["x"], inputs["weight"].requires_grad_(), inputs["mask"]
    y = masked_linear(x, w, m)
    (dw,) = torch.autograd.grad(y.sum(), [w])
    torch.testing.assert_close(dw, (torch.ones(4, 6, dtype=torch.float64).t() @ x) * m)


def test_bool_mask_gives_exact_zeros_for_pruned_inf_weights():
    w = torch.tensor([[1.0, float("inf")], [float("nan"), 2.0]])
    m = torch.tensor([[True, False], [False, True]])
    y = masked_linear(torch.ones(1, 2), w, m)
    torch.testing.assert_close(y, torch.tensor([[1.0, 2.0]]))


def test_all_zero_mask_gives_bias_and_zero_weight_grad():
    inputs = _inputs((3,), 5, 4, torch.float32, "zeros")
    out, grads = outputs_and_grads(masked_linear, inputs)
    torch.testing.assert_close(out, inputs["bias"].expand(3, 4))
    assert torch.count_nonzero(grads["weight"]) == 0 and torch.count_nonzero(grads["x"]) == 0


@pytest.mark.parametrize("mask_kind", ["bool", "float"])
def test_gradcheck(mask_kind):
    inputs = _inputs((3,), 6, 5, torch.float64, mask_kind)
    args = [inputs["x"].requires_grad_(), inputs["weight"].requires_grad_(), inputs["mask"], inputs["bias"].requires_grad_()]
    if mask_kind == "float":
        args[2].requires_grad_()
    assert torch.autograd.gradcheck(masked_linear, args)


@pytest.mark.parametrize("mask_kind", ["bool", "float"])
def test_opcheck(mask_kind):
    for shape in [((3,), 6, 5), ((2, 3), 4, 7), ((0,), 3, 2)]:
        inputs = _inputs(*shape, torch.float32, mask_kind)
        args = (inputs["x"].requires_grad_(), inputs["weight"].requires_grad_(), inputs["mask"], inputs["bias"])
        if mask_kind == "float":
            args[2].requires_grad_()
        torch.library.opcheck(torch.ops.sparsesam.masked_linear.default, args)
        out_mask = [True, True, mask_kind == "float"]
        grad_out = torch.randn(*shape[0], shape[2])
        torch.library.opcheck(
            torch.ops.sparsesam.masked_linear_backward.default,
            (grad_out, inputs["x"].detach(), inputs["weight"].detach(), inputs["mask"].detach(), out_mask),
        )


def test_autocast_bfloat16_matches_f_linear_under_autocast():
    inputs = _inputs((8,), 16, 12, torch.float32, "bool")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ours = masked_linear(**inputs)
        theirs = reference.masked_linear(**inputs)
    assert ours.dtype == theirs.dtype == torch.bfloat16
    torch.testing.assert_close(ours, theirs)


@pytest.mark.parametrize(
    "change, error, words",
    [
        (dict(mask=torch.ones(3, 5, dtype=torch.bool)), ValueError, "mask has shape"),
        (dict(mask=torch.ones(4, 5, dtype=torch.int64)), TypeError, "mask must be bool"),
        (dict(mask=torch.ones(4, 5, dtype=torch.float64)), TypeError, "mask must be bool"),
        (dict(mask=torch.full((4, 5), float("nan"))), ValueError, "mask contains NaN"),
        (dict(mask=[[1.0] * 5] * 4), TypeError, "mask must be a torch.Tensor"),
        (dict(weight=torch.randn(4, 5, 1)), ValueError, "weight must have 2 dimensions"),
        (dict(x=torch.randn(3, 6)), ValueError, "x has shape"),
        (dict(x=torch.randn(3, 5, dtype=torch.float64)), TypeError, "x dtype"),
        (dict(x=torch.ones(3, 5, dtype=torch.int32)), TypeError, "x must be a floating tensor"),
        (dict(bias=torch.randn(3)), ValueError, "bias has 3 entries"),
        (dict(mask=torch.ones(4, 5, dtype=torch.bool, device="meta")), ValueError, "mask is on meta"),
    ],
)
def test_bad_input_names_the_argument(change, error, words):
    args = dict(x=torch.randn(3, 5), weight=torch.randn(4, 5), mask=torch.ones(4, 5, dtype=torch.bool), bias=torch.randn(4))
    args.update(change)
    with pytest.raises(error, match=words):
        masked_linear(**args)


def test_backend_selection_rejects_unknown(monkeypatch):
    monkeypatch.setenv("SPARSESAM_BACKEND", "tpu")
    with pytest.raises(ValueError, match="SPARSESAM_BACKEND"):
        sparsesam.ops.backend()
