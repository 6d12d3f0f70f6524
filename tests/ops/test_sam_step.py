"""The fused SAM step ops (sam_grad_sq_norm, sam_perturb_, sgd_step_) on every backend.

The first test runs on every backend (``backends.OP_BACKENDS``: reference, CPU C++, Triton under
the interpreter, CUDA C++), each skipped with the reason where this machine lacks it; the sections
after it are the backend-specific tests.

Reference and CPU C++ kernels: The CPU kernels of the fused SAM step (csrc/cpu/sam_step_cpu.cpp), called
directly as ``torch.ops.sparsesam.<op>.default``, vs sparsesam.reference.

Tolerances are derived from how each kernel computes: float64 in float64
(~1e-12 relative), float32 / bfloat16 / float16 in float32 with one rounding
per stored value. So a float32 result is within ~1e-6 of the float64 answer
relative to the magnitudes that went into it, and a bf16 / f16 result within
one ulp of it (plus what float32 arithmetic adds, and, for SGD, the rounding
of the stored momentum buffer that torch itself also uses).

Bad settings: the fused SAM step ops refuse settings that would silently poison the weights:
non-finite or negative lr / momentum / weight decay, non-finite dampening,
eps that is not finite and >= 0, rho that is negative or not finite. Both the
Python face (sparsesam.ops) and the CPU kernel (raw torch.ops.sparsesam calls)
check, and every message names the argument.

Triton kernels (marked triton): The Triton fused SAM step (sparsesam.triton_kernels: sam_grad_sq_norm,
sam_perturb_, sgd_step_) vs sparsesam.reference.

They run on CPU under the Triton interpreter:

    TRITON_INTERPRET=1 python -m pytest -m triton tests/ops/test_sam_step.py

TRITON_INTERPRET must be set before triton is imported, so these cases skip
themselves when it is not.

One call covers a whole list of parameters of odd sizes: 1, 7, 129 (one
partial block), 3x5x3x3 (a conv weight), 0 elements, 1030 (a full block and
a tail) and 33x130 (two chunks, a channel run crossing the chunk boundary).

* sam_perturb_ and sgd_step_ are elementwise and follow the reference's
  rounding exactly, so they must match it bit for bit, and pruned entries
  must keep their bits (NaN payloads included).
* sam_grad_sq_norm sums in another order than the reference (float32 blocks
  for 16/32-bit inputs): a relative error of a few float32 ulps per level of
  the sum (float64 ulps for float64 inputs); and it must give the same bits
  twice.

bfloat16 is not tested: the interpreter keeps it as raw uint16 bits and does
arithmetic on the bit patterns. float16 stands in for the 16-bit path.

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
import math

import pytest
import torch

from sparsesam import ops, reference

from backends import backend_op, cuda_cpp_case, OP_BACKENDS, tk, triton_case
from op_cases import pruned_mask, rounded_randn, tensors_to64
from tolerance import assert_as_accurate_as_pytorch, assert_within_torch_error


# ============================================================================
# Every backend (reference, cpu, triton, cuda) against the dense float64 math

@pytest.mark.parametrize("adaptive", [False, True])
@pytest.mark.parametrize("backend", OP_BACKENDS)
def test_every_backend_matches_the_sam_step_math(backend, adaptive):
    """The three ops on float32 parameters (a bool, no and a soft mask; 0-d and per-channel rho) against
    the float64 formulas of the same float32 inputs; pruned entries keep their bits."""
    grad_sq_norm, device = backend_op(backend, "sam_grad_sq_norm")
    perturb, _ = backend_op(backend, "sam_perturb_")
    sgd, _ = backend_op(backend, "sgd_step_")
    shapes = [(5, 3), (7,), (2, 3, 3, 3)]
    w = [torch.randn(s) for s in shapes]
    g = [torch.randn(s) for s in shapes]
    buffers = [torch.randn(s) for s in shapes]
    masks = [torch.rand(shapes[0]) > 0.5, None, torch.where(torch.rand(shapes[2]) > 0.3, torch.rand(shapes[2]), 0.0)]
    rhos = [torch.tensor(0.05), torch.full((7,), 0.1), torch.tensor(0.2)]
    on = lambda ts: [t.to(device) if t is not None else None for t in ts]  # noqa: E731

    def kept(new, old, m):
        return new if m is None else torch.where(m != 0, new, old)

    def per_channel(rho, like):
        return rho if rho.dim() == 0 else rho.reshape(-1, *([1] * (like.dim() - 1)))

    scales = [p.double().abs() if adaptive else torch.ones((), dtype=torch.float64) for p in w]
    sq64 = sum(kept(gi.double() * s, torch.zeros(()), m).square().sum() for gi, s, m in zip(g, scales, masks))
    sq = grad_sq_norm(on(g), on(w) if adaptive else [], on(masks), adaptive)
    assert sq.dtype == torch.float64 and sq.dim() == 0
    assert abs(sq.item() - sq64.item()) <= 1e-5 * sq64.item()

    def perturbed(w, g, rhos, sq_norm):
        return [kept(p + per_channel(r.to(p.dtype), p) * (p.abs() ** 2 if adaptive else 1) * gi
                     / (sq_norm.to(p.dtype).sqrt() + 1e-12), p, m) for p, gi, r, m in zip(w, g, rhos, masks)]

    sq_cpu = sq.cpu()
    truth = perturbed([p.double() for p in w], [gi.double() for gi in g], rhos, sq_cpu)
    torch_own = perturbed(w, g, rhos, sq_cpu)
    out = on([torch.empty_like(p) for p in w])
    perturb(out, on(w), on(g), on(masks), on(rhos), sq, adaptive, 1e-12)
    for i, (o, own, ref) in enumerate(zip(out, torch_own, truth)):
        assert_within_torch_error(f"out[{i}]", o.cpu(), own, ref)
        if masks[i] is not None:
            assert torch.equal(o.cpu()[masks[i] == 0], w[i][masks[i] == 0])

    lr, momentum, weight_decay = 0.1, 0.9, 1e-4

    def sgd_math(w, g, buffers):
        d = [gi + weight_decay * p for p, gi in zip(w, g)]
        new_buffers = [momentum * b + di for b, di in zip(buffers, d)]
        new_w = [p - lr * (di + momentum * b) for p, di, b in zip(w, d, new_buffers)]  # nesterov
        return ([kept(n, p, m) for n, p, m in zip(new_w, w, masks)],
                [kept(n, b, m) for n, b, m in zip(new_buffers, buffers, masks)])

    truth = sgd_math(*([t.double() for t in ts] for ts in (w, g, buffers)))
    torch_own = sgd_math(w, g, buffers)
    params, moments = on([p.clone() for p in w]), on([b.clone() for b in buffers])
    sgd(params, on(g), moments, on(masks), lr, momentum, 0.0, weight_decay, True, False, False)
    for name, ours in (("params", params), ("momentum_buffers", moments)):
        which = 0 if name == "params" else 1
        for i, o in enumerate(ours):
            assert_within_torch_error(f"{name}[{i}]", o.cpu(), torch_own[which][i], truth[which][i], reduction_size=3)
            if masks[i] is not None:
                before = (w if which == 0 else buffers)[i]
                assert torch.equal(o.cpu()[masks[i] == 0], before[masks[i] == 0])


# ============================================================================
# Reference and CPU C++ kernels

raw_ops = torch.ops.sparsesam  # the registered ops, no Python face in front

DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)

# Odd sizes, empty tensors, a 0-d parameter, and tensors larger than one
# 8192-element chunk whose output-channel rows straddle chunk boundaries;
# (20000,) is a 1-d tensor whose per-channel rho has one value per element.
SHAPES = [(1,), (7,), (129,), (3, 5, 3, 3), (0,), (0, 4), (), (16, 9), (5, 3001), (3, 8193), (20000,)]
MASK_KINDS = ("none", "bool", "float")


def _rel(dtype: torch.dtype) -> float:
    """Relative error of the kernel's arithmetic (per magnitude that enters it)."""
    return 1e-12 if dtype == torch.float64 else 1e-6


def _ulp_rel(dtype: torch.dtype) -> float:
    """One ulp of the stored result, relative (0 for the float types: covered by _rel)."""
    return torch.finfo(dtype).eps if dtype in (torch.bfloat16, torch.float16) else 0.0


def assert_close_to(name: str, ours: torch.Tensor, ref64: torch.Tensor, magnitude: torch.Tensor, dtype) -> None:
    """|ours - ref64| <= 1 ulp(ref) (low precision) + rel * magnitude, elementwise."""
    assert ours.shape == ref64.shape and ours.dtype == dtype, f"{name}: {ours.shape} {ours.dtype}"
    if ours.numel() == 0:
        return
    diff = (ours.double() - ref64).abs()
    low = _ulp_rel(dtype)
    # ulp of a subnormal result (bf16 / f16), reached only by cancellation.
    atol = torch.finfo(dtype).smallest_normal * torch.finfo(dtype).eps if low else 0.0
    tol = low * ref64.abs() + max(_rel(dtype), low) * magnitude + atol
    bad = ~(diff <= tol)
    assert not bad.any(), (
        f"{name}: {int(bad.sum())} of {ours.numel()} entries off; worst diff {diff[bad].max().item():.3e} "
        f"at tolerance {tol[bad][diff[bad].argmax()].item():.3e}"
    )


