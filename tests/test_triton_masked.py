"""The Triton masked-layer kernels (sparsesam.triton_kernels) vs sparsesam.reference.

They run on CPU under the Triton interpreter:

    TRITON_INTERPRET=1 python -m pytest -m triton tests/test_triton_masked.py

TRITON_INTERPRET must be set before triton is imported, so the module skips
itself when it is not. The interpreter simulates one program at a time, so
sizes stay small (matmul dimensions <= 129) but odd: 1, 7 and 129 give single
tiles, partial tiles and several tiles of the interpreter's 64-wide blocks.

Elementwise ops must match the reference bit for bit. Matmuls follow the
flash-attention rule: the error against the reference computed in float64 from
the same inputs is at most twice PyTorch's own error in the test dtype, plus a
few ulps and the float64 rounding-order slack of a length-K sum.
"""
import itertools
import os

import pytest

pytestmark = pytest.mark.triton

if os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("needs TRITON_INTERPRET=1 set before triton is imported", allow_module_level=True)

pytest.importorskip("triton")

import torch  # noqa: E402

from sparsesam import reference  # noqa: E402
from sparsesam.triton_kernels import (  # noqa: E402
    apply_mask,
    masked_conv2d,
    masked_conv2d_backward,
    masked_linear,
    masked_linear_backward,
    masked_weight_grad,
)

from op_cases import MASK_KINDS, make_mask, noncontiguous  # noqa: E402
from tolerance import assert_within_torch_error  # noqa: E402

# bfloat16 cannot be checked under the interpreter: it keeps bfloat16 as raw
# uint16 bits, so arithmetic and tl.dot on bfloat16 values act on the bit
# patterns, and its float32 -> bfloat16 cast truncates instead of rounding to
# nearest even. float16, which numpy has natively, stands in for the 16-bit
# path (the kernels widen both to float32 the same way).
DTYPES = [torch.float32, torch.float64, torch.float16]
LAYOUTS = ["contig", "noncontig"]
OUTPUT_MASKS_2 = list(itertools.product([True, False], repeat=2))
OUTPUT_MASKS_3 = list(itertools.product([True, False], repeat=3))


def _randn(*shape, dtype):
    # Drawn in float64 and rounded once, so every dtype sees the same values.
    return torch.randn(*shape, dtype=torch.float64).to(dtype)


def _to64(*tensors):
    """The same inputs in float64 (a bool mask stays bool)."""
    return [t.double() if t is not None and t.is_floating_point() else t for t in tensors]


def _placeholder(like, shape):
    """What the ops' autograd passes for an input it did not save: zero strides, no memory."""
    return like.new_zeros(()).expand(shape)


def _assert_identical(name, ours, theirs):
    assert ours.dtype == theirs.dtype, f"{name}: dtype {ours.dtype} != {theirs.dtype}"
    assert ours.shape == theirs.shape, f"{name}: shape {tuple(ours.shape)} != {tuple(theirs.shape)}"
    torch.testing.assert_close(ours, theirs, rtol=0, atol=0, equal_nan=True, msg=lambda m: f"{name}: {m}")


def _assert_within_torch_error(name, ours, torch_own, ref64, reduce_len=1):
    """The flash-attention rule of tests/tolerance.py; a blocked Triton sum adds
    in another order than torch's GEMM, hence the reduction-length slack."""
    if ours.dtype == torch.bool:
        # dM of a bool mask is (G*W).to(bool): a pattern, not a number.
        assert torch.equal(ours, torch_own), f"{name}: bool pattern differs from torch's"
        return
    assert_within_torch_error(name, ours, torch_own, ref64, reduction_size=reduce_len)


def _poisoned_weight(shape, dtype, mask):
    """Random weights with inf / -inf / nan wherever a bool mask prunes: the output must not see them."""
    w = _randn(*shape, dtype=dtype)
    if mask.dtype == torch.bool and w.numel():
        poison = torch.tensor([float("inf"), float("-inf"), float("nan")], dtype=dtype)
        fill = poison[torch.arange(w.numel()) % 3].reshape(shape)
        w = torch.where(mask, w, fill)
    return w


