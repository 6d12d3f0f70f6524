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


# ---------------------------------------------------------------------------
# The fused SAM step: sam_grad_sq_norm, sam_perturb_, sgd_step_ (multi-tensor).

# Odd sizes, a 0-d parameter, an empty one, a conv weight, one whose output
# channels straddle the kernels' 16384-element chunks and one whose channels
# span several chunks.
PARAM_SHAPES = [(7, 13), (5,), (), (0, 3), (6, 3, 3, 3), (300, 257), (3, 40000)]
MASK_CHOICES = ["none", "bool", "float", "mixed"]
RHO_KINDS = ["scalar", "cpu_scalar", "per_channel"]
EPS = 1e-12
# Each block accumulates 64 terms per thread in float (one fma each), then
# an 8-level tree; all terms are >= 0, so the relative error stays below
# ~75 units of roundoff. float64 inputs: the same in double.
NORM_RTOL = {torch.float64: 1e-12, torch.float32: 100 * torch.finfo(torch.float32).eps}
NORM_RTOL[torch.bfloat16] = NORM_RTOL[torch.float32]


def make_tensors(dtype, shapes=PARAM_SHAPES):
    return [torch.randn(s, device="cuda", dtype=dtype) for s in shapes]


def make_masks(choice, dtype, shapes=PARAM_SHAPES):
    if choice == "mixed":
        kinds = [("none", "bool", "float")[i % 3] for i in range(len(shapes))]
    else:
        kinds = [choice] * len(shapes)
    return [None if kind == "none" else make_mask(s, kind, dtype) for s, kind in zip(shapes, kinds)]


def make_rhos(params, kind):
    if kind == "cpu_scalar":
        return [torch.tensor(0.05, dtype=torch.float64) for _ in params]
    if kind == "per_channel":
        return [torch.rand(p.shape[0], device="cuda") + 0.01 if p.dim() else torch.tensor(0.3, device="cuda")
                for p in params]
    return [torch.tensor(0.05, device="cuda") for _ in params]


def pruned(mask, like):
    return torch.zeros_like(like, dtype=torch.bool) if mask is None else mask == 0


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("masks", MASK_CHOICES)
@pytest.mark.parametrize("adaptive", [False, True])
def test_sam_grad_sq_norm(dtype, masks, adaptive):
    grads, weights = make_tensors(dtype), make_tensors(dtype)
    ms = make_masks(masks, dtype)
    out = ops.sam_grad_sq_norm(grads, weights, ms, adaptive)
    ref = reference.sam_grad_sq_norm(grads, weights, ms, adaptive)
    assert out.shape == () and out.dtype == torch.float64 and out.device == ref.device
    torch.testing.assert_close(out, ref, rtol=NORM_RTOL[dtype], atol=0)


def test_sam_grad_sq_norm_is_bitwise_deterministic():
    shapes = [(1000, 1000), (257,), (64, 3, 7, 7)]
    grads = [10 * g for g in make_tensors(torch.float32, shapes)]
    weights = make_tensors(torch.float32, shapes)
    masks = [make_mask(shapes[0], "bool", torch.float32), None, make_mask(shapes[2], "float", torch.float32)]
    first = ops.sam_grad_sq_norm(grads, weights, masks, True)
    for _ in range(5):
        assert torch.equal(ops.sam_grad_sq_norm(grads, weights, masks, True), first)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        on_stream = ops.sam_grad_sq_norm(grads, weights, masks, True)
    stream.synchronize()
    assert torch.equal(on_stream, first)

    # Misaligned copies take the element-wise loads, which visit the
    # elements in the same order: the same bits.
    def shifted(t):
        storage = torch.empty(t.numel() + 1, device="cuda", dtype=t.dtype)
        storage[1:].copy_(t.flatten())
        return storage[1:].view(t.shape)

    out = ops.sam_grad_sq_norm([shifted(g) for g in grads], [shifted(w) for w in weights], masks, True)
    assert torch.equal(out, first)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("masks", MASK_CHOICES)