def bits(t: torch.Tensor) -> torch.Tensor:
    """The raw bits, so that NaNs and signed zeros compare exactly."""
    return t.view({2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])


def make_mask(shape, kind: str, dtype: torch.dtype, gen: torch.Generator):
    if kind == "none":
        return None
    keep = torch.rand(shape, generator=gen) > 0.4
    if kind == "bool":
        return keep
    # A soft mask: values in (0, 1] where kept, +0.0 and -0.0 where pruned.
    soft = torch.rand(shape, generator=gen) * 0.9 + 0.1
    signed_zero = torch.where(torch.rand(shape, generator=gen) > 0.5, 0.0, -0.0)
    return torch.where(keep, soft, signed_zero).to(dtype)


def make_case(dtype, seed=0, shapes=SHAPES, mask_kinds=MASK_KINDS):
    """Weights, grads, buffers and masks for every shape; mask kinds cycle over the list."""
    gen = torch.Generator().manual_seed(seed)
    w = [torch.randn(s, generator=gen).to(dtype) for s in shapes]
    g = [torch.randn(s, generator=gen).to(dtype) for s in shapes]
    buf = [torch.randn(s, generator=gen).to(dtype) for s in shapes]
    kinds = [mask_kinds[(i + seed) % len(mask_kinds)] for i in range(len(shapes))]
    masks = [make_mask(s, k, dtype, gen) for s, k in zip(shapes, kinds)]
    return w, g, buf, masks


def pruned(mask):
    return None if mask is None else (mask == 0)


def assert_pruned_untouched(name, new, old, mask):
    p = pruned(mask)
    if p is not None and p.any():
        assert torch.equal(bits(new)[p], bits(old)[p]), f"{name}: a pruned entry changed"


# ---------------------------------------------------------------------------
# sam_grad_sq_norm


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("adaptive", [False, True])
@pytest.mark.parametrize("mask_kinds", [("none",), ("bool",), ("float",), MASK_KINDS], ids="-".join)
def test_sam_grad_sq_norm_matches_reference(dtype, adaptive, mask_kinds):
    w, g, _, masks = make_case(dtype, shapes=SHAPES, mask_kinds=mask_kinds)
    ours = raw_ops.sam_grad_sq_norm.default(g, w, masks, adaptive)
    ref = reference.sam_grad_sq_norm(g, w, masks, adaptive)
    assert ours.dtype == torch.float64 and ours.dim() == 0
    # Every term is positive, so the relative error of the sum is that of the terms.
    assert abs(ours.item() - ref.item()) <= _rel(dtype) * ref.item()


def test_sam_grad_sq_norm_weights_unread_when_not_adaptive():
    g = [torch.randn(5), torch.randn(3, 4)]
    ours = raw_ops.sam_grad_sq_norm.default(g, [], [None, None], False)
    assert ours.item() == pytest.approx(sum(x.double().square().sum().item() for x in g), rel=1e-6)


def test_sam_grad_sq_norm_of_empty_tensors_is_zero():
    # (An empty list carries no tensor, so the dispatcher has no device to
    # pick a kernel by: the Python face answers that case itself.)
    empty = [torch.empty(0), torch.empty(0, 3)]
    assert raw_ops.sam_grad_sq_norm.default(empty, empty, [None, torch.empty(0, dtype=torch.bool)], True).item() == 0.0


def test_sam_grad_sq_norm_excludes_pruned_nan_and_inf():
    g = torch.tensor([1.0, float("nan"), 2.0, float("inf")])
    w = torch.tensor([2.0, 1.0, float("nan"), 3.0])
    keep = torch.tensor([True, False, True, False])
    soft = torch.tensor([0.5, -0.0, 1.0, 0.0])
    assert raw_ops.sam_grad_sq_norm.default([g], [w], [keep], False).item() == 5.0
    assert raw_ops.sam_grad_sq_norm.default([g], [w], [soft], False).item() == 5.0
    assert math.isnan(raw_ops.sam_grad_sq_norm.default([g], [w], [keep], True).item())  # w = nan at a kept entry


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
@pytest.mark.parametrize("adaptive", [False, True])
def test_sam_grad_sq_norm_is_bitwise_deterministic(dtype, adaptive):
    shapes = SHAPES + [(70001,), (3, 33333)]
    w, g, _, masks = make_case(dtype, seed=3, shapes=shapes)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = raw_ops.sam_grad_sq_norm.default(g, w, masks, adaptive)
        torch.set_num_threads(2)
        two = raw_ops.sam_grad_sq_norm.default(g, w, masks, adaptive)
        again = raw_ops.sam_grad_sq_norm.default(g, w, masks, adaptive)
    finally:
        torch.set_num_threads(threads)
    assert bits(one).item() == bits(two).item() == bits(again).item()


# ---------------------------------------------------------------------------
# sam_perturb_


def make_rhos(shapes, per_channel: bool, rho_dtype, gen):
    rhos = []
    for s in shapes:
        if per_channel and len(s) > 0:
            rhos.append((torch.rand(s[0], generator=gen) * 2 + 0.01).to(rho_dtype))
        else:
            rhos.append(torch.tensor(0.05, dtype=rho_dtype))
    return rhos


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("adaptive", [False, True])
@pytest.mark.parametrize("per_channel", [False, True])
@pytest.mark.parametrize("mask_kinds", [("none",), MASK_KINDS], ids="-".join)
def test_sam_perturb_matches_reference(dtype, adaptive, per_channel, mask_kinds):
    w, g, _, masks = make_case(dtype, seed=1, mask_kinds=mask_kinds)
    gen = torch.Generator().manual_seed(7)
    rhos = make_rhos(SHAPES, per_channel, torch.float32 if dtype == torch.float32 else torch.float64, gen)
    sq_norm = reference.sam_grad_sq_norm(g, w, masks, adaptive)
    w_before = [x.clone() for x in w]
    g_before = [x.clone() for x in g]
    out = [torch.full_like(x, float("nan")) for x in w]
    raw_ops.sam_perturb_.default(out, w, g, masks, rhos, sq_norm, adaptive, 1e-12)

    w64, g64 = [x.double() for x in w], [x.double() for x in g]
    ref = reference.sam_perturb(w64, g64, masks, rhos, sq_norm, adaptive, 1e-12)
    for i, (o, r, x, m) in enumerate(zip(out, ref, w64, masks)):
        magnitude = x.abs() + (r - x).abs()  # |w| + |e|
        assert_close_to(f"out[{i}]", o, r, magnitude, dtype)
        assert_pruned_untouched(f"out[{i}]", o, w[i], m)
    for a, b in zip(w + g, w_before + g_before):  # inputs only read
        assert torch.equal(bits(a), bits(b))


def test_sam_perturb_float64_is_exact():
    # Same operations in the same order as the reference: equal to the bit.
    w, g, _, masks = make_case(torch.float64, seed=2)
    gen = torch.Generator().manual_seed(1)
    for adaptive, per_channel in itertools.product([False, True], repeat=2):
        rhos = make_rhos(SHAPES, per_channel, torch.float64, gen)
        sq_norm = reference.sam_grad_sq_norm(g, w, masks, adaptive)
        out = [torch.empty_like(x) for x in w]
        raw_ops.sam_perturb_.default(out, w, g, masks, rhos, sq_norm, adaptive, 1e-12)
        for o, r in zip(out, reference.sam_perturb(w, g, masks, rhos, sq_norm, adaptive, 1e-12)):
            assert torch.equal(o, r)


def test_sam_perturb_pruned_nan_gradient_keeps_weight():
    w = torch.tensor([1.0, 2.0, 3.0])
    g = torch.tensor([1.0, float("nan"), float("inf")])
    out = [torch.empty(3)]
    raw_ops.sam_perturb_.default(out, [w], [g], [torch.tensor([1.0, 0.0, -0.0])], [torch.tensor(1.0)],
                             torch.tensor(4.0, dtype=torch.float64), False, 0.0)
    assert torch.equal(out[0], torch.tensor([1.5, 2.0, 3.0]))


# ---------------------------------------------------------------------------
# sgd_step_

SGD_OPTIONS = [
    dict(momentum=m, dampening=d, weight_decay=wd, nesterov=n, maximize=mx, first_step=f)
    for m, d, wd, n, mx, f in itertools.product([0.0, 0.9], [0.0, 0.25], [0.0, 5e-2], [False, True], [False, True],
                                                [False, True])
    # as torch.optim.SGD: nesterov needs momentum and no dampening; without
    # momentum there are no dampening / first-step variants.
    if not (n and (m == 0 or d != 0)) and not (m == 0 and (d != 0 or f))
]


