"""The masked_conv2d op on every backend.

The first test runs on every backend (``backends.OP_BACKENDS``: reference, CPU C++, Triton under
the interpreter, CUDA C++), each skipped with the reason where this machine lacks it; the sections
after it are the backend-specific tests.

Reference and CPU C++ kernels: masked_conv2d (C++ CPU kernel through the registered op) vs sparsesam.reference.

Triton kernels (marked triton): The Triton masked-layer kernels (sparsesam.triton_kernels) vs sparsesam.reference.

They run on CPU under the Triton interpreter:

    TRITON_INTERPRET=1 python -m pytest -m triton tests/ops/test_masked_conv2d.py

TRITON_INTERPRET must be set before triton is imported, so these cases skip
themselves when it is not. The interpreter simulates one program at a time, so
sizes stay small (matmul dimensions <= 129) but odd: 1, 7 and 129 give single
tiles, partial tiles and several tiles of the interpreter's 64-wide blocks.

Elementwise ops must match the reference bit for bit. Matmuls follow the
flash-attention rule: the error against the reference computed in float64 from
the same inputs is at most twice PyTorch's own error in the test dtype, plus a
few ulps and the float64 rounding-order slack of a length-K sum.

CUDA C++ kernels on a GPU (marked gpu): The CUDA C++ kernels (torch.ops.sparsesam_cuda) against sparsesam.reference, on a GPU.

They are called directly (not through the router, so they are tested
whatever backend is bound). Elementwise ops must equal the reference
bit for bit (same math, rounded once); GEMM/convolution results must be
within twice PyTorch's own error versus float64 (flash-attention's rule),
since both go through the same cuBLAS/cuDNN calls. Without a GPU and a
build with SPARSESAM_CUDA=1 these cases are skipped.
"""
from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F

from sparsesam import reference
from sparsesam.ops import masked_conv2d

from backends import backend_op, cuda_cpp_case, OP_BACKENDS, tk, triton_case
from op_cases import (DTYPES, make_mask, MASK_KINDS, noncontiguous, outputs_and_grads, placeholder, pruned_mask,
                      rounded_randn, tensors_to64, to64)
from tolerance import (assert_as_accurate_as_pytorch, assert_outputs_as_accurate_as_pytorch, assert_within_torch_error,
                       assert_within_torch_error_or_same_pattern)


# ============================================================================
# Every backend (reference, cpu, triton, cuda) against the dense float64 math

@pytest.mark.parametrize("mask_kind", ["bool", "float"])
@pytest.mark.parametrize("backend", OP_BACKENDS)
def test_every_backend_matches_conv2d_on_the_masked_weight(backend, mask_kind):
    """y, dx, dW = G*M and dM = G*W of a grouped, strided, padded convolution, float32 vs the float64 dense math."""
    forward, device = backend_op(backend, "masked_conv2d")
    backward, _ = backend_op(backend, "masked_conv2d_backward")
    conv = ([2, 1], [1, 2], [1, 1], 2)  # stride, padding, dilation, groups
    x, w, b = torch.randn(2, 4, 7, 9, dtype=torch.float64), torch.randn(6, 2, 3, 1, dtype=torch.float64), \
        torch.randn(6, dtype=torch.float64)
    mask = make_mask(w.shape, mask_kind, torch.float64)
    g = torch.randn(F.conv2d(x, w, b, *conv).shape, dtype=torch.float64)

    def dense(x, w, mask, b, g):
        m = mask.to(w.dtype)
        x, effective = x.clone().requires_grad_(), (w * m).requires_grad_()
        y = F.conv2d(x, effective, b, *conv)
        dx, G = torch.autograd.grad(y, [x, effective], g)
        return y.detach(), dx, G * m, G * w

    def f32(t):
        return t.float() if t.is_floating_point() else t

    truth = dense(x, w, mask, b, g)
    torch_own = dense(*(f32(t) for t in (x, w, mask, b, g)))
    on = lambda t: f32(t).to(device)  # noqa: E731
    want = [True, True, mask_kind == "float"]  # a bool mask has no gradient
    ours = (forward(on(x), on(w), on(mask), on(b), *conv), *backward(on(g), on(x), on(w), on(mask), *conv, want))
    sums = (2 * 3, 3 * 3, g[:, 0].numel(), g[:, 0].numel())  # C_in/groups*kh*kw, C_out/groups*kh*kw, N*OH*OW
    for name, o, own, ref, n, wanted in zip(("y", "dx", "dW", "dM"), ours, torch_own, truth, sums, [True, *want]):
        if wanted:
            assert_within_torch_error(name, o.cpu(), own, ref, reduction_size=n)
        else:
            assert o.shape == (0,)