@pytest.mark.parametrize("adaptive", [False, True])
@pytest.mark.parametrize("rho_kind", RHO_KINDS)
def test_sam_perturb(dtype, masks, adaptive, rho_kind):
    params, grads = make_tensors(dtype), make_tensors(dtype)
    ms = make_masks(masks, dtype)
    rhos = make_rhos(params, rho_kind)
    sq_norm = reference.sam_grad_sq_norm(grads, params, ms, adaptive)
    params_before = [p.clone() for p in params]
    out = [torch.full_like(p, float("nan")) for p in params]
    ops.sam_perturb_(out, params, grads, ms, rhos, sq_norm, adaptive, EPS)
    refs = reference.sam_perturb(params, grads, ms, rhos, sq_norm, adaptive, EPS)
    for o, ref, p, before, m in zip(out, refs, params, params_before, ms):
        # Computed in float64 and rounded once, as the reference: bit for bit,
        # and pruned entries are the weight itself.
        assert_exact(o, ref)
        assert_exact(o[pruned(m, o)], p[pruned(m, p)])
        assert_exact(p, before)


def test_sam_perturb_in_place_misaligned_and_strided():
    shape = (37, 41)
    # Storage offset 1: the element-wise variant; the transposed gradient is
    # copied into the weight's layout.
    w = torch.randn(shape[0] * shape[1] + 1, device="cuda")[1:].view(shape)
    g = torch.randn(shape, device="cuda").t().contiguous().t()
    m = make_mask(shape, "bool", torch.float32)
    rho = torch.rand(shape[0], device="cuda", dtype=torch.float64)
    sq_norm = ops.sam_grad_sq_norm([g], [w], [m], True)
    ref = reference.sam_perturb([w], [g], [m], [rho], sq_norm, True, EPS)[0]
    ops.sam_perturb_([w], [w], [g], [m], [rho], sq_norm, True, EPS)
    assert_exact(w, ref)