def _sgd_magnitudes(w, g, buf, lr, momentum, dampening, weight_decay, nesterov, first_step, **_):
    """Per element: the size of what enters the new weight and the new buffer."""
    d = g.double().abs() + weight_decay * w.double().abs()
    if not momentum:
        return lr * d, None
    b = d if first_step else momentum * buf.double().abs() + abs(1 - dampening) * d
    step = d + momentum * b if nesterov else b
    return lr * step, b


def _opt_id(o):
    return ",".join(f"{k}={v}" for k, v in o.items())


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("options", SGD_OPTIONS, ids=_opt_id)
def test_sgd_step_matches_reference(dtype, options):
    lr = 0.1
    w, g, buf, masks = make_case(dtype, seed=4)
    if not options["momentum"]:
        buf = []
    w_new, buf_new = [x.clone() for x in w], [x.clone() for x in buf]
    g_before = [x.clone() for x in g]
    raw_ops.sgd_step_.default(w_new, g, buf_new, masks, lr, options["momentum"], options["dampening"],
                          options["weight_decay"], options["nesterov"], options["maximize"], options["first_step"])
    ref_w, ref_buf = reference.sgd_step([x.double() for x in w], [x.double() for x in g],
                                        [x.double() for x in buf], masks, lr=lr, **options)
    for i in range(len(w)):
        mag_w, mag_b = _sgd_magnitudes(w[i], g[i], buf[i] if buf else None, lr, **options)
        assert_close_to(f"params[{i}]", w_new[i], ref_w[i], w[i].double().abs() + mag_w, dtype)
        assert_pruned_untouched(f"params[{i}]", w_new[i], w[i], masks[i])
        if buf:
            assert_close_to(f"momentum_buffers[{i}]", buf_new[i], ref_buf[i], mag_b, dtype)
            assert_pruned_untouched(f"momentum_buffers[{i}]", buf_new[i], buf[i], masks[i])
    for a, b in zip(g, g_before):
        assert torch.equal(bits(a), bits(b))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_sgd_step_is_exact_in_its_dtype(dtype):
    # One rounding per operation, in the reference's order and with its
    # coefficients rounded to the dtype first: equal to the bit.
    w, g, buf, masks = make_case(dtype, seed=8)
    for options in SGD_OPTIONS:
        bufs = buf if options["momentum"] else []
        w_new, buf_new = [x.clone() for x in w], [x.clone() for x in bufs]
        raw_ops.sgd_step_.default(w_new, g, buf_new, masks, 0.1, options["momentum"], options["dampening"],
                              options["weight_decay"], options["nesterov"], options["maximize"], options["first_step"])
        ref_w, ref_buf = reference.sgd_step(w, g, bufs, masks, lr=0.1, **options)
        for a, b in zip(w_new + buf_new, ref_w + ref_buf):
            assert torch.equal(bits(a), bits(b)), _opt_id(options)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("options", [o for o in SGD_OPTIONS if not o["first_step"]], ids=_opt_id)
def test_sgd_step_follows_torch_optim_sgd(dtype, options):
    # Three steps of torch.optim.SGD (its first step creates the buffer).
    w, _, _, _ = make_case(dtype, seed=5)
    params = [torch.nn.Parameter(x.clone()) for x in w]
    opts = {k: v for k, v in options.items() if k != "first_step"}
    opt = torch.optim.SGD(params, lr=0.05, foreach=False, **opts)
    ours = [x.clone() for x in w]
    bufs = [torch.empty_like(x) for x in w] if options["momentum"] else []
    gen = torch.Generator().manual_seed(9)
    for step in range(3):
        grads = [torch.randn(x.shape, generator=gen).to(dtype) for x in w]
        for p, gr in zip(params, grads):
            p.grad = gr.clone()
        opt.step()
        raw_ops.sgd_step_.default(ours, grads, bufs, [None] * len(w), 0.05, opts["momentum"], opts["dampening"],
                              opts["weight_decay"], opts["nesterov"], opts["maximize"], step == 0)
        for p, o in zip(params, ours):
            # torch may fuse a multiply-add (AVX2 fmadd) where we round twice.
            torch.testing.assert_close(o, p.detach(), rtol=_rel(dtype), atol=_rel(dtype))
        if bufs:
            for p, b in zip(params, bufs):
                torch.testing.assert_close(b, opt.state[p]["momentum_buffer"], rtol=_rel(dtype), atol=_rel(dtype))


def test_empty_tensors_are_skipped_and_the_others_still_computed():
    """No parameters is a no-op; empty tensors own no chunk, so two in a row, first or between others, must
    leave their outputs as they were and not shift the chunks of the tensors after them.

    (sgd_step_ and sam_grad_sq_norm with no tensor at all cannot reach a kernel: the dispatcher picks one
    from the tensor arguments. sam_perturb_ has sq_norm.)"""
    assert raw_ops.sam_perturb_.default([], [], [], [], [], torch.tensor(1.0, dtype=torch.float64), False, 0.0) is None

    shapes = [(0,), (0, 3), (9000,), (0,), (0, 4), (7, 3)]  # 9000: more than one 8192-element chunk
    gen = torch.Generator().manual_seed(3)
    w, g, buf = ([torch.randn(s, generator=gen, dtype=torch.float64) for s in shapes] for _ in range(3))
    masks = [None, None, torch.rand(9000, generator=gen) > 0.5, None, torch.zeros(0, 4, dtype=torch.bool), None]
    rhos = [torch.tensor(0.05), torch.ones(0), torch.tensor(0.1), torch.tensor(0.2), torch.ones(0), torch.rand(7)]
    norm = raw_ops.sam_grad_sq_norm.default(g, w, masks, True)
    torch.testing.assert_close(norm, reference.sam_grad_sq_norm(g, w, masks, True), rtol=1e-12, atol=0)

    out = [torch.full_like(x, float("nan")) for x in w]
    storage = [o.data_ptr() for o in out]
    raw_ops.sam_perturb_.default(out, w, g, masks, rhos, norm, True, 1e-12)
    for i, (o, r) in enumerate(zip(out, reference.sam_perturb(w, g, masks, rhos, norm, True, 1e-12))):
        assert o.shape == shapes[i] and o.data_ptr() == storage[i], f"out[{i}] was replaced"
        assert torch.equal(o, r), f"out[{i}] of shape {shapes[i]}"

    params, bufs = [x.clone() for x in w], [x.clone() for x in buf]
    raw_ops.sgd_step_.default(params, g, bufs, masks, 0.1, 0.9, 0.0, 1e-3, True, False, False)
    ref_params, ref_bufs = reference.sgd_step(w, g, buf, masks, 0.1, 0.9, 0.0, 1e-3, True, False, False)
    for name, ours, ref in (("params", params, ref_params), ("momentum_buffers", bufs, ref_bufs)):
        for i, (a, b) in enumerate(zip(ours, ref)):
            assert a.shape == shapes[i]
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12, msg=f"{name}[{i}] of shape {shapes[i]}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_elementwise_ops_do_not_depend_on_thread_count(dtype):
    w, g, buf, masks = make_case(dtype, seed=6, shapes=SHAPES + [(70001,)])
    rhos = make_rhos(SHAPES + [(70001,)], True, torch.float64, torch.Generator().manual_seed(0))
    sq_norm = raw_ops.sam_grad_sq_norm.default(g, w, masks, True)
    results = []
    threads = torch.get_num_threads()
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            out = [torch.empty_like(x) for x in w]
            raw_ops.sam_perturb_.default(out, w, g, masks, rhos, sq_norm, True, 1e-12)
            w2, b2 = [x.clone() for x in w], [x.clone() for x in buf]
            raw_ops.sgd_step_.default(w2, g, b2, masks, 0.1, 0.9, 0.0, 1e-4, True, False, False)
            results.append(out + w2 + b2)
    finally:
        torch.set_num_threads(threads)
    for a, b in zip(*results):
        assert torch.equal(bits(a), bits(b))


# ---------------------------------------------------------------------------
# Bad input: refused with a message naming the argument (the Python face in
# sparsesam/ops/sam_step.py turns most of these into ValueError first).