# ============================================================================
# Reference and CPU C++ kernels

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


# ============================================================================
# Triton kernels (marked triton)

# bfloat16 cannot be checked under the interpreter: it keeps bfloat16 as raw
# uint16 bits, so arithmetic and tl.dot on bfloat16 values act on the bit
# patterns, and its float32 -> bfloat16 cast truncates instead of rounding to
# nearest even. float16, which numpy has natively, stands in for the 16-bit
# path (the kernels widen both to float32 the same way).
DTYPES_triton = [torch.float32, torch.float64, torch.float16]
OUTPUT_MASKS_3 = list(itertools.product([True, False], repeat=3))


# ---------------------------------------------------------------- masked_conv2d

# (x shape, weight shape, stride, padding, dilation, groups)
CONV_CASES = [
    ((2, 3, 7, 9), (5, 3, 3, 3), (1, 1), (0, 0), (1, 1), 1),
    ((2, 4, 7, 9), (6, 2, 3, 1), (2, 1), (1, 2), (1, 1), 2),
    ((1, 3, 9, 8), (4, 3, 2, 3), (1, 2), (2, 1), (2, 2), 1),
    ((1, 3, 5, 6), (3, 1, 3, 3), (2, 2), (1, 1), (1, 1), 3),  # depthwise (slow on CPU: kept small)
    ((0, 3, 5, 5), (2, 3, 3, 3), (1, 1), (1, 1), (1, 1), 1),  # a batch of 0
]


def _conv_inputs(x_shape, w_shape, conv_args, dtype, mask_kind, layout):
    x = rounded_randn(*x_shape, dtype=dtype)
    weight = rounded_randn(*w_shape, dtype=dtype)
    mask = make_mask(w_shape, mask_kind, dtype)
    bias = rounded_randn(w_shape[0], dtype=dtype)
    grad_out = rounded_randn(*reference.masked_conv2d(x, weight, mask, None, *conv_args).shape, dtype=dtype)
    if layout == "noncontig":
        x, grad_out = x.contiguous(memory_format=torch.channels_last), grad_out.contiguous(memory_format=torch.channels_last)
        weight, mask = noncontiguous(weight), noncontiguous(mask)
    return x, weight, mask, bias, grad_out


def _reduce_lens(x, weight, grad_out, groups):
    """Terms summed per output: y <- C_in/g * kh * kw, dx <- C_out/g * kh * kw, G <- N * OH * OW."""
    per_window = weight[0].numel()
    return per_window, weight.shape[0] // groups * weight.shape[2] * weight.shape[3], grad_out[:, 0].numel()


@triton_case
@pytest.mark.parametrize(
    "mask_kind,layout", [(kind, "contig") for kind in MASK_KINDS] + [("float", "noncontig"), ("bool", "noncontig")]
)
@pytest.mark.parametrize("dtype", DTYPES_triton, ids=str)
@pytest.mark.parametrize("case", CONV_CASES, ids=str)
def test_masked_conv2d_forward_backward(case, dtype, mask_kind, layout):
    x_shape, w_shape, *conv_args = case
    groups = conv_args[-1]
    x, weight, mask, bias, grad_out = _conv_inputs(x_shape, w_shape, conv_args, dtype, mask_kind, layout)
    n_y, n_dx, n_g = _reduce_lens(x, weight, grad_out, groups)
    assert_within_torch_error_or_same_pattern(
        "y", tk.masked_conv2d(x, weight, mask, bias, *conv_args),
        reference.masked_conv2d(x, weight, mask, bias, *conv_args),
        reference.masked_conv2d(*tensors_to64(x, weight, mask, bias), *conv_args), reduce_len=n_y,
    )
    want = (True, True, True)
    ours = tk.masked_conv2d_backward(grad_out, x, weight, mask, *conv_args, want)
    torch_own = reference.masked_conv2d_backward(grad_out, x, weight, mask, *conv_args, want)
    ref64 = reference.masked_conv2d_backward(*tensors_to64(grad_out, x, weight, mask), *conv_args, want)
    for name, o, t, r, n in zip(("dx", "dW", "dM"), ours, torch_own, ref64, (n_dx, n_g, n_g)):
        assert_within_torch_error_or_same_pattern(name, o, t, r, reduce_len=n)


