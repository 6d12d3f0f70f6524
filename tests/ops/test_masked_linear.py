"""The masked_linear op on every backend.

The first test runs on every backend (``backends.OP_BACKENDS``: reference, CPU C++, Triton under
the interpreter, CUDA C++), each skipped with the reason where this machine lacks it; the sections
after it are the backend-specific tests.

Reference and CPU C++ kernels: masked_linear (C++ CPU kernel through the registered op) vs sparsesam.reference.

Triton kernels (marked triton): The Triton masked-layer kernels (sparsesam.triton_kernels) vs sparsesam.reference.

They run on CPU under the Triton interpreter:

    TRITON_INTERPRET=1 python -m pytest -m triton tests/ops/test_masked_linear.py

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
from sparsesam.ops import masked_linear

from backends import backend_op, cuda_cpp_case, OP_BACKENDS, tk, triton_case
from op_cases import (DTYPES, make_mask, MASK_KINDS, noncontiguous, outputs_and_grads, placeholder, pruned_mask,
                      rounded_randn, tensors_to64, to64)
from tolerance import (assert_as_accurate_as_pytorch, assert_outputs_as_accurate_as_pytorch, assert_within_torch_error,
                       assert_within_torch_error_or_same_pattern)


# ============================================================================
# Every backend (reference, cpu, triton, cuda) against the dense float64 math

@pytest.mark.parametrize("mask_kind", ["bool", "float"])
@pytest.mark.parametrize("backend", OP_BACKENDS)
def test_every_backend_matches_f_linear_on_the_masked_weight(backend, mask_kind):
    """y, dx, dW = G*M and dM = G*W (G = dL/d(W*M)) in float32 against the float64 dense math."""
    forward, device = backend_op(backend, "masked_linear")
    backward, _ = backend_op(backend, "masked_linear_backward")
    x, w, b, g = (torch.randn(*s, dtype=torch.float64) for s in ((5, 3, 33), (17, 33), (17,), (5, 3, 17)))
    mask = make_mask((17, 33), mask_kind, torch.float64)

    def dense(x, w, mask, b, g):
        m = mask.to(w.dtype)
        G = g.reshape(-1, 17).t() @ x.reshape(-1, 33)
        return F.linear(x, w * m, b), g @ (w * m), G * m, G * w

    def f32(t):
        return t.float() if t.is_floating_point() else t

    truth = dense(x, w, mask, b, g)
    torch_own = dense(*(f32(t) for t in (x, w, mask, b, g)))
    on = lambda t: f32(t).to(device)  # noqa: E731
    want = [True, True, mask_kind == "float"]  # a bool mask has no gradient
    ours = (forward(on(x), on(w), on(mask), on(b)), *backward(on(g), on(x), on(w), on(mask), want))
    for name, o, own, ref, sums, wanted in zip(("y", "dx", "dW", "dM"), ours, torch_own, truth, (33, 17, 15, 15),
                                               [True, *want]):
        if wanted:
            assert_within_torch_error(name, o.cpu(), own, ref, reduction_size=sums)
        else:
            assert o.shape == (0,)


# ============================================================================
# Reference and CPU C++ kernels

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


# ============================================================================
# Triton kernels (marked triton)

# bfloat16 cannot be checked under the interpreter: it keeps bfloat16 as raw
# uint16 bits, so arithmetic and tl.dot on bfloat16 values act on the bit
# patterns, and its float32 -> bfloat16 cast truncates instead of rounding to
# nearest even. float16, which numpy has natively, stands in for the 16-bit
# path (the kernels widen both to float32 the same way).
DTYPES_triton = [torch.float32, torch.float64, torch.float16]
OUTPUT_MASKS_3 = list(itertools.product([True, False], repeat=3))


def _poisoned_weight(shape, dtype, mask):
    """Random weights with inf / -inf / nan wherever a bool mask prunes: the output must not see them."""
    w = rounded_randn(*shape, dtype=dtype)
    if mask.dtype == torch.bool and w.numel():
        poison = torch.tensor([float("inf"), float("-inf"), float("nan")], dtype=dtype)
        fill = poison[torch.arange(w.numel()) % 3].reshape(shape)
        w = torch.where(mask, w, fill)
    return w


# ---------------------------------------------------------------- masked_linear

# (leading dims of x, in_features, out_features): 1s; one tile; K = 129 over
# three K-blocks; 3-D x with N = 129 output tiles; a batch of 129 (three
# reduction blocks for G); a batch of 0.
LINEAR_SHAPES = [((1,), 1, 1), ((7,), 7, 7), ((5,), 129, 7), ((2, 3), 7, 129), ((129,), 7, 5), ((0,), 7, 5)]


def _linear_inputs(lead, n_in, n_out, dtype, mask_kind, layout):
    x = rounded_randn(*lead, n_in, dtype=dtype)
    weight = rounded_randn(n_out, n_in, dtype=dtype)
    mask = make_mask((n_out, n_in), mask_kind, dtype)
    grad_out = rounded_randn(*lead, n_out, dtype=dtype)
    bias = rounded_randn(n_out, dtype=dtype)
    if layout == "noncontig":
        x, weight, mask, grad_out = (noncontiguous(t) for t in (x, weight, mask, grad_out))
        bias = rounded_randn(2 * n_out, dtype=dtype)[::2]  # a strided bias
    return x, weight, mask, bias, grad_out


def _check_linear(x, weight, mask, bias, grad_out, output_mask=(True, True, True)):
    n_out, n_in = weight.shape
    batch = x.numel() // n_in if n_in else grad_out.numel() // max(n_out, 1)
    y = tk.masked_linear(x, weight, mask, bias)
    assert_within_torch_error_or_same_pattern(
        "y", y, reference.masked_linear(x, weight, mask, bias),
        reference.masked_linear(*tensors_to64(x, weight, mask, bias)), reduce_len=n_in,
    )
    ours = tk.masked_linear_backward(grad_out, x, weight, mask, output_mask)
    torch_own = reference.masked_linear_backward(grad_out, x, weight, mask, output_mask)
    ref64 = reference.masked_linear_backward(*tensors_to64(grad_out, x, weight, mask), output_mask)
    for name, o, t, r, n in zip(("dx", "dW", "dM"), ours, torch_own, ref64, (n_out, batch, batch)):
        assert_within_torch_error_or_same_pattern(name, o, t, r, reduce_len=n)


@triton_case
@pytest.mark.parametrize("mask_kind", MASK_KINDS)
@pytest.mark.parametrize("dtype", DTYPES_triton, ids=str)
@pytest.mark.parametrize("shape", LINEAR_SHAPES, ids=str)
def test_masked_linear_forward_backward(shape, dtype, mask_kind):
    _check_linear(*_linear_inputs(*shape, dtype, mask_kind, "contig"))


@triton_case
# The layout only changes the strides the kernels are given, so it is swept
# with one mask kind (each launch costs the interpreter tens of ms): a float
# mask, which every operand's strides are used with (the masked load, dM = G*W).
@pytest.mark.parametrize("dtype", DTYPES_triton, ids=str)
@pytest.mark.parametrize("shape", LINEAR_SHAPES, ids=str)
def test_masked_linear_noncontiguous(shape, dtype):
    _check_linear(*_linear_inputs(*shape, dtype, "float", "noncontig"))


@triton_case
@pytest.mark.parametrize("dtype", DTYPES_triton, ids=str)
def test_masked_linear_without_bias(dtype):
    x, weight, mask, _, grad_out = _linear_inputs((3, 5), 33, 65, dtype, "float", "contig")
    _check_linear(x, weight, mask, None, grad_out)


@triton_case
# 1-D x; no inputs (the output is the bias); no outputs (dx is a sum of nothing).
@pytest.mark.parametrize("lead,n_in,n_out", [((), 9, 6), ((3,), 0, 4), ((3,), 5, 0)], ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_masked_linear_degenerate_shapes(lead, n_in, n_out, dtype):
    inputs = _linear_inputs(lead, n_in, n_out, dtype, "float", "contig")
    if n_in and n_out:
        _check_linear(*inputs)
        return
    # reference.masked_linear_backward cannot form G here (reshape(-1, 0) is
    # ambiguous), so G's outputs are checked for their (empty) shape.
    _check_linear(*inputs, output_mask=(True, False, False))
    x, weight, mask, _, grad_out = inputs
    _, dw, dm = tk.masked_linear_backward(grad_out, x, weight, mask, (False, True, True))
    assert dw.shape == dm.shape == weight.shape and dw.dtype == dm.dtype == dtype


@triton_case
@pytest.mark.parametrize("output_mask", OUTPUT_MASKS_3, ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_masked_linear_backward_output_mask(dtype, output_mask):
    want_dx, want_dw, want_dm = output_mask
    x, weight, mask, _, grad_out = _linear_inputs((4, 3), 19, 37, dtype, "float", "noncontig")
    # As the op's autograd calls it: an input that no wanted output reads is
    # a zero-stride placeholder (x is read by dW/dM, the weight by dx/dM).
    x_arg = x if (want_dw or want_dm) else placeholder(grad_out, x.shape)
    w_arg = weight if (want_dx or want_dm) else placeholder(grad_out, weight.shape)
    ours = tk.masked_linear_backward(grad_out, x_arg, w_arg, mask, output_mask)
    torch_own = reference.masked_linear_backward(grad_out, x, weight, mask, output_mask)
    ref64 = reference.masked_linear_backward(*tensors_to64(grad_out, x, weight, mask), output_mask)
    for name, wanted, o, t, r in zip(("dx", "dW", "dM"), output_mask, ours, torch_own, ref64):
        if wanted:
            assert_within_torch_error_or_same_pattern(name, o, t, r, reduce_len=37)
        else:
            assert o.shape == (0,) and o.dtype == t.dtype, f"{name} not asked for: got {o.dtype} {tuple(o.shape)}"


@triton_case
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16], ids=str)
def test_masked_linear_bool_mask_hides_inf_and_nan_weights(dtype):
    mask = make_mask((70, 9), "bool", dtype)
    weight = _poisoned_weight((70, 9), dtype, mask)
    x, grad_out = rounded_randn(5, 9, dtype=dtype), rounded_randn(5, 70, dtype=dtype)
    y = tk.masked_linear(x, weight, mask, None)
    dx, dw, _ = tk.masked_linear_backward(grad_out, x, weight, mask, (True, True, False))
    assert torch.isfinite(y).all() and torch.isfinite(dx).all() and torch.isfinite(dw).all()
    _check_linear(x, weight, mask, None, grad_out, (True, True, False))


@triton_case
def test_masked_linear_all_zero_mask_gives_exactly_bias_and_zero_grads():
    x, weight, mask, bias, grad_out = _linear_inputs((129,), 7, 70, torch.float32, "zeros", "contig")
    assert torch.equal(tk.masked_linear(x, weight, mask, bias), bias.expand(129, 70))
    dx, dw, _ = tk.masked_linear_backward(grad_out, x, weight, mask, (True, True, False))
    assert torch.count_nonzero(dx) == 0 and torch.count_nonzero(dw) == 0


# ============================================================================
# CUDA C++ kernels on a GPU (marked gpu)

DTYPES_cuda_cpp = [torch.float32, torch.float64, torch.bfloat16]
MASK_KINDS_cuda_cpp = ["bool", "float"]
ops = torch.ops.sparsesam_cuda


LINEAR_CASES = [
    # (x shape, out_features)
    ((5, 13), 7),
    ((2, 3, 65), 33),
    ((0, 13), 7),  # batch 0
    ((1, 1), 1),
]
BACKWARD_MASKS = list(itertools.product([False, True], repeat=3))


@cuda_cpp_case
@pytest.mark.parametrize("dtype", DTYPES_cuda_cpp)
@pytest.mark.parametrize("kind", MASK_KINDS_cuda_cpp)
@pytest.mark.parametrize("x_shape,out_features", LINEAR_CASES)
@pytest.mark.parametrize("with_bias", [False, True])
def test_masked_linear(dtype, kind, x_shape, out_features, with_bias):
    x = torch.randn(x_shape, device="cuda", dtype=dtype)
    w = torch.randn(out_features, x_shape[-1], device="cuda", dtype=dtype)
    m = pruned_mask(w.shape, kind, dtype)
    b = torch.randn(out_features, device="cuda", dtype=dtype) if with_bias else None
    out = ops.masked_linear(x, w, m, b)
    assert_as_accurate_as_pytorch(out, reference.masked_linear(x, w, m, b),
                                  reference.masked_linear(*tensors_to64(x, w, m, b)))


@cuda_cpp_case
@pytest.mark.parametrize("dtype", DTYPES_cuda_cpp)
@pytest.mark.parametrize("kind", MASK_KINDS_cuda_cpp)
@pytest.mark.parametrize("x_shape,out_features", LINEAR_CASES)
@pytest.mark.parametrize("output_mask", BACKWARD_MASKS)
def test_masked_linear_backward(dtype, kind, x_shape, out_features, output_mask):
    x = torch.randn(x_shape, device="cuda", dtype=dtype)
    w = torch.randn(out_features, x_shape[-1], device="cuda", dtype=dtype)
    m = pruned_mask(w.shape, kind, dtype)
    dy = torch.randn(*x_shape[:-1], out_features, device="cuda", dtype=dtype)
    if output_mask[2] and kind == "bool":
        with pytest.raises(RuntimeError, match="bool mask has no gradient"):
            ops.masked_linear_backward(dy, x, w, m, list(output_mask))
        return
    outs = ops.masked_linear_backward(dy, x, w, m, list(output_mask))
    refs = reference.masked_linear_backward(dy, x, w, m, output_mask)
    refs64 = reference.masked_linear_backward(*tensors_to64(dy, x, w, m), output_mask)
    assert_outputs_as_accurate_as_pytorch(outs, refs, refs64, output_mask)