def test_bad_input_is_refused():
    a, b = torch.randn(4, 3), torch.randn(4, 3)
    one = torch.tensor(1.0, dtype=torch.float64)
    with pytest.raises(RuntimeError, match="masks has 2 entries"):
        raw_ops.sam_grad_sq_norm.default([a], [b], [None, None], False)
    with pytest.raises(RuntimeError, match="weights has 0 entries"):
        raw_ops.sam_grad_sq_norm.default([a], [], [None], True)
    with pytest.raises(RuntimeError, match=r"grads\[0\] must be contiguous"):
        raw_ops.sam_grad_sq_norm.default([a.t()], [b], [None], False)
    with pytest.raises(RuntimeError, match=r"weights\[0\] has shape"):
        raw_ops.sam_grad_sq_norm.default([a], [b.reshape(3, 4)], [None], True)
    with pytest.raises(RuntimeError, match=r"weights\[0\] is Double"):
        raw_ops.sam_grad_sq_norm.default([a], [b.double()], [None], True)
    with pytest.raises(RuntimeError, match=r"masks\[0\] has 11 elements"):
        raw_ops.sam_grad_sq_norm.default([a], [b], [torch.ones(11, dtype=torch.bool)], False)
    with pytest.raises(RuntimeError, match=r"masks\[0\] must be bool, uint8, int8 or floating"):
        raw_ops.sam_grad_sq_norm.default([a], [b], [torch.ones(4, 3, dtype=torch.int32)], False)
    with pytest.raises(RuntimeError, match=r"grads\[0\] must be float32"):
        raw_ops.sam_grad_sq_norm.default([torch.ones(3, dtype=torch.int64)], [], [None], False)

    with pytest.raises(RuntimeError, match=r"rhos\[0\] has 3 values"):
        raw_ops.sam_perturb_.default([torch.empty_like(a)], [a], [b], [None], [torch.ones(3)], one, False, 0.0)
    with pytest.raises(RuntimeError, match="one entry per parameter"):
        raw_ops.sam_perturb_.default([torch.empty_like(a)], [a], [b], [None], [], one, False, 0.0)
    with pytest.raises(RuntimeError, match="sq_norm must be"):
        raw_ops.sam_perturb_.default([torch.empty_like(a)], [a], [b], [None], [one], torch.ones(2), False, 0.0)
    with pytest.raises(RuntimeError, match=r"out\[0\] and params\[0\] overlap"):
        raw_ops.sam_perturb_.default([a], [a], [b], [None], [one], one, False, 0.0)
    with pytest.raises(RuntimeError, match=r"out\[0\] is BFloat16"):
        raw_ops.sam_perturb_.default([torch.empty_like(a, dtype=torch.bfloat16)], [a], [b], [None], [one], one, False,
                                 0.0)

    with pytest.raises(RuntimeError, match="momentum_buffers must have one entry per parameter"):
        raw_ops.sgd_step_.default([a], [b], [], [None], 0.1, 0.9, 0.0, 0.0, False, False, False)
    with pytest.raises(RuntimeError, match="momentum_buffers must have one entry per parameter"):
        raw_ops.sgd_step_.default([a], [b], [torch.zeros_like(a)], [None], 0.1, 0.0, 0.0, 0.0, False, False, False)
    with pytest.raises(RuntimeError, match=r"momentum_buffers\[0\] has shape"):
        raw_ops.sgd_step_.default([a], [b], [torch.zeros(12)], [None], 0.1, 0.9, 0.0, 0.0, False, False, False)
    with pytest.raises(RuntimeError, match=r"params\[0\] must be contiguous"):
        raw_ops.sgd_step_.default([a.t()], [b.t()], [], [None], 0.1, 0.0, 0.0, 0.0, False, False, False)
    with pytest.raises(RuntimeError, match=r"params\[0\] and grads\[0\] overlap"):
        raw_ops.sgd_step_.default([a], [a], [], [None], 0.1, 0.0, 0.0, 0.0, False, False, False)


def test_python_faces_handle_empty_lists_and_bad_mask_dtypes():
    from sparsesam.ops import sam_grad_sq_norm, sgd_step_
    norm = sam_grad_sq_norm([], [], [], adaptive=False)
    assert norm.dtype == torch.float64 and norm.item() == 0.0
    sgd_step_([], [], [], [], lr=0.1)  # nothing to do, no error
    p = torch.randn(3)
    with pytest.raises(TypeError, match=r"masks\[0\] must be bool, uint8, int8 or floating"):
        sam_grad_sq_norm([p], [p], [torch.ones(3, dtype=torch.int64)])


@pytest.mark.parametrize("adaptive", [False, True])
def test_opcheck(adaptive):
    """Schemas, fake impls and the declared mutations (out, params, momentum buffers) agree with the kernels."""
    shapes = [(5, 3), (7,), (0, 4), (2, 3, 3, 3)]
    params = [torch.randn(s, dtype=torch.float64) for s in shapes]
    grads = [torch.randn(s, dtype=torch.float64) for s in shapes]
    masks = [torch.rand(shapes[0]) > 0.5, None, torch.ones(shapes[2], dtype=torch.bool), torch.rand(shapes[3])
             .to(torch.float64)]
    rhos = [torch.tensor(0.05, dtype=torch.float64), torch.full((7,), 0.1, dtype=torch.float64),
            torch.tensor(0.05, dtype=torch.float64), torch.full((2,), 0.2, dtype=torch.float64)]
    weights = params if adaptive else []
    torch.library.opcheck(raw_ops.sam_grad_sq_norm.default, (grads, weights, masks, adaptive))
    sq_norm = raw_ops.sam_grad_sq_norm.default(grads, weights, masks, adaptive)
    out = [torch.empty_like(p) for p in params]
    torch.library.opcheck(raw_ops.sam_perturb_.default, (out, params, grads, masks, rhos, sq_norm, adaptive, 1e-12))
    buffers = [torch.randn(s, dtype=torch.float64) for s in shapes]
    for momentum, bufs in ((0.9, buffers), (0.0, [])):
        torch.library.opcheck(raw_ops.sgd_step_.default,
                              (params, grads, bufs, masks, 0.1, momentum, 0.0, 1e-4, momentum > 0, False, False))


# ============================================================================
# Bad settings: the Python face and the CPU kernel refuse them

NAN, INF = float("nan"), float("inf")


def _lists():
    w, g = torch.randn(5, 3), torch.randn(5, 3)
    return [w], [g], [None]


def _sgd_args(**change):
    args = dict(lr=0.1, momentum=0.9, dampening=0.0, weight_decay=1e-4)
    args.update(change)
    return args


@pytest.mark.parametrize("name, value", [("lr", NAN), ("lr", INF), ("lr", -0.1), ("momentum", NAN),
                                         ("momentum", -0.5), ("weight_decay", INF), ("dampening", NAN)])
def test_sgd_step_refuses_non_finite_or_negative_settings(name, value):
    params, grads, masks = _lists()
    before = params[0].clone()
    with pytest.raises(ValueError, match=f"^{name} must be finite"):
        ops.sgd_step_(params, grads, [torch.zeros(5, 3)], masks, **_sgd_args(**{name: value}))
    assert torch.equal(params[0], before)   # refused before anything was written


def test_sgd_step_refuses_a_string_lr():
    params, grads, masks = _lists()
    with pytest.raises(TypeError, match="lr must be a real number"):
        ops.sgd_step_(params, grads, [], masks, lr="0.1")


@pytest.mark.parametrize("name, value", [("lr", NAN), ("lr", -1.0), ("momentum", INF), ("weight_decay", NAN),
                                         ("dampening", INF)])
def test_sgd_step_kernel_refuses_them_too(name, value):
    params, grads, masks = _lists()
    args = _sgd_args(**{name: value})
    with pytest.raises(ValueError, match=f"sgd_step_: {name} must be finite"):
        torch.ops.sparsesam.sgd_step_.default(params, grads, [torch.zeros(5, 3)], masks, args["lr"],
                                              args["momentum"], args["dampening"], args["weight_decay"],
                                              False, False, False)


def _perturb(rho, eps=1e-12, raw=False):
    params, grads, masks = _lists()
    out = [torch.empty_like(params[0])]
    sq_norm = ops.sam_grad_sq_norm(grads, [], masks)
    if raw:
        torch.ops.sparsesam.sam_perturb_.default(out, params, grads, masks, [rho], sq_norm, False, eps)
    else:
        ops.sam_perturb_(out, params, grads, masks, [rho], sq_norm, eps=eps)
    return out[0]


@pytest.mark.parametrize("raw", [False, True], ids=["face", "kernel"])
@pytest.mark.parametrize("rho", [torch.tensor(-1.0), torch.tensor(NAN), torch.tensor(INF),
                                 torch.tensor([0.1, 0.1, -0.1, 0.1, 0.1])], ids=["-1", "nan", "inf", "channel"])
def test_sam_perturb_refuses_a_negative_or_non_finite_rho(rho, raw):
    with pytest.raises(ValueError, match=r"rhos\[0\] must be finite and >= 0"):
        _perturb(rho, raw=raw)


@pytest.mark.parametrize("raw", [False, True], ids=["face", "kernel"])
@pytest.mark.parametrize("eps", [NAN, INF, -1e-12])
def test_sam_perturb_refuses_eps_that_is_not_finite_and_non_negative(eps, raw):
    with pytest.raises(ValueError, match="eps must be finite and >= 0"):
        _perturb(torch.tensor(0.05), eps=eps, raw=raw)


def test_valid_settings_still_step():
    out = _perturb(torch.tensor(0.0))
    assert torch.isfinite(out).all()
    params, grads, masks = _lists()
    before = params[0].clone()
    ops.sgd_step_(params, grads, [], masks, lr=0.5, dampening=-0.5)   # torch.optim.SGD allows any dampening
    torch.testing.assert_close(params[0], before - 0.5 * grads[0])