SGD_OPTIONS = [
    # (momentum, dampening, weight_decay, nesterov, maximize, first_step)
    (0.0, 0.0, 0.0, False, False, False),
    (0.0, 0.0, 1e-2, False, True, False),
    (0.9, 0.0, 0.0, False, False, True),
    (0.9, 0.0, 5e-4, True, False, True),
    (0.9, 0.1, 5e-4, False, False, False),
    (0.9, 0.0, 5e-4, True, True, False),
    (0.5, 0.3, 0.0, False, True, False),
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("masks", MASK_CHOICES)
@pytest.mark.parametrize("options", SGD_OPTIONS)
def test_sgd_step(dtype, masks, options):
    momentum, dampening, weight_decay, nesterov, maximize, first_step = options
    args = (0.1, momentum, dampening, weight_decay, nesterov, maximize, first_step)
    params, grads = make_tensors(dtype), make_tensors(dtype)
    # Random buffers even on the first step: pruned entries keep whatever they hold.
    bufs = make_tensors(dtype) if momentum else []
    ms = make_masks(masks, dtype)
    ref_params, ref_bufs = reference.sgd_step(params, grads, bufs, ms, *args)
    ref64_params, ref64_bufs = reference.sgd_step(f64(*params), f64(*grads), f64(*bufs), ms, *args)
    params_before, bufs_before = [p.clone() for p in params], [b.clone() for b in bufs]
    ops.sgd_step_(params, grads, bufs, ms, *args)
    results = list(zip(params, ref_params, ref64_params, params_before, ms))
    results += list(zip(bufs, ref_bufs, ref64_bufs, bufs_before, ms))
    for new, ref, ref64, before, m in results:
        if dtype == torch.bfloat16:
            # Computed in float and rounded once (the reference rounds every op).
            assert_as_accurate_as_pytorch(new, ref, ref64)
        else:
            # The reference's operations in its order, each rounded: bit for bit.
            assert_exact(new, ref)
        assert_exact(new[pruned(m, new)], before[pruned(m, before)])


@pytest.mark.parametrize("kind", MASK_KINDS)
def test_sam_step_ops_ignore_pruned_inf_and_nan(kind):
    shape = (129, 65)
    w, g, buf = (torch.randn(shape, device="cuda") for _ in range(3))
    m = make_mask(shape, kind, torch.float32)
    g[m == 0] = float("nan")
    w[m == 0] = float("inf")
    for adaptive in (False, True):
        sq_norm = ops.sam_grad_sq_norm([g], [w], [m], adaptive)
        assert torch.isfinite(sq_norm)
        ref = reference.sam_grad_sq_norm([g], [w], [m], adaptive)
        torch.testing.assert_close(sq_norm, ref, rtol=NORM_RTOL[torch.float32], atol=0)
        out = torch.empty_like(w)
        rho = torch.tensor(0.1, device="cuda")
        ops.sam_perturb_([out], [w], [g], [m], [rho], sq_norm, adaptive, EPS)
        assert_exact(out, reference.sam_perturb([w], [g], [m], [rho], sq_norm, adaptive, EPS)[0])
    args = (0.1, 0.9, 0.0, 1e-2, True, False, False)
    ref_w, ref_buf = reference.sgd_step([w], [g], [buf], [m], *args)
    ops.sgd_step_([w], [g], [buf], [m], *args)
    assert_exact(w, ref_w[0])
    assert_exact(buf, ref_buf[0])


def test_sam_step_ops_group_mixed_dtypes():
    dtypes = [torch.float32, torch.bfloat16, torch.float64, torch.float32]
    shapes = [(33, 17), (20000,), (9, 5), (2, 3)]
    grads = [torch.randn(s, device="cuda", dtype=d) for s, d in zip(shapes, dtypes)]
    weights = [torch.randn(s, device="cuda", dtype=d) for s, d in zip(shapes, dtypes)]
    masks = [make_mask(s, "bool", d) if i % 2 == 0 else None for i, (s, d) in enumerate(zip(shapes, dtypes))]
    sq_norm = ops.sam_grad_sq_norm(grads, weights, masks, True)
    ref = reference.sam_grad_sq_norm(grads, weights, masks, True)
    torch.testing.assert_close(sq_norm, ref, rtol=NORM_RTOL[torch.float32], atol=0)
    rhos = [torch.tensor(0.1, device="cuda") for _ in shapes]
    out = [torch.empty_like(w) for w in weights]
    ops.sam_perturb_(out, weights, grads, masks, rhos, sq_norm, True, EPS)
    for o, r in zip(out, reference.sam_perturb(weights, grads, masks, rhos, sq_norm, True, EPS)):
        assert_exact(o, r)
    args = (0.1, 0.0, 0.0, 0.0, False, False, False)
    ref_params, _ = reference.sgd_step(weights, grads, [], masks, *args)
    ops.sgd_step_(weights, grads, [], masks, *args)
    for w, r, d in zip(weights, ref_params, dtypes):
        if d == torch.bfloat16:
            torch.testing.assert_close(w, r)
        else:
            assert_exact(w, r)


def test_sam_step_ops_reject_bad_input():
    w = torch.randn(4, 5, device="cuda")
    g = torch.randn_like(w)
    one = torch.ones((), device="cuda", dtype=torch.float64)
    with pytest.raises(RuntimeError, match="masks has 0 tensors but grads has 1"):
        ops.sam_grad_sq_norm([g], [w], [], False)
    with pytest.raises(RuntimeError, match=r"masks\[0\] must be bool or floating"):
        ops.sam_grad_sq_norm([g], [w], [torch.ones(4, 5, device="cuda", dtype=torch.int32)], False)
    with pytest.raises(RuntimeError, match=r"grads\[0\] has shape"):
        ops.sgd_step_([w], [g[:, :3]], [], [None], 0.1, 0.0, 0.0, 0.0, False, False, False)
    with pytest.raises(RuntimeError, match=r"momentum_buffers has 0 tensors"):
        ops.sgd_step_([w], [g], [], [None], 0.1, 0.9, 0.0, 0.0, False, False, True)
    with pytest.raises(RuntimeError, match=r"rhos\[0\] must hold one value"):
        ops.sam_perturb_([torch.empty_like(w)], [w], [g], [None], [torch.ones(3, device="cuda")], one, False, EPS)
    with pytest.raises(RuntimeError, match="non-overlapping and dense"):
        strided = torch.randn(4, 10, device="cuda")[:, ::2]
        ops.sgd_step_([strided], [g], [], [None], 0.1, 0.0, 0.0, 0.0, False, False, False)