@triton_case
@pytest.mark.parametrize("output_mask", OUTPUT_MASKS_3, ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_masked_conv2d_backward_output_mask(dtype, output_mask):
    want_dx, want_dw, want_dm = output_mask
    x_shape, w_shape, *conv_args = CONV_CASES[1]
    x, weight, mask, _, grad_out = _conv_inputs(x_shape, w_shape, conv_args, dtype, "float", "contig")
    x_arg = x if (want_dw or want_dm) else placeholder(grad_out, x.shape)
    w_arg = weight if (want_dx or want_dm) else placeholder(grad_out, weight.shape)
    ours = tk.masked_conv2d_backward(grad_out, x_arg, w_arg, mask, *conv_args, output_mask)
    torch_own = reference.masked_conv2d_backward(grad_out, x, weight, mask, *conv_args, output_mask)
    ref64 = reference.masked_conv2d_backward(*tensors_to64(grad_out, x, weight, mask), *conv_args, output_mask)
    n_y, n_dx, n_g = _reduce_lens(x, weight, grad_out, conv_args[-1])
    for name, wanted, o, t, r, n in zip(("dx", "dW", "dM"), output_mask, ours, torch_own, ref64, (n_dx, n_g, n_g)):
        if wanted:
            assert_within_torch_error_or_same_pattern(name, o, t, r, reduce_len=n)
        else:
            assert o.shape == (0,) and o.dtype == t.dtype, f"{name} not asked for: got {o.dtype} {tuple(o.shape)}"


# ============================================================================
# CUDA C++ kernels on a GPU (marked gpu)

DTYPES_cuda_cpp = [torch.float32, torch.float64, torch.bfloat16]
MASK_KINDS_cuda_cpp = ["bool", "float"]
ops = torch.ops.sparsesam_cuda


BACKWARD_MASKS = list(itertools.product([False, True], repeat=3))


CONV_CASES_cuda_cpp = [
    # (x shape, weight shape, stride, padding, dilation, groups)
    ((2, 3, 9, 11), (5, 3, 3, 3), (1, 1), (0, 0), (1, 1), 1),
    ((2, 4, 10, 7), (6, 2, 3, 2), (2, 1), (1, 2), (1, 1), 2),
    ((1, 4, 12, 12), (4, 1, 3, 3), (1, 2), (2, 2), (2, 2), 4),  # depthwise, dilated
    ((0, 3, 8, 8), (5, 3, 3, 3), (1, 1), (1, 1), (1, 1), 1),  # batch 0
]


@cuda_cpp_case
@pytest.mark.parametrize("dtype", DTYPES_cuda_cpp)
@pytest.mark.parametrize("kind", MASK_KINDS_cuda_cpp)
@pytest.mark.parametrize("case", CONV_CASES_cuda_cpp)
@pytest.mark.parametrize("with_bias", [False, True])
def test_masked_conv2d(dtype, kind, case, with_bias):
    x_shape, w_shape, stride, padding, dilation, groups = case
    x = torch.randn(x_shape, device="cuda", dtype=dtype)
    w = torch.randn(w_shape, device="cuda", dtype=dtype)
    m = pruned_mask(w_shape, kind, dtype)
    b = torch.randn(w_shape[0], device="cuda", dtype=dtype) if with_bias else None
    conv = (list(stride), list(padding), list(dilation), groups)
    out = ops.masked_conv2d(x, w, m, b, *conv)
    assert_as_accurate_as_pytorch(
        out, reference.masked_conv2d(x, w, m, b, *conv), reference.masked_conv2d(*tensors_to64(x, w, m, b), *conv)
    )


@cuda_cpp_case
@pytest.mark.parametrize("dtype", DTYPES_cuda_cpp)
@pytest.mark.parametrize("kind", MASK_KINDS_cuda_cpp)
@pytest.mark.parametrize("case", CONV_CASES_cuda_cpp)
@pytest.mark.parametrize("output_mask", BACKWARD_MASKS)
def test_masked_conv2d_backward(dtype, kind, case, output_mask):
    x_shape, w_shape, stride, padding, dilation, groups = case
    x = torch.randn(x_shape, device="cuda", dtype=dtype)
    w = torch.randn(w_shape, device="cuda", dtype=dtype)
    m = pruned_mask(w_shape, kind, dtype)
    conv = (list(stride), list(padding), list(dilation), groups)
    dy = torch.randn_like(reference.masked_conv2d(x, w, m, None, *conv))
    if output_mask[2] and kind == "bool":
        with pytest.raises(RuntimeError, match="bool mask has no gradient"):
            ops.masked_conv2d_backward(dy, x, w, m, *conv, list(output_mask))
        return
    outs = ops.masked_conv2d_backward(dy, x, w, m, *conv, list(output_mask))
    refs = reference.masked_conv2d_backward(dy, x, w, m, *conv, output_mask)
    refs64 = reference.masked_conv2d_backward(*tensors_to64(dy, x, w, m), *conv, output_mask)
    assert_outputs_as_accurate_as_pytorch(outs, refs, refs64, output_mask)