@cuda_cpp_case
def test_cuda_kernel_refuses_non_finite_scalars():
    w, g = torch.randn(5, 3, device="cuda"), torch.randn(5, 3, device="cuda")
    with pytest.raises(ValueError, match=r"sgd_step_ \(CUDA\): lr must be finite and >= 0"):
        torch.ops.sparsesam_cuda.sgd_step_([w], [g], [], [None], NAN, 0.0, 0.0, 0.0, False, False, False)
    sq_norm = torch.ones((), device="cuda")
    with pytest.raises(ValueError, match=r"sam_perturb_ \(CUDA\): eps must be finite and >= 0"):
        torch.ops.sparsesam_cuda.sam_perturb_([torch.empty_like(w)], [w], [g], [None], [torch.tensor(0.05, device="cuda")],
                                              sq_norm, False, INF)


# ============================================================================
# Triton kernels (marked triton)

DTYPES_triton = [torch.float32, torch.float64, torch.float16]
SHAPES_triton = [(1,), (7,), (129,), (3, 5, 3, 3), (0,), (1030,), (33, 130)]
SMALL_SHAPES = SHAPES_triton[:5]
MASK_KINDS_triton = ["none", "bool", "float", "mixed"]
_BITS = {torch.float16: torch.int16, torch.float32: torch.int32, torch.float64: torch.int64, torch.bool: torch.bool}


def _mask(shape, kind, dtype):
    if kind == "none":
        return None
    if kind == "bool":
        return torch.rand(shape) > 0.4
    # A soft mask with exact zeros: zero prunes, any other value keeps.
    soft = torch.rand(shape, dtype=torch.float64)
    return torch.where(soft < 0.4, torch.zeros_like(soft), soft).to(dtype)


def _masks(kind, dtype, shapes=SHAPES_triton):
    kinds = itertools.cycle(["none", "bool", "float"]) if kind == "mixed" else itertools.repeat(kind)
    return [_mask(shape, k, dtype) for shape, k in zip(shapes, kinds)]


def _pruned(mask, like):
    return torch.zeros(like.shape, dtype=torch.bool) if mask is None else mask == 0


def _poison_pruned(tensors, masks):
    """NaN (a specific payload) at pruned entries: a kernel that touches them shows."""
    out = []
    for t, m in zip(tensors, masks):
        t = t.clone()
        bits = t.view(_BITS[t.dtype])
        nan = torch.tensor(float("nan"), dtype=t.dtype).view(_BITS[t.dtype]) + 1  # a NaN with a non-default payload
        bits[_pruned(m, t)] = nan
        out.append(t)
    return out


def _assert_bits(name, ours, theirs):
    assert ours.dtype == theirs.dtype and ours.shape == theirs.shape, name
    a, b = ours.view(_BITS[ours.dtype]), theirs.view(_BITS[theirs.dtype])
    assert torch.equal(a, b), f"{name}: {(a != b).sum()} entries differ in their bits"


def _assert_all_bits(name, ours, theirs):
    assert len(ours) == len(theirs)
    for i, (a, b) in enumerate(zip(ours, theirs)):
        _assert_bits(f"{name}[{i}] shape {tuple(a.shape)}", a, b)


def _rhos(kind, params):
    if kind == "scalar":
        return [torch.tensor(0.05 * (i + 1)) for i in range(len(params))]
    if kind == "per_channel":
        return [torch.rand(p.shape[0]) * 2 for p in params]
    # Mixed dtypes and kinds in one call: 0-d float64, per-channel float32, one-element 1-D.
    kinds = itertools.cycle(["0d64", "channel", "one"])
    rhos = []
    for p, k in zip(params, kinds):
        if k == "0d64":
            rhos.append(torch.tensor(0.3, dtype=torch.float64))
        elif k == "channel":
            rhos.append(torch.rand(p.shape[0]))
        else:
            rhos.append(torch.tensor([0.7]))
    return rhos


class _CountLaunches:
    """Wraps a @triton.jit kernel and counts its launches."""

    def __init__(self, kernel):
        self.kernel, self.launches = kernel, 0

    def __getitem__(self, grid):
        self.launches += 1
        return self.kernel[grid]


# --- sam_grad_sq_norm ------------------------------------------------------


def _norm_rtol(dtype):
    # float32 blocks: each chunk is a float32 sum (a few roundings per
    # element at most), the partials are added in float64.
    return 1e-13 if dtype == torch.float64 else 8 * torch.finfo(torch.float32).eps


@triton_case
@pytest.mark.parametrize("dtype", DTYPES_triton, ids=str)
@pytest.mark.parametrize("adaptive", [False, True], ids=["sam", "asam"])
@pytest.mark.parametrize("mask_kind", MASK_KINDS_triton)
def test_sq_norm_matches_reference(dtype, adaptive, mask_kind):
    grads = [rounded_randn(s, dtype=dtype) for s in SHAPES_triton]
    weights = [rounded_randn(s, dtype=dtype) for s in SHAPES_triton]
    masks = _masks(mask_kind, dtype)
    ours = tk.sam_grad_sq_norm(grads, weights, masks, adaptive)
    ref = reference.sam_grad_sq_norm(grads, weights, masks, adaptive)
    assert ours.dtype == torch.float64 and ours.shape == () and ours.device == grads[0].device
    torch.testing.assert_close(ours, ref, rtol=_norm_rtol(dtype), atol=0)


@triton_case
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_sq_norm_is_deterministic(dtype):
    shapes = [(5000,), (7,), (64, 129), (3, 5, 3, 3)]
    grads = [rounded_randn(s, dtype=dtype) * 1e3 ** i for i, s in enumerate(shapes)]  # wide range: order matters
    weights = [rounded_randn(s, dtype=dtype) for s in shapes]
    masks = _masks("mixed", dtype, shapes)
    for adaptive in (False, True):
        first = tk.sam_grad_sq_norm(grads, weights, masks, adaptive)
        second = tk.sam_grad_sq_norm([g.clone() for g in grads], weights, masks, adaptive)
        _assert_bits("norm", first, second)


@triton_case
@pytest.mark.parametrize("adaptive", [False, True], ids=["sam", "asam"])
def test_sq_norm_ignores_pruned_entries(adaptive):
    masks = _masks("mixed", torch.float32)
    grads = [rounded_randn(s, dtype=torch.float32) for s in SHAPES_triton]
    weights = [rounded_randn(s, dtype=torch.float32) for s in SHAPES_triton]
    clean = tk.sam_grad_sq_norm(grads, weights, masks, adaptive)
    # inf/nan gradients and weights where pruned must add exactly nothing.
    poisoned = [g.masked_fill(_pruned(m, g), float("inf")) for g, m in zip(grads, masks)]
    bad_w = [w.masked_fill(_pruned(m, w), float("nan")) for w, m in zip(weights, masks)]
    _assert_bits("norm", tk.sam_grad_sq_norm(poisoned, bad_w, masks, adaptive), clean)


@triton_case
def test_sq_norm_empty():
    zero = torch.zeros((), dtype=torch.float64)
    _assert_bits("no tensors", tk.sam_grad_sq_norm([], [], [], False), zero)
    empties = [torch.empty(0), torch.empty(2, 0)]
    _assert_bits("empty tensors", tk.sam_grad_sq_norm(empties, empties, [None, None], True), zero)


@triton_case
def test_sq_norm_reads_weights_only_when_adaptive():
    grads = [rounded_randn((7,), dtype=torch.float32), rounded_randn((129,), dtype=torch.float32)]
    weights = [rounded_randn((7,), dtype=torch.float32), rounded_randn((129,), dtype=torch.float32)]
    masks = [None, torch.rand(129) > 0.5]
    with_weights = tk.sam_grad_sq_norm(grads, weights, masks, False)
    _assert_bits("no weights", tk.sam_grad_sq_norm(grads, [], masks, False), with_weights)


# --- sam_perturb_ ----------------------------------------------------------


@triton_case
@pytest.mark.parametrize("dtype", DTYPES_triton, ids=str)
@pytest.mark.parametrize(
    "adaptive,rho_kind,mask_kind",
    # Every rho kind with both perturbations (masks of every kind in one
    # call), then every mask kind on its own.
    [(a, r, "mixed") for a in (False, True) for r in ("scalar", "per_channel", "mixed")]
    + [(True, "mixed", m) for m in ("none", "bool", "float")],
    ids=lambda v: {False: "sam", True: "asam"}.get(v, v) if isinstance(v, bool) else v,
)
def test_perturb_matches_reference(dtype, adaptive, rho_kind, mask_kind):
    masks = _masks(mask_kind, dtype)
    params = _poison_pruned([rounded_randn(s, dtype=dtype) for s in SHAPES_triton], masks)
    grads = _poison_pruned([rounded_randn(s, dtype=dtype) for s in SHAPES_triton], masks)
    rhos = _rhos(rho_kind, params)
    sq_norm = reference.sam_grad_sq_norm(grads, params, masks, adaptive)
    # Buffers full of garbage: every entry must be written.
    out = [torch.full_like(p, 123.0) for p in params]
    before = [p.clone() for p in params]
    assert tk.sam_perturb_(out, params, grads, masks, rhos, sq_norm, adaptive, 1e-12) is None
    ref = reference.sam_perturb(params, grads, masks, rhos, sq_norm, adaptive, 1e-12)
    _assert_all_bits("out", out, ref)
    _assert_all_bits("params (read only)", params, before)
    for o, p, m in zip(out, params, masks):
        _assert_bits("pruned entries of out", o[_pruned(m, p)], p[_pruned(m, p)])


