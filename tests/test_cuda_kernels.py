"""The CUDA C++ kernels (torch.ops.sparsesam_cuda) against sparsesam.reference, on a GPU.

They are called directly (not through the router, so they are tested
whatever SPARSESAM_BACKEND says). Elementwise ops must equal the reference
bit for bit (same math, rounded once); GEMM/convolution results must be
within twice PyTorch's own error versus float64 (flash-attention's rule),
since both go through the same cuBLAS/cuDNN calls. Without a GPU and a
build with SPARSESAM_CUDA=1 the module is skipped as a whole.
"""
from __future__ import annotations

import itertools

import pytest
import torch

import sparsesam  # noqa: F401  (registers the ops)
from sparsesam import reference
from sparsesam.ops import cuda_cpp_available

if not (cuda_cpp_available() and torch.cuda.is_available()):
    pytest.skip("needs a GPU and a build with the CUDA C++ kernels (SPARSESAM_CUDA=1)", allow_module_level=True)

DTYPES = [torch.float32, torch.float64, torch.bfloat16]
MASK_KINDS = ["bool", "float"]
ops = torch.ops.sparsesam_cuda


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def make_mask(shape, kind, dtype, device="cuda"):
    keep = torch.rand(shape, device=device) > 0.4
    if kind == "bool":
        return keep
    # A soft mask with exact zeros, as pruning produces.
    return torch.where(keep, torch.rand(shape, device=device), 0.0).to(dtype)


def f64(*tensors):
    return [t.double() if t is not None and t.is_floating_point() else t for t in tensors]


def assert_exact(out, ref):
    assert out.shape == ref.shape and out.dtype == ref.dtype and out.device == ref.device
    torch.testing.assert_close(out, ref, rtol=0, atol=0, equal_nan=True)


def assert_as_accurate_as_pytorch(out, ref_lowp, ref64):
    """The kernel's error versus float64 is at most twice PyTorch's own."""
    assert out.shape == ref_lowp.shape and out.dtype == ref_lowp.dtype
    if out.numel() == 0:
        return
    if out.dtype == torch.float64:
        torch.testing.assert_close(out, ref64)
        return
    err = (out.double() - ref64).abs().max().item()
    ref_err = (ref_lowp.double() - ref64).abs().max().item()
    ulp = torch.finfo(out.dtype).eps * ref64.abs().max().item()
    assert err <= 2 * ref_err + ulp, f"error {err:.3g} vs PyTorch's {ref_err:.3g} ({out.dtype})"


def assert_outputs(outs, refs_lowp, refs64, wanted):
    for out, ref_lowp, ref64, want in zip(outs, refs_lowp, refs64, wanted):
        if want:
            assert_as_accurate_as_pytorch(out, ref_lowp, ref64)
        else:
            assert out.shape == (0,), "an output not asked for comes back empty"


