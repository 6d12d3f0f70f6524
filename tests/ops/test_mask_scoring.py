"""The mask-scoring ops (mask_grad_sq_norm, mask_ascent_, mask_score_grad) on every backend.

The first test runs on every backend (``backends.OP_BACKENDS``: reference, CPU C++, Triton under
the interpreter, CUDA C++), each skipped with the reason where this machine lacks it; the sections
after it are the backend-specific tests.

Reference and CPU C++ kernels: Mask-perturbation scoring (sparsesam/ops/mask_scoring.py over
csrc/cpu/mask_scoring_cpu.cpp) vs sparsesam.reference, and vs the
algorithms' own definitions.

* Elementwise outputs (the C-SAM ascent, HARP's score gradients) are
  computed in float64 and rounded once, as the reference does, so they must
  match it bit for bit in every dtype.
* The reductions (the global squared norm, the per-layer rate gradients) add
  in another order than the reference: float64 within a few float64 ulps per
  term, lower precisions by the flash-attention rule (tests/tolerance.py:
  at most twice PyTorch's own error in that dtype); and the same bits for
  any thread count.
* Semantics: the ascent step has global norm rho; HARP's gradients
  equal autograd through HARP's own GetSubnet straight-through function.

None of these ops is differentiable (they post-process gradients under
no_grad), so there is no gradcheck; opcheck covers the registrations.

Triton kernels (marked triton): The Triton mask-scoring kernels (sparsesam.triton_kernels: mask_grad_sq_norm,
mask_ascent_, mask_score_grad) vs sparsesam.reference.

They run on CPU under the Triton interpreter:

    TRITON_INTERPRET=1 python -m pytest -m triton tests/ops/test_mask_scoring.py

TRITON_INTERPRET must be set before triton is imported, so these cases skip
themselves when it is not. Sizes: 1, 7, 129 (one partial block), 3x5x3x3, 0
elements, a 0-d tensor, 1030 (a full block and a tail) and 33x130 (two
chunks).

* Elementwise kernels compute in float64 and round like torch's ``.to``, so
  ascent points and score gradients must equal the reference bit for bit.
* The reductions add in another (fixed) order: float64 error bounds, and the
  same bits twice.

bfloat16 is not tested: the interpreter keeps it as raw uint16 bits and does
arithmetic on the bit patterns. float16 stands in for the 16-bit path.
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from sparsesam import reference
from sparsesam.ops import mask_ascent_, mask_grad_sq_norm, mask_score_grad, sam_grad_sq_norm

from backends import backend_op, OP_BACKENDS, tk, triton_case
from op_cases import rounded_randn
from tolerance import assert_within_torch_error


# ============================================================================
# Every backend (reference, cpu, triton, cuda) against the dense float64 math

@pytest.mark.parametrize("backend", OP_BACKENDS)
def test_every_backend_matches_the_mask_scoring_math(backend):
    """dM = G*W (or G where the weight is None): its squared norm, C-SAM's clipped ascent and HARP's
    straight-through score and rate gradients, float32 against the float64 formulas of the same inputs."""
    sq_norm_op, device = backend_op(backend, "mask_grad_sq_norm")
    ascent, _ = backend_op(backend, "mask_ascent_")
    score_grad, _ = backend_op(backend, "mask_score_grad")
    shapes = [(5, 3), (7,), (2, 3, 3, 3)]
    grads = [torch.randn(s) for s in shapes]
    weights = [torch.randn(shapes[0]), None, torch.randn(shapes[2])]
    masks = [torch.rand(s) for s in shapes]
    scores = [torch.randn(s) for s in shapes]
    on = lambda ts: [t.to(device) if t is not None else None for t in ts]  # noqa: E731

    def mask_grads(grads, weights):
        return [gi * wi if wi is not None else gi for gi, wi in zip(grads, weights)]

    dm64 = mask_grads([gi.double() for gi in grads], [wi.double() if wi is not None else None for wi in weights])
    sq64 = sum(d.square().sum() for d in dm64)
    sq = sq_norm_op(on(grads), on(weights))
    assert sq.dtype == torch.float64 and abs(sq.item() - sq64.item()) <= 1e-5 * sq64.item()

    rho, eps = 0.3, 1e-12

    def ascended(dm, masks, sq_norm):
        return [(m + rho * d / (sq_norm.to(d.dtype).sqrt() + eps)).clamp(0, 1) for d, m in zip(dm, masks)]

    sq_cpu = sq.cpu()
    truth = ascended(dm64, [m.double() for m in masks], sq_cpu)
    torch_own = ascended(mask_grads(grads, weights), masks, sq_cpu)
    out = on([torch.empty_like(m) for m in masks])
    ascent(out, on(grads), on(weights), on(masks), sq, rho, eps)
    for i, (o, own, ref) in enumerate(zip(out, torch_own, truth)):
        assert_within_torch_error(f"out[{i}]", o.cpu(), own, ref)

    score_grads, rate_grads = score_grad(on(grads), on(weights), on(scores))
    torch_own = [s.sign() * d for s, d in zip(scores, mask_grads(grads, weights))]
    for i, (o, own, d, s) in enumerate(zip(score_grads, torch_own, dm64, scores)):
        assert_within_torch_error(f"score_grads[{i}]", o.cpu(), own, s.double().sign() * d)
    assert rate_grads.dtype == torch.float64
    torch.testing.assert_close(rate_grads.cpu(), torch.stack([d.sum() for d in dm64]), rtol=1e-6, atol=1e-6)


# ============================================================================
# Reference and CPU C++ kernels

ops = torch.ops.sparsesam

DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)
# Odd sizes, empty tensors, a 0-d tensor, and tensors of several 8192-element chunks.
SHAPES = [(1,), (7,), (129,), (3, 5, 3, 3), (0,), (0, 4), (), (16, 9), (3, 8193), (20001,)]
_BITS = {2: torch.int16, 4: torch.int32, 8: torch.int64}


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(_BITS[t.element_size()])


def assert_same_bits(name, ours, ref):
    assert ours.shape == ref.shape and ours.dtype == ref.dtype, f"{name}: {ours.shape} {ours.dtype} vs {ref.shape} {ref.dtype}"
    assert torch.equal(bits(ours), bits(ref)), f"{name}: {int((bits(ours) != bits(ref)).sum())} entries differ"


def make_mask(shape, kind, dtype, gen):
    keep = torch.rand(shape, generator=gen) > 0.4
    if kind == "bool":
        return keep
    if kind in ("uint8", "int8"):
        # Any non-zero byte keeps.
        return torch.where(keep, torch.randint(1, 100, shape, generator=gen), 0).to(getattr(torch, kind))
    # A soft mask: values in (0, 1] where kept, +0.0 and -0.0 where pruned.
    soft = torch.rand(shape, generator=gen, dtype=torch.float64) * 0.9 + 0.1
    zero = torch.where(torch.rand(shape, generator=gen) > 0.5, 0.0, -0.0).double()
    return torch.where(keep, soft, zero).to(dtype)


def make_case(dtype, seed=0, shapes=SHAPES, mask_kind="bool", weights="mixed"):
    """grads, weights (every other one None when mixed), masks, scores for every shape."""
    gen = torch.Generator().manual_seed(seed)
    g = [torch.randn(s, generator=gen, dtype=torch.float64).to(dtype) for s in shapes]
    w = [torch.randn(s, generator=gen, dtype=torch.float64).to(dtype) for s in shapes]
    if weights == "none":
        w = [None] * len(shapes)
    elif weights == "mixed":
        w = [x if i % 2 == 0 else None for i, x in enumerate(w)]
    masks = [make_mask(s, mask_kind, dtype, gen) for s in shapes]
    scores = [torch.randn(s, generator=gen, dtype=torch.float64).to(dtype) for s in shapes]
    return g, w, masks, scores


def with_threads(n, fn):
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(n)
        return fn()
    finally:
        torch.set_num_threads(threads)


# ---------------------------------------------------------------------------
# mask_grad_sq_norm


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("weights", ["all", "none", "mixed"])
def test_mask_grad_sq_norm_matches_reference(dtype, weights):
    g, w, _, _ = make_case(dtype, weights=weights)
    ours = mask_grad_sq_norm(g, w)
    ref = reference.mask_grad_sq_norm(g, w)
    assert ours.dtype == torch.float64 and ours.dim() == 0
    if dtype == torch.float64:
        # Positive terms: the relative error of the sum is a few ulps per level of the sum.
        assert abs(ours.item() - ref.item()) <= 1e-13 * ref.item()
    else:
        # PyTorch's own answer, computed in the input dtype.
        torch_own = torch.stack([(x * y if y is not None else x).square().sum() for x, y in zip(g, w)]).sum()
        assert_within_torch_error("sq_norm", ours.to(dtype), torch_own, ref,
                                  reduction_size=sum(x.numel() for x in g))


def test_mask_grad_sq_norm_is_sam_grad_sq_norm_of_the_same_terms():
    # Same kernel: with every weight, ASAM's (|w| g)^2; without, plain g^2.
    g, w, _, _ = make_case(torch.float32, seed=1, weights="all")
    none = [None] * len(g)
    assert_same_bits("with weights", mask_grad_sq_norm(g, w), sam_grad_sq_norm(g, w, none, adaptive=True))
    assert_same_bits("without", mask_grad_sq_norm(g), sam_grad_sq_norm(g, [], none, adaptive=False))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
def test_mask_grad_sq_norm_bits_do_not_depend_on_thread_count(dtype):
    g, w, _, _ = make_case(dtype, seed=2, shapes=SHAPES + [(70001,), (3, 33333)])
    one = with_threads(1, lambda: mask_grad_sq_norm(g, w))
    two = with_threads(2, lambda: mask_grad_sq_norm(g, w))
    assert bits(one).item() == bits(two).item() == bits(mask_grad_sq_norm(g, w)).item()


# ---------------------------------------------------------------------------
# mask_ascent_


def soft_masks(shapes, dtype, gen, low=0.0, high=1.0):
    return [(torch.rand(s, generator=gen, dtype=torch.float64) * (high - low) + low).to(dtype) for s in shapes]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("weights", ["all", "mixed"])
@pytest.mark.parametrize("rho", [0.05, 3.0])
def test_mask_ascent_matches_reference_bitwise(dtype, weights, rho):
    g, w, _, _ = make_case(dtype, seed=3, weights=weights)
    masks = soft_masks(SHAPES, dtype, torch.Generator().manual_seed(4))
    sq_norm = mask_grad_sq_norm(g, w)
    before = [x.clone() for x in g + masks]
    out = [torch.full_like(m, float("nan")) for m in masks]
    mask_ascent_(out, g, w, masks, sq_norm, rho)
    for i, (o, r) in enumerate(zip(out, reference.mask_ascent(g, w, masks, sq_norm, rho, 1e-12))):
        assert_same_bits(f"out[{i}]", o, r)
        assert bool(((o >= 0) & (o <= 1)).all())
    for a, b in zip(g + masks, before):
        assert torch.equal(bits(a), bits(b)), "an input changed"


def test_mask_ascent_step_has_global_norm_rho():
    # Masks well inside [0, 1] and a small rho: no clipping, so the step is
    # exactly rho * dM / ||dM|| over all layers together (SAM in mask space).
    gen = torch.Generator().manual_seed(5)
    g, w, _, _ = make_case(torch.float64, seed=5, weights="mixed")
    masks = soft_masks(SHAPES, torch.float64, gen, 0.3, 0.7)
    out = [torch.empty_like(m) for m in masks]
    rho = 0.01
    mask_ascent_(out, g, w, masks, mask_grad_sq_norm(g, w), rho, 0.0)
    steps = [o - m for o, m in zip(out, masks)]
    assert math.isclose(math.sqrt(sum(s.square().sum().item() for s in steps)), rho, rel_tol=1e-9)
    dm = [x * y if y is not None else x for x, y in zip(g, w)]
    for s, d in zip(steps, dm):  # along +dM: the loss rises fastest
        assert bool((s * d >= 0).all())


def test_mask_ascent_clips_and_propagates_nan():
    g = torch.tensor([10.0, -10.0, 0.0, 1.0, float("nan")])
    m = torch.tensor([0.9, 0.1, 0.5, 0.5, 0.5])
    out = [torch.empty(5)]
    mask_ascent_(out, [g], None, [m], torch.tensor(1.0, dtype=torch.float64), 1.0, 0.0)
    assert torch.equal(out[0][:4], torch.tensor([1.0, 0.0, 0.5, 1.0]))
    assert math.isnan(out[0][4].item())
    # Whatever is at or below 0 becomes +0.0 (-0.0 too): clip and rounding commute.
    mask_ascent_(out, [torch.full((5,), -0.0)], None, [torch.full((5,), -0.0)], torch.tensor(1.0), 1.0, 0.0)
    assert torch.equal(bits(out[0]), torch.zeros(5, dtype=torch.int32))
    # rho = 0: the masks themselves.
    mask_ascent_(out, [g], None, [m], torch.tensor(1.0, dtype=torch.float64), 0.0, 0.0)
    assert torch.equal(out[0][:4], m[:4])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_outputs_do_not_depend_on_thread_count(dtype):
    shapes = SHAPES + [(70001,)]
    g, w, masks, scores = make_case(dtype, seed=10, shapes=shapes, mask_kind="soft")

    def run():
        out = [torch.empty_like(m) for m in masks]
        mask_ascent_(out, g, w, masks, mask_grad_sq_norm(g, w), 0.5)
        score_grads, rates = mask_score_grad(g, w, scores)
        return out + score_grads + [rates]

    for a, b in zip(with_threads(1, run), with_threads(2, run)):
        assert torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8))


# ---------------------------------------------------------------------------
# mask_score_grad (HARP)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("weights", ["all", "none", "mixed"])
def test_mask_score_grad_matches_reference(dtype, weights):
    g, w, _, scores = make_case(dtype, seed=11, weights=weights)
    scores[0] = torch.zeros_like(scores[0])  # sign(0) = 0
    score_grads, rates = mask_score_grad(g, w, scores)
    ref_grads, ref_rates = reference.mask_score_grad(g, w, scores)
    for i, (o, r) in enumerate(zip(score_grads, ref_grads)):
        assert_same_bits(f"score_grads[{i}]", o, r)
    assert rates.dtype == torch.float64 and rates.shape == (len(g),)
    # Sums of signed terms: the error scales with sum |dM| (float64 products of the inputs are exact).
    magnitude = torch.stack([reference._mask_grad(x, y).abs().sum() for x, y in zip(g, w)])
    assert bool(((rates - ref_rates).abs() <= 1e-13 * magnitude + 1e-300).all())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_mask_score_grad_rate_bits_do_not_depend_on_thread_count(dtype):
    g, w, _, scores = make_case(dtype, seed=12, shapes=SHAPES + [(70001,), (3, 33333)])
    one = with_threads(1, lambda: mask_score_grad(g, w, scores)[1])
    two = with_threads(2, lambda: mask_score_grad(g, w, scores)[1])
    assert torch.equal(bits(one), bits(two))


class HarpGetSubnet(torch.autograd.Function):
    """HARP's GetSubnet for unstructured pruning (intellisec/harp, models/layers.py):
    keep the top-k fraction of the scores, gradient straight through to the
    scores and ``sum(g)`` to the rate."""

    @staticmethod
    def forward(ctx, scores, k):
        out = scores.clone()
        _, idx = scores.flatten().sort()
        j = int((1 - k) * scores.numel())
        flat = out.flatten()
        flat[idx[:j]] = 0
        flat[idx[j:]] = 1
        return flat.view_as(scores)

    @staticmethod
    def backward(ctx, g):
        return g, torch.sum(g)


def test_mask_score_grad_equals_autograd_through_harps_get_subnet():
    gen = torch.Generator().manual_seed(13)
    k_min = 0.05
    layers = [(4, 6), (3, 4)]
    weights = [torch.randn(s, generator=gen, dtype=torch.float64) for s in layers]
    scores = [torch.randn(s, generator=gen, dtype=torch.float64, requires_grad=True) for s in layers]
    p = torch.tensor([0.3, -0.8], dtype=torch.float64, requires_grad=True)
    x = torch.randn(5, 6, generator=gen, dtype=torch.float64)
    effective = []
    h = x
    for i, w in enumerate(weights):
        rate = torch.sigmoid(p[i]) * (1 - k_min) + k_min  # HARP's rate_act_func
        w_eff = w * HarpGetSubnet.apply(scores[i].abs(), rate)
        w_eff.retain_grad()
        effective.append(w_eff)
        h = torch.tanh(F.linear(h, w_eff))
    (h.square().sum()).backward()

    score_grads, rates = mask_score_grad([e.grad for e in effective], weights, [s.detach() for s in scores])
    for ours, s in zip(score_grads, scores):
        torch.testing.assert_close(ours, s.grad, rtol=1e-12, atol=1e-14)
    # dL/dp through the sigmoid, from our rate gradients.
    sig = torch.sigmoid(p.detach())
    torch.testing.assert_close(rates * sig * (1 - sig) * (1 - k_min), p.grad, rtol=1e-12, atol=1e-14)


# ---------------------------------------------------------------------------
# Layouts, empties, registrations


def test_non_contiguous_inputs_give_the_same_results():
    g, w, masks, scores = make_case(torch.float32, seed=14, shapes=[(5, 7), (9, 4, 3)], mask_kind="soft",
                                    weights="all")
    t = lambda xs: [x.transpose(0, -1).contiguous().transpose(0, -1) for x in xs]
    gn, wn, mn, sn = t(g), t(w), t(masks), t(scores)
    assert not any(x.is_contiguous() for x in gn + wn + mn + sn)
    assert torch.equal(mask_grad_sq_norm(gn, wn), mask_grad_sq_norm(g, w))
    (sa, ra), (sb, rb) = mask_score_grad(gn, wn, sn), mask_score_grad(g, w, scores)
    assert torch.equal(ra, rb) and all(torch.equal(a, b) for a, b in zip(sa, sb))
    sq = mask_grad_sq_norm(g, w)
    out_n, out_c = [torch.empty_like(m) for m in masks], [torch.empty_like(m) for m in masks]
    mask_ascent_(out_n, gn, wn, mn, sq, 0.1)
    mask_ascent_(out_c, g, w, masks, sq, 0.1)
    assert all(torch.equal(a, b) for a, b in zip(out_n, out_c))


def test_empty_lists_and_empty_tensors():
    norm = mask_grad_sq_norm([], None)
    assert norm.dtype == torch.float64 and norm.item() == 0.0
    mask_ascent_([], [], None, [], torch.tensor(1.0), 0.1)
    score_grads, rates = mask_score_grad([], None, [])
    assert score_grads == [] and rates.shape == (0,) and rates.dtype == torch.float64

    e = [torch.empty(0), torch.empty(0, 3)]
    assert mask_grad_sq_norm(e, e).item() == 0.0
    out = [torch.empty_like(x) for x in e]
    mask_ascent_(out, e, e, e, torch.tensor(0.0), 0.1)
    score_grads, rates = mask_score_grad(e, e, e)
    assert rates.tolist() == [0.0, 0.0] and [s.shape for s in score_grads] == [(0,), (0, 3)]


def test_opcheck():
    gen = torch.Generator().manual_seed(15)
    g = [torch.randn(4, 3, generator=gen), torch.randn(5, generator=gen)]
    w = [torch.randn(4, 3, generator=gen), None]
    soft = [torch.rand(4, 3, generator=gen), torch.rand(5, generator=gen)]
    sq = torch.tensor(2.0, dtype=torch.float64)
    torch.library.opcheck(ops.mask_grad_sq_norm.default, (g, w))
    torch.library.opcheck(ops.mask_ascent_.default, ([torch.empty_like(m) for m in soft], g, w, soft, sq, 0.1, 1e-12))
    torch.library.opcheck(ops.mask_score_grad.default, (g, w, soft))


# ---------------------------------------------------------------------------
# Bad input: TypeError / ValueError naming the argument


def test_bad_input_is_refused_with_the_argument_named():
    a, b = torch.randn(4, 3), torch.randn(4, 3)
    m = torch.rand(4, 3) > 0.5
    soft = torch.rand(4, 3)
    sq = torch.tensor(1.0, dtype=torch.float64)
    cases = [
        (TypeError, r"grads\[0\]", lambda: mask_grad_sq_norm([torch.ones(3, dtype=torch.int64)])),
        (TypeError, "grads must be a sequence", lambda: mask_grad_sq_norm(a)),
        (ValueError, "weights has 2 entries", lambda: mask_grad_sq_norm([a], [b, b])),
        (TypeError, r"weights\[0\] dtype", lambda: mask_grad_sq_norm([a], [b.double()])),
        (ValueError, r"weights\[0\] has shape", lambda: mask_grad_sq_norm([a], [b.t()])),
        (TypeError, r"masks\[0\] must be a floating", lambda: mask_ascent_([soft.clone()], [a], [b], [m], sq, 0.1)),
        (ValueError, r"out\[0\] must be contiguous",
         lambda: mask_ascent_([torch.empty(3, 4).t()], [a], [b], [soft], sq, 0.1)),
        (TypeError, r"out\[0\] dtype", lambda: mask_ascent_([soft.double()], [a], [b], [soft], sq, 0.1)),
        (ValueError, "out has 0 entries", lambda: mask_ascent_([], [a], [b], [soft], sq, 0.1)),
        (TypeError, "sq_norm must be a floating 0-d tensor", lambda: mask_ascent_([soft.clone()], [a], [b], [soft],
                                                                               torch.ones(2), 0.1)),
        (ValueError, "rho must be a finite number", lambda: mask_ascent_([soft.clone()], [a], [b], [soft], sq, -1.0)),
        (ValueError, "rho must be a finite number",
         lambda: mask_ascent_([soft.clone()], [a], [b], [soft], sq, float("nan"))),
        (ValueError, "eps must be a finite number", lambda: mask_ascent_([soft.clone()], [a], [b], [soft], sq, 0.1,
                                                                         -1e-3)),
        (TypeError, r"scores\[0\] dtype", lambda: mask_score_grad([a], [b], [soft.double()])),
        (ValueError, r"scores\[0\] has shape", lambda: mask_score_grad([a], [b], [soft.t()])),
    ]
    for error, pattern, call in cases:
        with pytest.raises(error, match=pattern):
            call()


def test_kernel_refuses_overlapping_out():
    a, soft = torch.randn(4, 3), torch.rand(4, 3)
    sq = torch.tensor(1.0, dtype=torch.float64)
    with pytest.raises(RuntimeError, match=r"out\[0\] and masks\[0\] overlap"):
        ops.mask_ascent_.default([soft], [a], [None], [soft], sq, 0.1, 0.0)
    with pytest.raises(RuntimeError, match=r"out\[0\] and grads\[0\] overlap"):
        ops.mask_ascent_.default([a], [a], [None], [soft], sq, 0.1, 0.0)


# ============================================================================
# Triton kernels (marked triton)

DTYPES_triton = [torch.float32, torch.float64, torch.float16]
SHAPES_triton = [(1,), (7,), (129,), (3, 5, 3, 3), (0,), (), (1030,), (33, 130)]
_BITS_triton = {2: torch.int16, 4: torch.int32, 8: torch.int64}


def _bits(t):
    return t.reshape(-1).view(_BITS_triton[t.element_size()])


def _assert_all_bits(name, ours, ref):
    assert len(ours) == len(ref)
    for i, (o, r) in enumerate(zip(ours, ref)):
        assert o.shape == r.shape and o.dtype == r.dtype, f"{name}[{i}]: {o.shape} {o.dtype} vs {r.shape} {r.dtype}"
        assert torch.equal(_bits(o), _bits(r)), f"{name}[{i}]: {int((_bits(o) != _bits(r)).sum())} entries differ"


def _case(dtype, weights="mixed", shapes=SHAPES_triton):
    g = [rounded_randn(s, dtype=dtype) for s in shapes]
    w = [rounded_randn(s, dtype=dtype) for s in shapes]
    if weights == "none":
        w = [None] * len(shapes)
    elif weights == "mixed":
        w = [x if i % 2 == 0 else None for i, x in enumerate(w)]
    return g, w


# --- mask_grad_sq_norm ---------------------------------------------------------


@triton_case
@pytest.mark.parametrize("dtype", DTYPES_triton, ids=str)
@pytest.mark.parametrize("weights", ["all", "none", "mixed"])
def test_mask_grad_sq_norm(dtype, weights):
    g, w = _case(dtype, weights)
    ours = tk.mask_grad_sq_norm(g, w)
    ref = reference.mask_grad_sq_norm(g, w)
    assert ours.dtype == torch.float64 and ours.dim() == 0
    # Blocks summed in float32 (float64 for float64 inputs), partials in float64.
    rel = 1e-13 if dtype == torch.float64 else 1e-5
    assert abs(ours.item() - ref.item()) <= rel * ref.item()
    assert torch.equal(_bits(ours), _bits(tk.mask_grad_sq_norm(g, w)))


@triton_case
def test_mask_grad_sq_norm_is_the_sam_norm_kernel():
    g, w = _case(torch.float32, "all")
    assert torch.equal(_bits(tk.mask_grad_sq_norm(g, w)), _bits(tk.sam_grad_sq_norm(g, w, [None] * len(g), True)))


# --- mask_ascent_ ----------------------------------------------------------------


@triton_case
@pytest.mark.parametrize("dtype", DTYPES_triton, ids=str)
@pytest.mark.parametrize("weights", ["all", "mixed"])
def test_mask_ascent_bitwise(dtype, weights):
    g, w = _case(dtype, weights)
    masks = [torch.rand(s, dtype=torch.float64).to(dtype) for s in SHAPES_triton]
    sq = reference.mask_grad_sq_norm(g, w)
    for rho in (0.05, 3.0):
        out = [torch.full_like(m, float("nan")) for m in masks]
        tk.mask_ascent_(out, g, w, masks, sq, rho, 1e-12)
        _assert_all_bits("out", out, reference.mask_ascent(g, w, masks, sq, rho, 1e-12))


@triton_case
def test_mask_ascent_noncontiguous_out_and_nan():
    g = [rounded_randn((6, 9), dtype=torch.float32), torch.tensor([float("nan"), 1.0, -1.0])]
    masks = [torch.rand(6, 9), torch.tensor([0.5, 0.5, 0.5])]
    out = [torch.empty(9, 6).t(), torch.empty(3)]
    sq = torch.tensor(4.0, dtype=torch.float64)
    tk.mask_ascent_(out, g, [None, None], masks, sq, 0.7, 0.0)
    ref = reference.mask_ascent(g, [None, None], masks, sq, 0.7, 0.0)
    assert torch.equal(out[0], ref[0])
    assert math.isnan(out[1][0].item()) and torch.equal(out[1][1:], torch.tensor([0.85, 0.15]))


# --- mask_score_grad ---------------------------------------------------------------


@triton_case
@pytest.mark.parametrize("dtype", DTYPES_triton, ids=str)
@pytest.mark.parametrize("weights", ["all", "none", "mixed"])
def test_mask_score_grad(dtype, weights):
    g, w = _case(dtype, weights)
    scores = [rounded_randn(s, dtype=dtype) for s in SHAPES_triton]
    scores[1] = torch.zeros_like(scores[1])
    score_grads, rates = tk.mask_score_grad(g, w, scores)
    ref_grads, ref_rates = reference.mask_score_grad(g, w, scores)
    _assert_all_bits("score_grads", score_grads, ref_grads)
    assert rates.dtype == torch.float64 and rates.shape == (len(g),)
    magnitude = torch.stack([reference._mask_grad(x, y).abs().sum() for x, y in zip(g, w)])
    assert bool(((rates - ref_rates).abs() <= 1e-13 * magnitude).all())
    assert torch.equal(_bits(rates), _bits(tk.mask_score_grad(g, w, scores)[1]))


# --- empty, bad input ------------------------------------------------------------


@triton_case
def test_empty_lists_and_tensors():
    assert tk.mask_grad_sq_norm([], []).item() == 0.0
    tk.mask_ascent_([], [], [], [], torch.tensor(1.0), 0.1, 0.0)
    score_grads, rates = tk.mask_score_grad([], [], [])
    assert score_grads == [] and rates.shape == (0,)
    e = [torch.empty(0), torch.empty(3, 0)]
    assert tk.mask_grad_sq_norm(e, e).item() == 0.0
    score_grads, rates = tk.mask_score_grad(e, [None, None], e)
    assert rates.tolist() == [0.0, 0.0] and [s.shape for s in score_grads] == [(0,), (3, 0)]


@triton_case
def test_bad_input():
    a = torch.zeros(4, 3)
    with pytest.raises(ValueError, match="weights"):
        tk.mask_grad_sq_norm([a], [])
    with pytest.raises(TypeError, match=r"weights\[0\]"):
        tk.mask_grad_sq_norm([a], [a.double()])
    with pytest.raises(TypeError, match=r"out\[0\]"):
        tk.mask_ascent_([a.half()], [a], [None], [a], torch.tensor(1.0), 0.1, 0.0)
    with pytest.raises(ValueError, match="sq_norm"):
        tk.mask_ascent_([a.clone()], [a], [None], [a], torch.ones(2), 0.1, 0.0)
    with pytest.raises(ValueError, match=r"scores\[0\]"):
        tk.mask_score_grad([a], [None], [torch.zeros(3, 4)])