@triton_case
@pytest.mark.parametrize("norm_dtype", [torch.float32, torch.float64], ids=str)
def test_perturb_sq_norm_and_eps(norm_dtype):
    """sq_norm of another dtype, a zero norm (eps alone), a large eps."""
    params = [rounded_randn(s, dtype=torch.float32) for s in SHAPES_triton]
    grads = [rounded_randn(s, dtype=torch.float32) for s in SHAPES_triton]
    masks = _masks("bool", torch.float32)
    rhos = _rhos("scalar", params)
    for sq_norm, eps in [(torch.tensor(2.5, dtype=norm_dtype), 1e-12), (torch.tensor(0.0, dtype=norm_dtype), 1e-3),
                         (torch.tensor(7.0, dtype=norm_dtype), 0.5)]:
        out = [torch.empty_like(p) for p in params]
        tk.sam_perturb_(out, params, grads, masks, rhos, sq_norm, True, eps)
        _assert_all_bits("out", out, reference.sam_perturb(params, grads, masks, rhos, sq_norm, True, eps))


@triton_case
def test_perturb_noncontiguous_out_and_inputs():
    shapes = [(6, 9), (4, 5, 3)]
    params = [rounded_randn(s, dtype=torch.float64).transpose(0, -1) for s in shapes]
    grads = [rounded_randn(s, dtype=torch.float64).transpose(0, -1) for s in shapes]
    masks = [(torch.rand(s) > 0.5).transpose(0, -1) for s in shapes]
    rhos = [torch.rand(p.shape[0]) for p in params]
    out = [torch.zeros(s, dtype=torch.float64).transpose(0, -1) for s in shapes]
    sq_norm = torch.tensor(3.0, dtype=torch.float64)
    tk.sam_perturb_(out, params, grads, masks, rhos, sq_norm, True, 1e-12)
    _assert_all_bits("out", out, reference.sam_perturb(params, grads, masks, rhos, sq_norm, True, 1e-12))


# Empty tensors own no chunk: two in a row, first and between others, must not shift the chunks
# of the tensors after them; 9000 elements take two chunks.
EMPTY_MIX = [(0,), (0, 3), (9000,), (0,), (0, 4), (7, 3)]


def _empty_mix(dtype):
    params = [rounded_randn(s, dtype=dtype) for s in EMPTY_MIX]
    grads = [rounded_randn(s, dtype=dtype) for s in EMPTY_MIX]
    masks = [None, None, torch.rand(9000) > 0.5, None, torch.zeros(0, 4, dtype=torch.bool), None]
    return params, grads, masks


@triton_case
def test_perturb_empty():
    assert tk.sam_perturb_([], [], [], [], [], torch.tensor(1.0), False, 1e-12) is None
    params, grads, masks = _empty_mix(torch.float32)
    rhos = [torch.tensor(0.05), torch.empty(0), torch.tensor(0.1), torch.tensor(0.2), torch.empty(0), torch.rand(7)]
    sq_norm = torch.tensor(3.0, dtype=torch.float64)
    out = [torch.full_like(p, float("nan")) for p in params]
    storage = [o.data_ptr() for o in out]
    assert tk.sam_perturb_(out, params, grads, masks, rhos, sq_norm, True, 1e-12) is None
    assert [tuple(o.shape) for o in out] == EMPTY_MIX and [o.data_ptr() for o in out] == storage
    _assert_all_bits("out", out, reference.sam_perturb(params, grads, masks, rhos, sq_norm, True, 1e-12))


# --- sgd_step_ -------------------------------------------------------------

SGD_OPTIONS_triton = list(itertools.product(
    [0.0, 0.9],  # momentum
    [0.0, 0.25],  # dampening
    [0.0, 1e-2],  # weight_decay
    [False, True],  # nesterov
    [False, True],  # maximize
    [False, True],  # first_step
))


def _sgd_case(dtype, mask_kind, momentum, shapes=SHAPES_triton):
    masks = _masks(mask_kind, dtype, shapes)
    params = _poison_pruned([rounded_randn(s, dtype=dtype) for s in shapes], masks)
    grads = [rounded_randn(s, dtype=dtype) for s in shapes]
    buffers = _poison_pruned([rounded_randn(s, dtype=dtype) for s in shapes], masks) if momentum else []
    return params, grads, buffers, masks


def _run_sgd(params, grads, buffers, masks, *options):
    ours_p, ours_b = [p.clone() for p in params], [b.clone() for b in buffers]
    assert tk.sgd_step_(ours_p, grads, ours_b, masks, 0.1, *options) is None
    ref_p, ref_b = reference.sgd_step(params, grads, buffers, masks, 0.1, *options)
    return ours_p, ours_b, ref_p, ref_b


@triton_case
@pytest.mark.parametrize("dtype", DTYPES_triton, ids=str)
@pytest.mark.parametrize(
    "momentum,dampening,weight_decay,nesterov,maximize,first_step", SGD_OPTIONS_triton,
    ids=lambda v: str(v),
)
def test_sgd_step_matches_reference_triton(dtype, momentum, dampening, weight_decay, nesterov, maximize, first_step):
    options = (momentum, dampening, weight_decay, nesterov, maximize, first_step)
    # The small sizes keep 192 interpreted runs fast; the larger ones (full
    # blocks, several chunks) are covered by test_sgd_step_mask_kinds.
    params, grads, buffers, masks = _sgd_case(dtype, "mixed", momentum, SMALL_SHAPES)
    ours_p, ours_b, ref_p, ref_b = _run_sgd(params, grads, buffers, masks, *options)
    # Bit for bit, pruned entries (NaN with a payload) included.
    _assert_all_bits("params", ours_p, ref_p)
    _assert_all_bits("momentum_buffers", ours_b, ref_b)
    for new, old, m in zip(ours_p + ours_b, params + buffers, masks + masks):
        _assert_bits("pruned entries", new[_pruned(m, old)], old[_pruned(m, old)])


@triton_case
@pytest.mark.parametrize("dtype", DTYPES_triton, ids=str)
@pytest.mark.parametrize("mask_kind", MASK_KINDS_triton)
def test_sgd_step_mask_kinds(dtype, mask_kind):
    options = (0.9, 0.0, 1e-2, True, False, False)
    params, grads, buffers, masks = _sgd_case(dtype, mask_kind, 0.9)
    ours_p, ours_b, ref_p, ref_b = _run_sgd(params, grads, buffers, masks, *options)
    _assert_all_bits("params", ours_p, ref_p)
    _assert_all_bits("momentum_buffers", ours_b, ref_b)


@triton_case
def test_sgd_step_several_steps():
    """A first step, then later ones, with the buffers carried over."""
    params, grads, buffers, masks = _sgd_case(torch.float32, "mixed", 0.9)
    ours_p, ours_b = [p.clone() for p in params], [b.clone() for b in buffers]
    ref_p, ref_b = params, buffers
    for step in range(3):
        g = [rounded_randn(p.shape, dtype=torch.float32) for p in params]
        tk.sgd_step_(ours_p, g, ours_b, masks, 0.05, 0.9, 0.0, 5e-4, False, False, step == 0)
        ref_p, ref_b = reference.sgd_step(ref_p, g, ref_b, masks, 0.05, 0.9, 0.0, 5e-4, False, False, step == 0)
    _assert_all_bits("params", ours_p, ref_p)
    _assert_all_bits("momentum_buffers", ours_b, ref_b)


@triton_case
def test_sgd_step_noncontiguous_params_and_buffers():
    shapes = [(6, 9), (4, 5, 3)]
    params = [rounded_randn(s, dtype=torch.float32).transpose(0, -1) for s in shapes]
    grads = [rounded_randn(s, dtype=torch.float32).transpose(0, -1) for s in shapes]
    buffers = [rounded_randn(s, dtype=torch.float32).transpose(0, -1) for s in shapes]
    masks = [(torch.rand(s) > 0.5).transpose(0, -1) for s in shapes]
    options = (0.9, 0.1, 1e-2, False, True, False)
    ours_p, ours_b, ref_p, ref_b = _run_sgd(params, grads, buffers, masks, *options)
    _assert_all_bits("params", ours_p, ref_p)
    _assert_all_bits("momentum_buffers", ours_b, ref_b)


@triton_case
def test_sgd_step_empty():
    assert tk.sgd_step_([], [], [], [], 0.1, 0.9, 0.0, 0.0, False, False, True) is None
    params, grads, masks = _empty_mix(torch.float32)
    buffers = [rounded_randn(s, dtype=torch.float32) for s in EMPTY_MIX]
    ours_p, ours_b, ref_p, ref_b = _run_sgd(params, grads, buffers, masks, 0.9, 0.0, 1e-3, True, False, False)
    assert [tuple(p.shape) for p in ours_p] == [tuple(b.shape) for b in ours_b] == EMPTY_MIX
    _assert_all_bits("params", ours_p, ref_p)
    _assert_all_bits("momentum_buffers", ours_b, ref_b)