# Odd sizes (vector tails), a single element, and one large enough that the
# grid-stride loop runs more than once on any current GPU.
WEIGHT_SHAPES = [(1, 1), (7, 13), (64, 129), (3, 5, 3, 3), (2048, 1031), (0, 5)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", MASK_KINDS)
@pytest.mark.parametrize("shape", WEIGHT_SHAPES)
def test_apply_mask(dtype, kind, shape):
    w = torch.randn(shape, device="cuda", dtype=dtype)
    m = make_mask(shape, kind, dtype)
    assert_exact(ops.apply_mask(w, m), reference.apply_mask(w, m))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", MASK_KINDS)
@pytest.mark.parametrize("shape", WEIGHT_SHAPES)
@pytest.mark.parametrize("output_mask", [(True, True), (True, False), (False, True), (False, False)])
def test_masked_weight_grad(dtype, kind, shape, output_mask):
    g = torch.randn(shape, device="cuda", dtype=dtype)
    w = torch.randn(shape, device="cuda", dtype=dtype)
    m = make_mask(shape, kind, dtype)
    if output_mask[1] and kind == "bool":
        with pytest.raises(RuntimeError, match="bool mask has no gradient"):
            ops.masked_weight_grad(g, w, m, list(output_mask))
        return
    g_before = g.clone()
    outs = ops.masked_weight_grad(g, w, m, list(output_mask))
    refs = reference.masked_weight_grad(g, w, m, output_mask)
    for out, ref, want in zip(outs, refs, output_mask):
        if want:
            assert_exact(out, ref)
        else:
            assert out.shape == (0,)
    assert_exact(g, g_before)  # the op is out of place


@pytest.mark.parametrize("dtype", DTYPES)
def test_bool_mask_selects_through_inf_and_nan(dtype):
    w = torch.randn(33, 17, device="cuda", dtype=dtype)
    m = make_mask(w.shape, "bool", dtype)
    w[~m] = float("nan")
    w[~m & (torch.rand(w.shape, device="cuda") > 0.5)] = float("inf")
    out = ops.apply_mask(w, m)
    assert (out[~m] == 0).all()
    dweight, _ = ops.masked_weight_grad(w, w, m, [True, False])
    assert (dweight[~m] == 0).all()
    assert_exact(out, reference.apply_mask(w, m))


@pytest.mark.parametrize("kind", MASK_KINDS)
def test_misaligned_and_strided_inputs(kind):
    # Storage offset 1 defeats 16-byte vector access: the element-wise
    # variant of each kernel must give the same result.
    shape = (37, 41)
    n = shape[0] * shape[1]
    w = torch.randn(n + 1, device="cuda")[1:].view(shape)
    g = torch.randn(n + 1, device="cuda")[1:].view(shape)
    m_full = make_mask((n + 1,), kind, torch.float32)
    m = m_full[1:].view(shape)
    assert_exact(ops.apply_mask(w, m), reference.apply_mask(w, m))
    want = (True, kind == "float")
    for out, ref in zip(ops.masked_weight_grad(g, w, m, list(want)), reference.masked_weight_grad(g, w, m, want)):
        if out.numel():
            assert_exact(out, ref)
    # Non-contiguous (transposed) inputs are made contiguous by the op.
    wt, mt, gt = w.t(), m.t(), g.t()
    assert_exact(ops.apply_mask(wt, mt), reference.apply_mask(wt, mt))
    assert_exact(ops.masked_weight_grad(gt, wt, mt, [True, False])[0], reference.apply_mask(gt, mt))


@pytest.mark.parametrize("kind", MASK_KINDS)
def test_weight_placeholder_is_never_read(kind):
    # Autograd passes a zero-stride placeholder for W when dM is not wanted.
    shape = (65, 31)
    g = torch.randn(shape, device="cuda")
    m = make_mask(shape, kind, torch.float32)
    placeholder = g.new_zeros(()).expand(shape)
    dweight, dmask = ops.masked_weight_grad(g, placeholder, m, [True, False])
    assert_exact(dweight, reference.apply_mask(g, m))
    assert dmask.shape == (0,)
    x = torch.randn(4, shape[1], device="cuda")
    dy = torch.randn(4, shape[0], device="cuda")
    _, dweight, _ = ops.masked_linear_backward(dy, x, placeholder, m, [False, True, False])
    _, ref, _ = reference.masked_linear_backward(dy, x, torch.zeros(shape, device="cuda"), m, (False, True, False))
    torch.testing.assert_close(dweight, ref)


LINEAR_CASES = [
    # (x shape, out_features)
    ((5, 13), 7),
    ((2, 3, 65), 33),
    ((0, 13), 7),  # batch 0
    ((1, 1), 1),
]
BACKWARD_MASKS = list(itertools.product([False, True], repeat=3))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", MASK_KINDS)
@pytest.mark.parametrize("x_shape,out_features", LINEAR_CASES)
@pytest.mark.parametrize("with_bias", [False, True])
def test_masked_linear(dtype, kind, x_shape, out_features, with_bias):
    x = torch.randn(x_shape, device="cuda", dtype=dtype)
    w = torch.randn(out_features, x_shape[-1], device="cuda", dtype=dtype)
    m = make_mask(w.shape, kind, dtype)
    b = torch.randn(out_features, device="cuda", dtype=dtype) if with_bias else None
    out = ops.masked_linear(x, w, m, b)
    assert_as_accurate_as_pytorch(out, reference.masked_linear(x, w, m, b), reference.masked_linear(*f64(x, w, m, b)))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", MASK_KINDS)
@pytest.mark.parametrize("x_shape,out_features", LINEAR_CASES)
@pytest.mark.parametrize("output_mask", BACKWARD_MASKS)
def test_masked_linear_backward(dtype, kind, x_shape, out_features, output_mask):
    x = torch.randn(x_shape, device="cuda", dtype=dtype)
    w = torch.randn(out_features, x_shape[-1], device="cuda", dtype=dtype)
    m = make_mask(w.shape, kind, dtype)
    dy = torch.randn(*x_shape[:-1], out_features, device="cuda", dtype=dtype)
    if output_mask[2] and kind == "bool":
        with pytest.raises(RuntimeError, match="bool mask has no gradient"):
            ops.masked_linear_backward(dy, x, w, m, list(output_mask))
        return
    outs = ops.masked_linear_backward(dy, x, w, m, list(output_mask))
    refs = reference.masked_linear_backward(dy, x, w, m, output_mask)
    refs64 = reference.masked_linear_backward(*f64(dy, x, w, m), output_mask)
    assert_outputs(outs, refs, refs64, output_mask)


CONV_CASES = [
    # (x shape, weight shape, stride, padding, dilation, groups)
    ((2, 3, 9, 11), (5, 3, 3, 3), (1, 1), (0, 0), (1, 1), 1),
    ((2, 4, 10, 7), (6, 2, 3, 2), (2, 1), (1, 2), (1, 1), 2),
    ((1, 4, 12, 12), (4, 1, 3, 3), (1, 2), (2, 2), (2, 2), 4),  # depthwise, dilated
    ((0, 3, 8, 8), (5, 3, 3, 3), (1, 1), (1, 1), (1, 1), 1),  # batch 0
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", MASK_KINDS)
@pytest.mark.parametrize("case", CONV_CASES)
@pytest.mark.parametrize("with_bias", [False, True])
def test_masked_conv2d(dtype, kind, case, with_bias):
    x_shape, w_shape, stride, padding, dilation, groups = case
    x = torch.randn(x_shape, device="cuda", dtype=dtype)
    w = torch.randn(w_shape, device="cuda", dtype=dtype)
    m = make_mask(w_shape, kind, dtype)
    b = torch.randn(w_shape[0], device="cuda", dtype=dtype) if with_bias else None
    conv = (list(stride), list(padding), list(dilation), groups)
    out = ops.masked_conv2d(x, w, m, b, *conv)
    assert_as_accurate_as_pytorch(
        out, reference.masked_conv2d(x, w, m, b, *conv), reference.masked_conv2d(*f64(x, w, m, b), *conv)
    )


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", MASK_KINDS)
@pytest.mark.parametrize("case", CONV_CASES)
@pytest.mark.parametrize("output_mask", BACKWARD_MASKS)
def test_masked_conv2d_backward(dtype, kind, case, output_mask):
    x_shape, w_shape, stride, padding, dilation, groups = case
    x = torch.randn(x_shape, device="cuda", dtype=dtype)
    w = torch.randn(w_shape, device="cuda", dtype=dtype)
    m = make_mask(w_shape, kind, dtype)
    conv = (list(stride), list(padding), list(dilation), groups)
    dy = torch.randn_like(reference.masked_conv2d(x, w, m, None, *conv))
    if output_mask[2] and kind == "bool":
        with pytest.raises(RuntimeError, match="bool mask has no gradient"):
            ops.masked_conv2d_backward(dy, x, w, m, *conv, list(output_mask))
        return
    outs = ops.masked_conv2d_backward(dy, x, w, m, *conv, list(output_mask))
    refs = reference.masked_conv2d_backward(dy, x, w, m, *conv, output_mask)
    refs64 = reference.masked_conv2d_backward(*f64(dy, x, w, m), *conv, output_mask)
    assert_outputs(outs, refs, refs64, output_mask)


def test_kernels_follow_the_tensors_device_not_the_current_one():
    if torch.cuda.device_count() < 2:
        pytest.skip("needs two GPUs")
    w = torch.randn(9, 7, device="cuda:1")
    m = make_mask(w.shape, "float", w.dtype, device="cuda:1")
    with torch.cuda.device(0):
        out = ops.apply_mask(w, m)
        dweight, dmask = ops.masked_weight_grad(w, w, m, [True, True])
    assert out.device == w.device and dweight.device == w.device and dmask.device == w.device
    assert_exact(out, reference.apply_mask(w, m))
