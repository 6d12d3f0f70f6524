"""masked_conv2d (C++ CPU kernel through the registered op) vs sparsesam.reference."""
import pytest
import torch

from sparsesam import reference
from sparsesam.ops import masked_conv2d

from op_cases import DTYPES, MASK_KINDS, make_mask, noncontiguous, outputs_and_grads, to64
from tolerance import assert_within_torch_error

# The CPU kernels take float16 too (computing in float32, like bfloat16): test it beside the others.
CPU_DTYPES = (*DTYPES, torch.float16)

# (N, C_in, H, W, C_out, k, stride, padding, dilation, groups)
CASES = [
    (1, 1, 1, 1, 1, 1, 1, 0, 1, 1),
    (2, 3, 7, 7, 5, 3, 1, 1, 1, 1),
    (2, 4, 9, 7, 6, 3, 2, 1, 1, 2),
    (1, 3, 11, 11, 4, 3, 1, 2, 2, 1),
    (0, 3, 7, 7, 4, 3, 1, 1, 1, 1),
    (1, 6, 5, 5, 6, 3, 1, 1, 1, 6),  # depthwise
]


def _inputs(case, dtype, mask_kind, contiguous=True, bias=True):
    n, cin, h, w, cout, k, stride, padding, dilation, groups = case
    x = torch.randn(n, cin, h, w, dtype=torch.float64).to(dtype)
    weight = torch.randn(cout, cin // groups, k, k, dtype=torch.float64).to(dtype)
    mask = make_mask(weight.shape, mask_kind, dtype)
    b = torch.randn(cout, dtype=torch.float64).to(dtype) if bias else None
    if not contiguous:
        x, weight, mask = noncontiguous(x), noncontiguous(weight), noncontiguous(mask)
    conv = dict(stride=(stride, stride), padding=(padding, padding), dilation=(dilation, dilation), groups=groups)
    return dict(x=x, weight=weight, mask=mask, bias=b), conv


@pytest.mark.parametrize("dtype", CPU_DTYPES, ids=str)
@pytest.mark.parametrize("case", CASES, ids=str)
@pytest.mark.parametrize("mask_kind", MASK_KINDS)
@pytest.mark.parametrize("contiguous", [True, False], ids=["contig", "noncontig"])
def test_forward_backward_vs_reference(dtype, case, mask_kind, contiguous):
    inputs, conv = _inputs(case, dtype, mask_kind, contiguous)
    ours, ours_grads = outputs_and_grads(lambda **a: masked_conv2d(**a, **conv), inputs)
    torch_own, torch_grads = outputs_and_grads(lambda **a: reference.masked_conv2d(**a, **conv), inputs)
    ref, ref_grads = outputs_and_grads(lambda **a: reference.masked_conv2d(**a, **conv), to64(inputs))
    assert_within_torch_error("y", ours, torch_own, ref)
    for name in ref_grads:
        assert_within_torch_error(f"d{name}", ours_grads[name], torch_grads[name], ref_grads[name])


def test_channels_last_input():
    inputs, conv = _inputs(CASES[1], torch.float32, "float")
    inputs["x"] = inputs["x"].contiguous(memory_format=torch.channels_last)
    ours, ours_grads = outputs_and_grads(lambda **a: masked_conv2d(**a, **conv), inputs)
    ref, ref_grads = outputs_and_grads(lambda **a: reference.masked_conv2d(**a, **conv), inputs)
    torch.testing.assert_close(ours, ref)
    for name in ref_grads:
        torch.testing.assert_close(ours_grads[name], ref_grads[name])


def test_unbatched_input():
    inputs, conv = _inputs(CASES[1], torch.float64, "bool")
    x = inputs.pop("x")[0]
    torch.testing.assert_close(masked_conv2d(x, **inputs, **conv), reference.masked_conv2d(x[None], **inputs, **conv)[0])


@pytest.mark.parametrize("mask_kind", ["bool", "float"])
def test_gradcheck(mask_kind):
    inputs, conv = _inputs(CASES[2], torch.float64, mask_kind)
    for k in ("x", "weight", "bias"):
        inputs[k].requires_grad_()
    if mask_kind == "float":
        inputs["mask"].requires_grad_()
    fn = lambda x, weight, mask, bias: masked_conv2d(x, weight, mask, bias, **conv)
    assert torch.autograd.gradcheck(fn, (inputs["x"], inputs["weight"], inputs["mask"], inputs["bias"]))


@pytest.mark.parametrize("mask_kind", ["bool", "float"])
def test_opcheck(mask_kind):
    for case in (CASES[1], CASES[2], CASES[4]):
        inputs, conv = _inputs(case, torch.float32, mask_kind)
        inputs["x"].requires_grad_()
        inputs["weight"].requires_grad_()
        if mask_kind == "float":
            inputs["mask"].requires_grad_()
        conv_args = [list(conv["stride"]), list(conv["padding"]), list(conv["dilation"]), conv["groups"]]
        args = (inputs["x"], inputs["weight"], inputs["mask"], inputs["bias"], *conv_args)
        torch.library.opcheck(torch.ops.sparsesam.masked_conv2d.default, args)
        y = torch.ops.sparsesam.masked_conv2d.default(*[a.detach() if isinstance(a, torch.Tensor) else a for a in args])
        bwd = (torch.randn_like(y), inputs["x"].detach(), inputs["weight"].detach(), inputs["mask"].detach(), *conv_args,
               [True, True, mask_kind == "float"])
        torch.library.opcheck(torch.ops.sparsesam.masked_conv2d_backward.default, bwd)


@pytest.mark.parametrize(
    "change, error, words",
    [
        (dict(mask=torch.ones(4, 3, 3, 2, dtype=torch.bool)), ValueError, "mask has shape"),
        (dict(mask=torch.ones(4, 3, 3, 3, dtype=torch.float16)), TypeError, "mask must be bool"),
        (dict(mask=torch.full((4, 3, 3, 3), float("nan"))), ValueError, "mask contains NaN"),
        (dict(weight=torch.randn(4, 27)), ValueError, "weight must have 4 dimensions"),
        (dict(x=torch.randn(2, 3, 8)), ValueError, "x has 2 channels"),
        (dict(x=torch.randn(8, 8)), ValueError, "x must have 3 or 4 dimensions"),
        (dict(bias=torch.randn(5)), ValueError, "bias has 5 entries"),
        (dict(stride=0), ValueError, "stride must be >= 1"),
        (dict(stride=2.5), TypeError, "stride must be an int or a pair of ints"),
        (dict(stride=(1, 2.0)), TypeError, "stride must be an int or a pair of ints"),
        (dict(dilation=True), TypeError, "dilation must be an int or a pair of ints"),
        (dict(dilation=(1, 0)), ValueError, "dilation must be >= 1"),
        (dict(padding=-1), ValueError, "padding must be >= 0"),
        (dict(padding="same"), TypeError, "padding must be an int or a pair of ints"),
        (dict(padding=(1, 1, 1)), ValueError, "padding must be an int or a pair"),
        (dict(groups=1.0), TypeError, "groups must be an int"),
        (dict(groups=0), ValueError, "groups must be >= 1"),
        (dict(groups=2), ValueError, "x has 3 channels but weight expects in_channels=6"),
    ],
)
def test_bad_input_names_the_argument(change, error, words):
    args = dict(x=torch.randn(2, 3, 8, 8), weight=torch.randn(4, 3, 3, 3), mask=torch.ones(4, 3, 3, 3, dtype=torch.bool),
                bias=torch.randn(4), stride=1, padding=1, dilation=1, groups=1)
    args.update(change)
    with pytest.raises(error, match=words):
        masked_conv2d(**args)