# --- launches, bad input ---------------------------------------------------


@triton_case
def test_one_launch_for_masked_and_dense_tensors(monkeypatch):
    """Masked weights and dense biases of one dtype go in one launch; empty tensors in none."""
    norm = _CountLaunches(tk.multi_tensor._sq_norm_partials_kernel)
    perturb = _CountLaunches(tk.sam_step._sam_perturb_kernel)
    sgd = _CountLaunches(tk.sam_step._sgd_step_kernel)
    # The norm kernel is launched from the shared multi-tensor module.
    monkeypatch.setattr(tk.multi_tensor, "_sq_norm_partials_kernel", norm)
    monkeypatch.setattr(tk.sam_step, "_sam_perturb_kernel", perturb)
    monkeypatch.setattr(tk.sam_step, "_sgd_step_kernel", sgd)
    shapes = [(7,), (3, 5, 3, 3), (0,), (129,)]
    params, grads, buffers, masks = _sgd_case(torch.float32, "none", 0.9, shapes)
    masks = [None, torch.rand(shapes[1]) > 0.5, None, torch.rand(shapes[3]) > 0.5]
    sq = tk.sam_grad_sq_norm(grads, params, masks, True)
    out = [torch.empty_like(p) for p in params]
    tk.sam_perturb_(out, params, grads, masks, _rhos("per_channel", params), sq, True, 1e-12)
    tk.sgd_step_(params, grads, buffers, masks, 0.1, 0.9, 0.0, 0.0, False, False, False)
    assert (norm.launches, perturb.launches, sgd.launches) == (1, 1, 1)
    empties = [torch.empty(0), torch.empty(3, 0)]
    tk.sam_grad_sq_norm(empties, empties, [None, None], False)
    tk.sgd_step_(empties, empties, [], [None, None], 0.1, 0.0, 0.0, 0.0, False, False, False)
    assert (norm.launches, sgd.launches) == (1, 1)


@triton_case
def test_bad_input():
    w = [torch.zeros(4, 3)]
    with pytest.raises(ValueError, match="masks"):
        tk.sam_grad_sq_norm(w, w, [], False)
    with pytest.raises(ValueError, match=r"grads\[0\]"):
        tk.sgd_step_(w, [torch.zeros(3, 4)], [], [None], 0.1, 0.0, 0.0, 0.0, False, False, False)
    with pytest.raises(TypeError, match=r"grads\[0\]"):
        tk.sgd_step_(w, [torch.zeros(4, 3, dtype=torch.float64)], [], [None], 0.1, 0.0, 0.0, 0.0, False, False, False)
    with pytest.raises(ValueError, match="momentum_buffers"):
        tk.sgd_step_(w, w, [], [None], 0.1, 0.9, 0.0, 0.0, False, False, False)
    with pytest.raises(ValueError, match=r"masks\[0\]"):
        tk.sam_grad_sq_norm(w, w, [torch.ones(3, dtype=torch.bool)], False)
    with pytest.raises(TypeError, match=r"masks\[0\]"):
        tk.sam_grad_sq_norm(w, w, [torch.ones(4, 3, dtype=torch.int32)], False)
    with pytest.raises(ValueError, match=r"rhos\[0\]"):
        tk.sam_perturb_([torch.empty(4, 3)], w, w, [None], [torch.ones(3)], torch.tensor(1.0), False, 1e-12)
    with pytest.raises(ValueError, match="sq_norm"):
        tk.sam_perturb_([torch.empty(4, 3)], w, w, [None], [torch.tensor(1.0)], torch.ones(2), False, 1e-12)


# ============================================================================
# CUDA C++ kernels on a GPU (marked gpu)

DTYPES_cuda_cpp = [torch.float32, torch.float64, torch.bfloat16]
MASK_KINDS_cuda_cpp = ["bool", "float"]
ops_cuda_cpp = torch.ops.sparsesam_cuda


def assert_exact(out, ref):
    assert out.shape == ref.shape and out.dtype == ref.dtype and out.device == ref.device
    torch.testing.assert_close(out, ref, rtol=0, atol=0, equal_nan=True)


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


def make_tensors(dtype, shapes=PARAM_SHAPES):
    return [torch.randn(s, device="cuda", dtype=dtype) for s in shapes]


def make_masks(choice, dtype, shapes=PARAM_SHAPES):
    if choice == "mixed":
        kinds = [("none", "bool", "float")[i % 3] for i in range(len(shapes))]
    else:
        kinds = [choice] * len(shapes)
    return [None if kind == "none" else pruned_mask(s, kind, dtype) for s, kind in zip(shapes, kinds)]


def make_rhos_cuda_cpp(params, kind):
    if kind == "cpu_scalar":
        return [torch.tensor(0.05, dtype=torch.float64) for _ in params]
    if kind == "per_channel":
        return [torch.rand(p.shape[0], device="cuda") + 0.01 if p.dim() else torch.tensor(0.3, device="cuda")
                for p in params]
    return [torch.tensor(0.05, device="cuda") for _ in params]


def pruned_cuda_cpp(mask, like):
    return torch.zeros_like(like, dtype=torch.bool) if mask is None else mask == 0


@cuda_cpp_case
@pytest.mark.parametrize("dtype", DTYPES_cuda_cpp)
@pytest.mark.parametrize("masks", MASK_CHOICES)
@pytest.mark.parametrize("adaptive", [False, True])
def test_sam_grad_sq_norm(dtype, masks, adaptive):
    grads, weights = make_tensors(dtype), make_tensors(dtype)
    ms = make_masks(masks, dtype)
    out = ops_cuda_cpp.sam_grad_sq_norm(grads, weights, ms, adaptive)
    ref = reference.sam_grad_sq_norm(grads, weights, ms, adaptive)
    assert out.shape == () and out.dtype == torch.float64 and out.device == ref.device
    torch.testing.assert_close(out, ref, rtol=NORM_RTOL[dtype], atol=0)


@cuda_cpp_case
def test_sam_grad_sq_norm_is_bitwise_deterministic_cuda_cpp():
    shapes = [(1000, 1000), (257,), (64, 3, 7, 7)]
    grads = [10 * g for g in make_tensors(torch.float32, shapes)]
    weights = make_tensors(torch.float32, shapes)
    masks = [pruned_mask(shapes[0], "bool", torch.float32), None, pruned_mask(shapes[2], "float", torch.float32)]
    first = ops_cuda_cpp.sam_grad_sq_norm(grads, weights, masks, True)
    for _ in range(5):
        assert torch.equal(ops_cuda_cpp.sam_grad_sq_norm(grads, weights, masks, True), first)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        on_stream = ops_cuda_cpp.sam_grad_sq_norm(grads, weights, masks, True)
    stream.synchronize()
    assert torch.equal(on_stream, first)

    # Misaligned copies take the element-wise loads, which visit the
    # elements in the same order: the same bits.
    def shifted(t):
        storage = torch.empty(t.numel() + 1, device="cuda", dtype=t.dtype)
        storage[1:].copy_(t.flatten())
        return storage[1:].view(t.shape)

    out = ops_cuda_cpp.sam_grad_sq_norm([shifted(g) for g in grads], [shifted(w) for w in weights], masks, True)
    assert torch.equal(out, first)


@cuda_cpp_case
@pytest.mark.parametrize("dtype", DTYPES_cuda_cpp)
@pytest.mark.parametrize("masks", MASK_CHOICES)
@pytest.mark.parametrize("adaptive", [False, True])
@pytest.mark.parametrize("rho_kind", RHO_KINDS)
def test_sam_perturb(dtype, masks, adaptive, rho_kind):
    params, grads = make_tensors(dtype), make_tensors(dtype)
    ms = make_masks(masks, dtype)
    rhos = make_rhos_cuda_cpp(params, rho_kind)
    sq_norm = reference.sam_grad_sq_norm(grads, params, ms, adaptive)
    params_before = [p.clone() for p in params]
    out = [torch.full_like(p, float("nan")) for p in params]
    ops_cuda_cpp.sam_perturb_(out, params, grads, ms, rhos, sq_norm, adaptive, EPS)
    refs = reference.sam_perturb(params, grads, ms, rhos, sq_norm, adaptive, EPS)
    for o, ref, p, before, m in zip(out, refs, params, params_before, ms):
        # Computed in float64 and rounded once, as the reference: bit for bit,
        # and pruned_cuda_cpp entries are the weight itself.
        assert_exact(o, ref)
        assert_exact(o[pruned_cuda_cpp(m, o)], p[pruned_cuda_cpp(m, p)])
        assert_exact(p, before)


@cuda_cpp_case
def test_sam_perturb_in_place_misaligned_and_strided():
    shape = (37, 41)
    # Storage offset 1: the element-wise variant; the transposed gradient is
    # copied into the weight's layout.
    w = torch.randn(shape[0] * shape[1] + 1, device="cuda")[1:].view(shape)
    g = torch.randn(shape, device="cuda").t().contiguous().t()
    m = pruned_mask(shape, "bool", torch.float32)
    rho = torch.rand(shape[0], device="cuda", dtype=torch.float64)
    sq_norm = ops_cuda_cpp.sam_grad_sq_norm([g], [w], [m], True)
    ref = reference.sam_perturb([w], [g], [m], [rho], sq_norm, True, EPS)[0]
    ops_cuda_cpp.sam_perturb_([w], [w], [g], [m], [rho], sq_norm, True, EPS)
    assert_exact(w, ref)


