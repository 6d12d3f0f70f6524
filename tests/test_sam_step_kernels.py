"""The CPU kernels of the fused SAM step (csrc/cpu/sam_step_cpu.cpp), called
directly as ``torch.ops.sparsesam.<op>.default``, vs sparsesam.reference.

Tolerances are derived from how each kernel computes: float64 in float64
(~1e-12 relative), float32 / bfloat16 / float16 in float32 with one rounding
per stored value. So a float32 result is within ~1e-6 of the float64 answer
relative to the magnitudes that went into it, and a bf16 / f16 result within
one ulp of it (plus what float32 arithmetic adds, and, for SGD, the rounding
of the stored momentum buffer that torch itself also uses)."""
from __future__ import annotations

import itertools
import math

import pytest
import torch

from sparsesam import reference

ops = torch.ops.sparsesam

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
    ours = ops.sam_grad_sq_norm.default(g, w, masks, adaptive)
    ref = reference.sam_grad_sq_norm(g, w, masks, adaptive)
    assert ours.dtype == torch.float64 and ours.dim() == 0
    # Every term is positive, so the relative error of the sum is that of the terms.
    assert abs(ours.item() - ref.item()) <= _rel(dtype) * ref.item()


def test_sam_grad_sq_norm_weights_unread_when_not_adaptive():
    g = [torch.randn(5), torch.randn(3, 4)]
    ours = ops.sam_grad_sq_norm.default(g, [], [None, None], False)
    assert ours.item() == pytest.approx(sum(x.double().square().sum().item() for x in g), rel=1e-6)


def test_sam_grad_sq_norm_of_empty_tensors_is_zero():
    # (An empty list carries no tensor, so the dispatcher has no device to
    # pick a kernel by: the Python face answers that case itself.)
    empty = [torch.empty(0), torch.empty(0, 3)]
    assert ops.sam_grad_sq_norm.default(empty, empty, [None, torch.empty(0, dtype=torch.bool)], True).item() == 0.0


def test_sam_grad_sq_norm_excludes_pruned_nan_and_inf():
    g = torch.tensor([1.0, float("nan"), 2.0, float("inf")])
    w = torch.tensor([2.0, 1.0, float("nan"), 3.0])
    keep = torch.tensor([True, False, True, False])
    soft = torch.tensor([0.5, -0.0, 1.0, 0.0])
    assert ops.sam_grad_sq_norm.default([g], [w], [keep], False).item() == 5.0
    assert ops.sam_grad_sq_norm.default([g], [w], [soft], False).item() == 5.0
    assert math.isnan(ops.sam_grad_sq_norm.default([g], [w], [keep], True).item())  # w = nan at a kept entry


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
@pytest.mark.parametrize("adaptive", [False, True])
def test_sam_grad_sq_norm_is_bitwise_deterministic(dtype, adaptive):
    shapes = SHAPES + [(70001,), (3, 33333)]
    w, g, _, masks = make_case(dtype, seed=3, shapes=shapes)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = ops.sam_grad_sq_norm.default(g, w, masks, adaptive)
        torch.set_num_threads(2)
        two = ops.sam_grad_sq_norm.default(g, w, masks, adaptive)
        again = ops.sam_grad_sq_norm.default(g, w, masks, adaptive)
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
    ops.sam_perturb_.default(out, w, g, masks, rhos, sq_norm, adaptive, 1e-12)

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
        ops.sam_perturb_.default(out, w, g, masks, rhos, sq_norm, adaptive, 1e-12)
        for o, r in zip(out, reference.sam_perturb(w, g, masks, rhos, sq_norm, adaptive, 1e-12)):
            assert torch.equal(o, r)


