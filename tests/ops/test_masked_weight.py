"""The apply_mask and masked_weight_grad ops on every backend.

The first test runs on every backend (``backends.OP_BACKENDS``: reference, CPU C++, Triton under
the interpreter, CUDA C++), each skipped with the reason where this machine lacks it; the sections
after it are the backend-specific tests.

Reference and CPU C++ kernels: apply_mask and masked_weight_grad (the fused epilogue) vs sparsesam.reference.

Triton kernels (marked triton): The Triton masked-layer kernels (sparsesam.triton_kernels) vs sparsesam.reference.

They run on CPU under the Triton interpreter:

    TRITON_INTERPRET=1 python -m pytest -m triton tests/ops/test_masked_weight.py

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

from sparsesam import reference
from sparsesam.ops import apply_mask, masked_weight_grad

from backends import backend_op, cuda_cpp_case, OP_BACKENDS, tk, triton_case
from op_cases import DTYPES, make_mask, MASK_KINDS, noncontiguous, placeholder, pruned_mask, rounded_randn


# ============================================================================
# Every backend (reference, cpu, triton, cuda) against the dense float64 math

@pytest.mark.parametrize("mask_kind", ["bool", "float"])
@pytest.mark.parametrize("backend", OP_BACKENDS)
def test_every_backend_is_the_elementwise_math(backend, mask_kind):
    """W*M, and (dW, dM) = (G*M, G*W): one rounding each, so every backend gives exactly these bits."""
    apply, device = backend_op(backend, "apply_mask")
    weight_grad, _ = backend_op(backend, "masked_weight_grad")
    w, g = torch.randn(37, 41).to(device), torch.randn(37, 41).to(device)
    mask = make_mask((37, 41), mask_kind, torch.float32).to(device)
    m = mask.to(w.dtype)
    assert torch.equal(apply(w, mask), w * m)
    want = [True, mask_kind == "float"]  # a bool mask has no gradient
    dw, dm = weight_grad(g, w, mask, want)
    assert torch.equal(dw, g * m)
    assert torch.equal(dm, g * w) if want[1] else dm.shape == (0,)


# ============================================================================
# Reference and CPU C++ kernels

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


# ============================================================================
# Triton kernels (marked triton)

# bfloat16 cannot be checked under the interpreter: it keeps bfloat16 as raw
# uint16 bits, so arithmetic and tl.dot on bfloat16 values act on the bit
# patterns, and its float32 -> bfloat16 cast truncates instead of rounding to
# nearest even. float16, which numpy has natively, stands in for the 16-bit
# path (the kernels widen both to float32 the same way).
DTYPES_triton = [torch.float32, torch.float64, torch.float16]
LAYOUTS = ["contig", "noncontig"]
OUTPUT_MASKS_2 = list(itertools.product([True, False], repeat=2))


def _assert_identical(name, ours, theirs):
    assert ours.dtype == theirs.dtype, f"{name}: dtype {ours.dtype} != {theirs.dtype}"
    assert ours.shape == theirs.shape, f"{name}: shape {tuple(ours.shape)} != {tuple(theirs.shape)}"
    torch.testing.assert_close(ours, theirs, rtol=0, atol=0, equal_nan=True, msg=lambda m: f"{name}: {m}")


def _poisoned_weight(shape, dtype, mask):
    """Random weights with inf / -inf / nan wherever a bool mask prunes: the output must not see them."""
    w = rounded_randn(*shape, dtype=dtype)
    if mask.dtype == torch.bool and w.numel():
        poison = torch.tensor([float("inf"), float("-inf"), float("nan")], dtype=dtype)
        fill = poison[torch.arange(w.numel()) % 3].reshape(shape)
        w = torch.where(mask, w, fill)
    return w


# ---------------------------------------------------------------- apply_mask / masked_weight_grad

# 1 element; a 2-D weight whose transpose is a real non-contiguous view;
# a conv-shaped weight spanning three 1024-element blocks; empty.
ELEMENTWISE_SHAPES = [(1,), (7, 129), (5, 3, 11, 13), (0, 5)]


@triton_case
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("mask_kind", MASK_KINDS)
@pytest.mark.parametrize("dtype", DTYPES_triton, ids=str)
@pytest.mark.parametrize("shape", ELEMENTWISE_SHAPES, ids=str)
def test_apply_mask_matches_reference_exactly(shape, dtype, mask_kind, layout):
    mask = make_mask(shape, mask_kind, dtype)
    weight = _poisoned_weight(shape, dtype, mask)
    if layout == "noncontig":
        weight, mask = noncontiguous(weight), noncontiguous(mask)
    out = tk.apply_mask(weight, mask)
    _assert_identical("W*M", out, reference.apply_mask(weight, mask))
    assert out.is_contiguous()


@triton_case
@pytest.mark.parametrize("output_mask", OUTPUT_MASKS_2, ids=str)
@pytest.mark.parametrize("mask_kind", MASK_KINDS)
@pytest.mark.parametrize("dtype", DTYPES_triton, ids=str)
@pytest.mark.parametrize("shape", ELEMENTWISE_SHAPES, ids=str)
def test_masked_weight_grad_matches_reference_exactly(shape, dtype, mask_kind, output_mask):
    mask = make_mask(shape, mask_kind, dtype)
    weight = _poisoned_weight(shape, dtype, mask)
    grad = rounded_randn(*shape, dtype=dtype)
    # G arrives transposed-and-back (non-contiguous) as it may from autograd.
    grad, mask = noncontiguous(grad), noncontiguous(mask)
    # dW never reads the weight: pass a placeholder as tk.apply_mask's backward may.
    weight_arg = weight if output_mask[1] else placeholder(grad, shape)
    ours = tk.masked_weight_grad(grad, weight_arg, mask, output_mask)
    theirs = reference.masked_weight_grad(grad, weight, mask, output_mask)
    for name, o, t in zip(("dW", "dM"), ours, theirs):
        _assert_identical(name, o, t)


# ============================================================================
# CUDA C++ kernels on a GPU (marked gpu)

DTYPES_cuda_cpp = [torch.float32, torch.float64, torch.bfloat16]
MASK_KINDS_cuda_cpp = ["bool", "float"]
ops = torch.ops.sparsesam_cuda


def assert_exact(out, ref):
    assert out.shape == ref.shape and out.dtype == ref.dtype and out.device == ref.device
    torch.testing.assert_close(out, ref, rtol=0, atol=0, equal_nan=True)


# Odd sizes (vector tails), a single element, and one large enough that the
# grid-stride loop runs more than once on any current GPU.
WEIGHT_SHAPES = [(1, 1), (7, 13), (64, 129), (3, 5, 3, 3), (2048, 1031), (0, 5)]


@cuda_cpp_case
@pytest.mark.parametrize("dtype", DTYPES_cuda_cpp)
@pytest.mark.parametrize("kind", MASK_KINDS_cuda_cpp)
@pytest.mark.parametrize("shape", WEIGHT_SHAPES)
def test_apply_mask(dtype, kind, shape):
    w = torch.randn(shape, device="cuda", dtype=dtype)
    m = pruned_mask(shape, kind, dtype)
    assert_exact(ops.apply_mask(w, m), reference.apply_mask(w, m))


@cuda_cpp_case
@pytest.mark.parametrize("dtype", DTYPES_cuda_cpp)
@pytest.mark.parametrize("kind", MASK_KINDS_cuda_cpp)
@pytest.mark.parametrize("shape", WEIGHT_SHAPES)
@pytest.mark.parametrize("output_mask", [(True, True), (True, False), (False, True), (False, False)])
def test_masked_weight_grad(dtype, kind, shape, output_mask):
    g = torch.randn(shape, device="cuda", dtype=dtype)
    w = torch.randn(shape, device="cuda", dtype=dtype)
    m = pruned_mask(shape, kind, dtype)
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


@cuda_cpp_case
@pytest.mark.parametrize("dtype", DTYPES_cuda_cpp)
def test_bool_mask_selects_through_inf_and_nan(dtype):
    w = torch.randn(33, 17, device="cuda", dtype=dtype)
    m = pruned_mask(w.shape, "bool", dtype)
    w[~m] = float("nan")
    w[~m & (torch.rand(w.shape, device="cuda") > 0.5)] = float("inf")
    out = ops.apply_mask(w, m)
    assert (out[~m] == 0).all()
    dweight, _ = ops.masked_weight_grad(w, w, m, [True, False])
    assert (dweight[~m] == 0).all()
    assert_exact(out, reference.apply_mask(w, m))


@cuda_cpp_case
@pytest.mark.parametrize("kind", MASK_KINDS_cuda_cpp)
def test_misaligned_and_strided_inputs(kind):
    # Storage offset 1 defeats 16-byte vector access: the element-wise
    # variant of each kernel must give the same result.
    shape = (37, 41)
    n = shape[0] * shape[1]
    w = torch.randn(n + 1, device="cuda")[1:].view(shape)
    g = torch.randn(n + 1, device="cuda")[1:].view(shape)
    m_full = pruned_mask((n + 1,), kind, torch.float32)
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


@cuda_cpp_case
@pytest.mark.parametrize("kind", MASK_KINDS_cuda_cpp)
def test_weight_placeholder_is_never_read(kind):
    # Autograd passes a zero-stride placeholder for W when dM is not wanted.
    shape = (65, 31)
    g = torch.randn(shape, device="cuda")
    m = pruned_mask(shape, kind, torch.float32)
    placeholder = g.new_zeros(()).expand(shape)
    dweight, dmask = ops.masked_weight_grad(g, placeholder, m, [True, False])
    assert_exact(dweight, reference.apply_mask(g, m))
    assert dmask.shape == (0,)
    x = torch.randn(4, shape[1], device="cuda")
    dy = torch.randn(4, shape[0], device="cuda")
    _, dweight, _ = ops.masked_linear_backward(dy, x, placeholder, m, [False, True, False])
    _, ref, _ = reference.masked_linear_backward(dy, x, torch.zeros(shape, device="cuda"), m, (False, True, False))
    torch.testing.assert_close(dweight, ref)


@cuda_cpp_case
def test_kernels_follow_the_tensors_device_not_the_current_one():
    if torch.cuda.device_count() < 2:
        pytest.skip("needs two GPUs")
    w = torch.randn(9, 7, device="cuda:1")
    m = pruned_mask(w.shape, "float", w.dtype, device="cuda:1")
    with torch.cuda.device(0):
        out = ops.apply_mask(w, m)
        dweight, dmask = ops.masked_weight_grad(w, w, m, [True, True])
    assert out.device == w.device and dweight.device == w.device and dmask.device == w.device
    assert_exact(out, reference.apply_mask(w, m))