SGD_OPTIONS_cuda_cpp = [
    # (momentum, dampening, weight_decay, nesterov, maximize, first_step)
    (0.0, 0.0, 0.0, False, False, False),
    (0.0, 0.0, 1e-2, False, True, False),
    (0.9, 0.0, 0.0, False, False, True),
    (0.9, 0.0, 5e-4, True, False, True),
    (0.9, 0.1, 5e-4, False, False, False),
    (0.9, 0.0, 5e-4, True, True, False),
    (0.5, 0.3, 0.0, False, True, False),
]


@cuda_cpp_case
@pytest.mark.parametrize("dtype", DTYPES_cuda_cpp)
@pytest.mark.parametrize("masks", MASK_CHOICES)
@pytest.mark.parametrize("options", SGD_OPTIONS_cuda_cpp)
def test_sgd_step(dtype, masks, options):
    momentum, dampening, weight_decay, nesterov, maximize, first_step = options
    args = (0.1, momentum, dampening, weight_decay, nesterov, maximize, first_step)
    params, grads = make_tensors(dtype), make_tensors(dtype)
    # Random buffers even on the first step: pruned_cuda_cpp entries keep whatever they hold.
    bufs = make_tensors(dtype) if momentum else []
    ms = make_masks(masks, dtype)
    ref_params, ref_bufs = reference.sgd_step(params, grads, bufs, ms, *args)
    ref64_params, ref64_bufs = reference.sgd_step(tensors_to64(*params), tensors_to64(*grads), tensors_to64(*bufs), ms, *args)
    params_before, bufs_before = [p.clone() for p in params], [b.clone() for b in bufs]
    ops_cuda_cpp.sgd_step_(params, grads, bufs, ms, *args)
    results = list(zip(params, ref_params, ref64_params, params_before, ms))
    results += list(zip(bufs, ref_bufs, ref64_bufs, bufs_before, ms))
    for new, ref, ref64, before, m in results:
        if dtype == torch.bfloat16:
            # Computed in float and rounded once (the reference rounds every op).
            assert_as_accurate_as_pytorch(new, ref, ref64)
        else:
            # The reference's operations in its order, each rounded: bit for bit.
            assert_exact(new, ref)
        assert_exact(new[pruned_cuda_cpp(m, new)], before[pruned_cuda_cpp(m, before)])


@cuda_cpp_case
@pytest.mark.parametrize("kind", MASK_KINDS_cuda_cpp)
def test_sam_step_ops_ignore_pruned_inf_and_nan(kind):
    shape = (129, 65)
    w, g, buf = (torch.randn(shape, device="cuda") for _ in range(3))
    m = pruned_mask(shape, kind, torch.float32)
    g[m == 0] = float("nan")
    w[m == 0] = float("inf")
    for adaptive in (False, True):
        sq_norm = ops_cuda_cpp.sam_grad_sq_norm([g], [w], [m], adaptive)
        assert torch.isfinite(sq_norm)
        ref = reference.sam_grad_sq_norm([g], [w], [m], adaptive)
        torch.testing.assert_close(sq_norm, ref, rtol=NORM_RTOL[torch.float32], atol=0)
        out = torch.empty_like(w)
        rho = torch.tensor(0.1, device="cuda")
        ops_cuda_cpp.sam_perturb_([out], [w], [g], [m], [rho], sq_norm, adaptive, EPS)
        assert_exact(out, reference.sam_perturb([w], [g], [m], [rho], sq_norm, adaptive, EPS)[0])
    args = (0.1, 0.9, 0.0, 1e-2, True, False, False)
    ref_w, ref_buf = reference.sgd_step([w], [g], [buf], [m], *args)
    ops_cuda_cpp.sgd_step_([w], [g], [buf], [m], *args)
    assert_exact(w, ref_w[0])
    assert_exact(buf, ref_buf[0])


@cuda_cpp_case
def test_sam_step_ops_group_mixed_dtypes():
    dtypes = [torch.float32, torch.bfloat16, torch.float64, torch.float32]
    shapes = [(33, 17), (20000,), (9, 5), (2, 3)]
    grads = [torch.randn(s, device="cuda", dtype=d) for s, d in zip(shapes, dtypes)]
    weights = [torch.randn(s, device="cuda", dtype=d) for s, d in zip(shapes, dtypes)]
    masks = [pruned_mask(s, "bool", d) if i % 2 == 0 else None for i, (s, d) in enumerate(zip(shapes, dtypes))]
    sq_norm = ops_cuda_cpp.sam_grad_sq_norm(grads, weights, masks, True)
    ref = reference.sam_grad_sq_norm(grads, weights, masks, True)
    torch.testing.assert_close(sq_norm, ref, rtol=NORM_RTOL[torch.float32], atol=0)
    rhos = [torch.tensor(0.1, device="cuda") for _ in shapes]
    out = [torch.empty_like(w) for w in weights]
    ops_cuda_cpp.sam_perturb_(out, weights, grads, masks, rhos, sq_norm, True, EPS)
    for o, r in zip(out, reference.sam_perturb(weights, grads, masks, rhos, sq_norm, True, EPS)):
        assert_exact(o, r)
    args = (0.1, 0.0, 0.0, 0.0, False, False, False)
    ref_params, _ = reference.sgd_step(weights, grads, [], masks, *args)
    ops_cuda_cpp.sgd_step_(weights, grads, [], masks, *args)
    for w, r, d in zip(weights, ref_params, dtypes):
        if d == torch.bfloat16:
            torch.testing.assert_close(w, r)
        else:
            assert_exact(w, r)


@cuda_cpp_case
def test_sam_step_ops_reject_bad_input():
    w = torch.randn(4, 5, device="cuda")
    g = torch.randn_like(w)
    one = torch.ones((), device="cuda", dtype=torch.float64)
    with pytest.raises(RuntimeError, match="masks has 0 tensors but grads has 1"):
        ops_cuda_cpp.sam_grad_sq_norm([g], [w], [], False)
    with pytest.raises(RuntimeError, match=r"masks\[0\] must be bool or floating"):
        ops_cuda_cpp.sam_grad_sq_norm([g], [w], [torch.ones(4, 5, device="cuda", dtype=torch.int32)], False)
    with pytest.raises(RuntimeError, match=r"grads\[0\] has shape"):
        ops_cuda_cpp.sgd_step_([w], [g[:, :3]], [], [None], 0.1, 0.0, 0.0, 0.0, False, False, False)
    with pytest.raises(RuntimeError, match=r"momentum_buffers has 0 tensors"):
        ops_cuda_cpp.sgd_step_([w], [g], [], [None], 0.1, 0.9, 0.0, 0.0, False, False, True)
    with pytest.raises(RuntimeError, match=r"rhos\[0\] must hold one value"):
        ops_cuda_cpp.sam_perturb_([torch.empty_like(w)], [w], [g], [None], [torch.ones(3, device="cuda")], one, False, EPS)
    with pytest.raises(RuntimeError, match="non-overlapping and dense"):
        strided = torch.randn(4, 10, device="cuda")[:, ::2]
        ops_cuda_cpp.sgd_step_([strided], [g], [], [None], 0.1, 0.0, 0.0, 0.0, False, False, False)


# ============================================================================
# Callers: the SAM optimizer and FusedMaskedSGD reach these ops through the typed faces


@pytest.mark.parametrize("norm_in_backward", [False, True])
def test_the_optimizer_calls_the_typed_faces(monkeypatch, norm_in_backward):
    import sparsesam.optim.fused_sgd as fused_sgd
    import sparsesam.optim.sam as sam_module
    from sparsesam.optim import SAM

    calls = []

    def spy(module, name):
        face = getattr(module, name)
        assert face is getattr(ops, name)  # the face of sparsesam.ops, not the raw op

        def record(*args, **kwargs):
            calls.append(name)
            return face(*args, **kwargs)

        monkeypatch.setattr(module, name, record)

    spy(sam_module, "sam_grad_sq_norm")
    spy(sam_module, "sam_perturb_")
    spy(fused_sgd, "sgd_step_")
    model = torch.nn.Sequential(torch.nn.Linear(4, 64), torch.nn.ReLU(), torch.nn.Linear(64, 3))
    optimizer = SAM(model.parameters(), torch.optim.SGD, rho=0.05, lr=0.1, momentum=0.9,
                    norm_in_backward=norm_in_backward)
    x, y = torch.randn(8, 4), torch.randint(0, 3, (8,))
    torch.nn.functional.cross_entropy(model(x), y).backward()
    optimizer.first_step(zero_grad=True)
    torch.nn.functional.cross_entropy(model(x), y).backward()
    optimizer.second_step()
    assert {"sam_grad_sq_norm", "sam_perturb_", "sgd_step_"} <= set(calls)