def test_sam_perturb_pruned_nan_gradient_keeps_weight():
    w = torch.tensor([1.0, 2.0, 3.0])
    g = torch.tensor([1.0, float("nan"), float("inf")])
    out = [torch.empty(3)]
    ops.sam_perturb_.default(out, [w], [g], [torch.tensor([1.0, 0.0, -0.0])], [torch.tensor(1.0)],
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
    ops.sgd_step_.default(w_new, g, buf_new, masks, lr, options["momentum"], options["dampening"],
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
        ops.sgd_step_.default(w_new, g, buf_new, masks, 0.1, options["momentum"], options["dampening"],
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
        ops.sgd_step_.default(ours, grads, bufs, [None] * len(w), 0.05, opts["momentum"], opts["dampening"],
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
    assert ops.sam_perturb_.default([], [], [], [], [], torch.tensor(1.0, dtype=torch.float64), False, 0.0) is None

    shapes = [(0,), (0, 3), (9000,), (0,), (0, 4), (7, 3)]  # 9000: more than one 8192-element chunk
    gen = torch.Generator().manual_seed(3)
    w, g, buf = ([torch.randn(s, generator=gen, dtype=torch.float64) for s in shapes] for _ in range(3))
    masks = [None, None, torch.rand(9000, generator=gen) > 0.5, None, torch.zeros(0, 4, dtype=torch.bool), None]
    rhos = [torch.tensor(0.05), torch.ones(0), torch.tensor(0.1), torch.tensor(0.2), torch.ones(0), torch.rand(7)]
    norm = ops.sam_grad_sq_norm.default(g, w, masks, True)
    torch.testing.assert_close(norm, reference.sam_grad_sq_norm(g, w, masks, True), rtol=1e-12, atol=0)

    out = [torch.full_like(x, float("nan")) for x in w]
    storage = [o.data_ptr() for o in out]
    ops.sam_perturb_.default(out, w, g, masks, rhos, norm, True, 1e-12)
    for i, (o, r) in enumerate(zip(out, reference.sam_perturb(w, g, masks, rhos, norm, True, 1e-12))):
        assert o.shape == shapes[i] and o.data_ptr() == storage[i], f"out[{i}] was replaced"
        assert torch.equal(o, r), f"out[{i}] of shape {shapes[i]}"

    params, bufs = [x.clone() for x in w], [x.clone() for x in buf]
    ops.sgd_step_.default(params, g, bufs, masks, 0.1, 0.9, 0.0, 1e-3, True, False, False)
    ref_params, ref_bufs = reference.sgd_step(w, g, buf, masks, 0.1, 0.9, 0.0, 1e-3, True, False, False)
    for name, ours, ref in (("params", params, ref_params), ("momentum_buffers", bufs, ref_bufs)):
        for i, (a, b) in enumerate(zip(ours, ref)):
            assert a.shape == shapes[i]
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12, msg=f"{name}[{i}] of shape {shapes[i]}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_elementwise_ops_do_not_depend_on_thread_count(dtype):
    w, g, buf, masks = make_case(dtype, seed=6, shapes=SHAPES + [(70001,)])
    rhos = make_rhos(SHAPES + [(70001,)], True, torch.float64, torch.Generator().manual_seed(0))
    sq_norm = ops.sam_grad_sq_norm.default(g, w, masks, True)
    results = []
    threads = torch.get_num_threads()
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            out = [torch.empty_like(x) for x in w]
            ops.sam_perturb_.default(out, w, g, masks, rhos, sq_norm, True, 1e-12)
            w2, b2 = [x.clone() for x in w], [x.clone() for x in buf]
            ops.sgd_step_.default(w2, g, b2, masks, 0.1, 0.9, 0.0, 1e-4, True, False, False)
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
        ops.sam_grad_sq_norm.default([a], [b], [None, None], False)
    with pytest.raises(RuntimeError, match="weights has 0 entries"):
        ops.sam_grad_sq_norm.default([a], [], [None], True)
    with pytest.raises(RuntimeError, match=r"grads\[0\] must be contiguous"):
        ops.sam_grad_sq_norm.default([a.t()], [b], [None], False)
    with pytest.raises(RuntimeError, match=r"weights\[0\] has shape"):
        ops.sam_grad_sq_norm.default([a], [b.reshape(3, 4)], [None], True)
    with pytest.raises(RuntimeError, match=r"weights\[0\] is Double"):
        ops.sam_grad_sq_norm.default([a], [b.double()], [None], True)
    with pytest.raises(RuntimeError, match=r"masks\[0\] has 11 elements"):
        ops.sam_grad_sq_norm.default([a], [b], [torch.ones(11, dtype=torch.bool)], False)
    with pytest.raises(RuntimeError, match=r"masks\[0\] must be bool, uint8, int8 or floating"):
        ops.sam_grad_sq_norm.default([a], [b], [torch.ones(4, 3, dtype=torch.int32)], False)
    with pytest.raises(RuntimeError, match=r"grads\[0\] must be float32"):
        ops.sam_grad_sq_norm.default([torch.ones(3, dtype=torch.int64)], [], [None], False)

    with pytest.raises(RuntimeError, match=r"rhos\[0\] has 3 values"):
        ops.sam_perturb_.default([torch.empty_like(a)], [a], [b], [None], [torch.ones(3)], one, False, 0.0)
    with pytest.raises(RuntimeError, match="one entry per parameter"):
        ops.sam_perturb_.default([torch.empty_like(a)], [a], [b], [None], [], one, False, 0.0)
    with pytest.raises(RuntimeError, match="sq_norm must be"):
        ops.sam_perturb_.default([torch.empty_like(a)], [a], [b], [None], [one], torch.ones(2), False, 0.0)
    with pytest.raises(RuntimeError, match=r"out\[0\] and params\[0\] overlap"):
        ops.sam_perturb_.default([a], [a], [b], [None], [one], one, False, 0.0)
    with pytest.raises(RuntimeError, match=r"out\[0\] is BFloat16"):
        ops.sam_perturb_.default([torch.empty_like(a, dtype=torch.bfloat16)], [a], [b], [None], [one], one, False,
                                 0.0)

    with pytest.raises(RuntimeError, match="momentum_buffers must have one entry per parameter"):
        ops.sgd_step_.default([a], [b], [], [None], 0.1, 0.9, 0.0, 0.0, False, False, False)
    with pytest.raises(RuntimeError, match="momentum_buffers must have one entry per parameter"):
        ops.sgd_step_.default([a], [b], [torch.zeros_like(a)], [None], 0.1, 0.0, 0.0, 0.0, False, False, False)
    with pytest.raises(RuntimeError, match=r"momentum_buffers\[0\] has shape"):
        ops.sgd_step_.default([a], [b], [torch.zeros(12)], [None], 0.1, 0.9, 0.0, 0.0, False, False, False)
    with pytest.raises(RuntimeError, match=r"params\[0\] must be contiguous"):
        ops.sgd_step_.default([a.t()], [b.t()], [], [None], 0.1, 0.0, 0.0, 0.0, False, False, False)
    with pytest.raises(RuntimeError, match=r"params\[0\] and grads\[0\] overlap"):
        ops.sgd_step_.default([a], [a], [], [None], 0.1, 0.0, 0.0, 0.0, False, False, False)


def test_python_faces_handle_empty_lists_and_bad_mask_dtypes():
    from sparsesam.ops import sam_grad_sq_norm, sgd_step_
    norm = sam_grad_sq_norm([], [], [], adaptive=False)
    assert norm.dtype == torch.float64 and norm.item() == 0.0
    sgd_step_([], [], [], [], lr=0.1)  # nothing to do, no error
    p = torch.randn(3)
    with pytest.raises(TypeError, match=r"masks\[0\] must be bool, uint8, int8 or floating"):
        sam_grad_sq_norm([p], [p], [torch.ones(3, dtype=torch.int64)])