# ---------------------------------------------------------------- apply_mask / masked_weight_grad

# 1 element; a 2-D weight whose transpose is a real non-contiguous view;
# a conv-shaped weight spanning three 1024-element blocks; empty.
ELEMENTWISE_SHAPES = [(1,), (7, 129), (5, 3, 11, 13), (0, 5)]


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("mask_kind", MASK_KINDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", ELEMENTWISE_SHAPES, ids=str)
def test_apply_mask_matches_reference_exactly(shape, dtype, mask_kind, layout):
    mask = make_mask(shape, mask_kind, dtype)
    weight = _poisoned_weight(shape, dtype, mask)
    if layout == "noncontig":
        weight, mask = noncontiguous(weight), noncontiguous(mask)
    out = apply_mask(weight, mask)
    _assert_identical("W*M", out, reference.apply_mask(weight, mask))
    assert out.is_contiguous()


@pytest.mark.parametrize("output_mask", OUTPUT_MASKS_2, ids=str)
@pytest.mark.parametrize("mask_kind", MASK_KINDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", ELEMENTWISE_SHAPES, ids=str)
def test_masked_weight_grad_matches_reference_exactly(shape, dtype, mask_kind, output_mask):
    mask = make_mask(shape, mask_kind, dtype)
    weight = _poisoned_weight(shape, dtype, mask)
    grad = _randn(*shape, dtype=dtype)
    # G arrives transposed-and-back (non-contiguous) as it may from autograd.
    grad, mask = noncontiguous(grad), noncontiguous(mask)
    # dW never reads the weight: pass a placeholder as apply_mask's backward may.
    weight_arg = weight if output_mask[1] else _placeholder(grad, shape)
    ours = masked_weight_grad(grad, weight_arg, mask, output_mask)
    theirs = reference.masked_weight_grad(grad, weight, mask, output_mask)
    for name, o, t in zip(("dW", "dM"), ours, theirs):
        _assert_identical(name, o, t)


# ---------------------------------------------------------------- masked_linear

# (leading dims of x, in_features, out_features): 1s; one tile; K = 129 over
# three K-blocks; 3-D x with N = 129 output tiles; a batch of 129 (three
# reduction blocks for G); a batch of 0.
LINEAR_SHAPES = [((1,), 1, 1), ((7,), 7, 7), ((5,), 129, 7), ((2, 3), 7, 129), ((129,), 7, 5), ((0,), 7, 5)]


def _linear_inputs(lead, n_in, n_out, dtype, mask_kind, layout):
    x = _randn(*lead, n_in, dtype=dtype)
    weight = _randn(n_out, n_in, dtype=dtype)
    mask = make_mask((n_out, n_in), mask_kind, dtype)
    grad_out = _randn(*lead, n_out, dtype=dtype)
    bias = _randn(n_out, dtype=dtype)
    if layout == "noncontig":
        x, weight, mask, grad_out = (noncontiguous(t) for t in (x, weight, mask, grad_out))
        bias = _randn(2 * n_out, dtype=dtype)[::2]  # a strided bias
    return x, weight, mask, bias, grad_out


def _check_linear(x, weight, mask, bias, grad_out, output_mask=(True, True, True)):
    n_out, n_in = weight.shape
    batch = x.numel() // n_in if n_in else grad_out.numel() // max(n_out, 1)
    y = masked_linear(x, weight, mask, bias)
    _assert_within_torch_error(
        "y", y, reference.masked_linear(x, weight, mask, bias),
        reference.masked_linear(*_to64(x, weight, mask, bias)), reduce_len=n_in,
    )
    ours = masked_linear_backward(grad_out, x, weight, mask, output_mask)
    torch_own = reference.masked_linear_backward(grad_out, x, weight, mask, output_mask)
    ref64 = reference.masked_linear_backward(*_to64(grad_out, x, weight, mask), output_mask)
    for name, o, t, r, n in zip(("dx", "dW", "dM"), ours, torch_own, ref64, (n_out, batch, batch)):
        _assert_within_torch_error(name, o, t, r, reduce_len=n)


@pytest.mark.parametrize("mask_kind", MASK_KINDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", LINEAR_SHAPES, ids=str)
def test_masked_linear_forward_backward(shape, dtype, mask_kind):
    _check_linear(*_linear_inputs(*shape, dtype, mask_kind, "contig"))


# The layout only changes the strides the kernels are given, so it is swept
# with one mask kind (each launch costs the interpreter tens of ms): a float
# mask, which every operand's strides are used with (the masked load, dM = G*W).
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", LINEAR_SHAPES, ids=str)
def test_masked_linear_noncontiguous(shape, dtype):
    _check_linear(*_linear_inputs(*shape, dtype, "float", "noncontig"))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_masked_linear_without_bias(dtype):
    x, weight, mask, _, grad_out = _linear_inputs((3, 5), 33, 65, dtype, "float", "contig")
    _check_linear(x, weight, mask, None, grad_out)


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
    _, dw, dm = masked_linear_backward(grad_out, x, weight, mask, (False, True, True))
    assert dw.shape == dm.shape == weight.shape and dw.dtype == dm.dtype == dtype


@pytest.mark.parametrize("output_mask", OUTPUT_MASKS_3, ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_masked_linear_backward_output_mask(dtype, output_mask):
    want_dx, want_dw, want_dm = output_mask
    x, weight, mask, _, grad_out = _linear_inputs((4, 3), 19, 37, dtype, "float", "noncontig")
    # As the op's autograd calls it: an input that no wanted output reads is
    # a zero-stride placeholder (x is read by dW/dM, the weight by dx/dM).
    x_arg = x if (want_dw or want_dm) else _placeholder(grad_out, x.shape)
    w_arg = weight if (want_dx or want_dm) else _placeholder(grad_out, weight.shape)
    ours = masked_linear_backward(grad_out, x_arg, w_arg, mask, output_mask)
    torch_own = reference.masked_linear_backward(grad_out, x, weight, mask, output_mask)
    ref64 = reference.masked_linear_backward(*_to64(grad_out, x, weight, mask), output_mask)
    for name, wanted, o, t, r in zip(("dx", "dW", "dM"), output_mask, ours, torch_own, ref64):
        if wanted:
            _assert_within_torch_error(name, o, t, r, reduce_len=37)
        else:
            assert o.shape == (0,) and o.dtype == t.dtype, f"{name} not asked for: got {o.dtype} {tuple(o.shape)}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16], ids=str)
def test_masked_linear_bool_mask_hides_inf_and_nan_weights(dtype):
    mask = make_mask((70, 9), "bool", dtype)
    weight = _poisoned_weight((70, 9), dtype, mask)
    x, grad_out = _randn(5, 9, dtype=dtype), _randn(5, 70, dtype=dtype)
    y = masked_linear(x, weight, mask, None)
    dx, dw, _ = masked_linear_backward(grad_out, x, weight, mask, (True, True, False))
    assert torch.isfinite(y).all() and torch.isfinite(dx).all() and torch.isfinite(dw).all()
    _check_linear(x, weight, mask, None, grad_out, (True, True, False))


def test_masked_linear_all_zero_mask_gives_exactly_bias_and_zero_grads():
    x, weight, mask, bias, grad_out = _linear_inputs((129,), 7, 70, torch.float32, "zeros", "contig")
    assert torch.equal(masked_linear(x, weight, mask, bias), bias.expand(129, 70))
    dx, dw, _ = masked_linear_backward(grad_out, x, weight, mask, (True, True, False))
    assert torch.count_nonzero(dx) == 0 and torch.count_nonzero(dw) == 0


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
    x = _randn(*x_shape, dtype=dtype)
    weight = _randn(*w_shape, dtype=dtype)
    mask = make_mask(w_shape, mask_kind, dtype)
    bias = _randn(w_shape[0], dtype=dtype)
    grad_out = _randn(*reference.masked_conv2d(x, weight, mask, None, *conv_args).shape, dtype=dtype)
    if layout == "noncontig":
        x, grad_out = x.contiguous(memory_format=torch.channels_last), grad_out.contiguous(memory_format=torch.channels_last)
        weight, mask = noncontiguous(weight), noncontiguous(mask)
    return x, weight, mask, bias, grad_out


def _reduce_lens(x, weight, grad_out, groups):
    """Terms summed per output: y <- C_in/g * kh * kw, dx <- C_out/g * kh * kw, G <- N * OH * OW."""
    per_window = weight[0].numel()
    return per_window, weight.shape[0] // groups * weight.shape[2] * weight.shape[3], grad_out[:, 0].numel()


@pytest.mark.parametrize(
    "mask_kind,layout", [(kind, "contig") for kind in MASK_KINDS] + [("float", "noncontig"), ("bool", "noncontig")]
)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", CONV_CASES, ids=str)
def test_masked_conv2d_forward_backward(case, dtype, mask_kind, layout):
    x_shape, w_shape, *conv_args = case
    groups = conv_args[-1]
    x, weight, mask, bias, grad_out = _conv_inputs(x_shape, w_shape, conv_args, dtype, mask_kind, layout)
    n_y, n_dx, n_g = _reduce_lens(x, weight, grad_out, groups)
    _assert_within_torch_error(
        "y", masked_conv2d(x, weight, mask, bias, *conv_args),
        reference.masked_conv2d(x, weight, mask, bias, *conv_args),
        reference.masked_conv2d(*_to64(x, weight, mask, bias), *conv_args), reduce_len=n_y,
    )
    want = (True, True, True)
    ours = masked_conv2d_backward(grad_out, x, weight, mask, *conv_args, want)
    torch_own = reference.masked_conv2d_backward(grad_out, x, weight, mask, *conv_args, want)
    ref64 = reference.masked_conv2d_backward(*_to64(grad_out, x, weight, mask), *conv_args, want)
    for name, o, t, r, n in zip(("dx", "dW", "dM"), ours, torch_own, ref64, (n_dx, n_g, n_g)):
        _assert_within_torch_error(name, o, t, r, reduce_len=n)


@pytest.mark.parametrize("output_mask", OUTPUT_MASKS_3, ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_masked_conv2d_backward_output_mask(dtype, output_mask):
    want_dx, want_dw, want_dm = output_mask
    x_shape, w_shape, *conv_args = CONV_CASES[1]
    x, weight, mask, _, grad_out = _conv_inputs(x_shape, w_shape, conv_args, dtype, "float", "contig")
    x_arg = x if (want_dw or want_dm) else _placeholder(grad_out, x.shape)
    w_arg = weight if (want_dx or want_dm) else _placeholder(grad_out, weight.shape)
    ours = masked_conv2d_backward(grad_out, x_arg, w_arg, mask, *conv_args, output_mask)
    torch_own = reference.masked_conv2d_backward(grad_out, x, weight, mask, *conv_args, output_mask)
    ref64 = reference.masked_conv2d_backward(*_to64(grad_out, x, weight, mask), *conv_args, output_mask)
    n_y, n_dx, n_g = _reduce_lens(x, weight, grad_out, conv_args[-1])
    for name, wanted, o, t, r, n in zip(("dx", "dW", "dM"), output_mask, ours, torch_own, ref64, (n_dx, n_g, n_g)):
        if wanted:
            _assert_within_torch_error(name, o, t, r, reduce_len=n)
        else:
            assert o.shape == (0,) and o.dtype == t.dtype, f"{name} not asked for: got {o.dtype} {tuple(o.shape)}"
