"""The Triton fused SAM step (sparsesam.triton_kernels: sam_grad_sq_norm,
sam_perturb_, sgd_step_) vs sparsesam.reference.

They run on CPU under the Triton interpreter:

    TRITON_INTERPRET=1 python -m pytest -m triton tests/test_triton_sam_step.py

TRITON_INTERPRET must be set before triton is imported, so the module skips
itself when it is not.

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
from sparsesam.triton_kernels import sam_grad_sq_norm, sam_perturb_, sgd_step_  # noqa: E402
from sparsesam.triton_kernels import multi_tensor  # noqa: E402
from sparsesam.triton_kernels import sam_step as kernels  # noqa: E402

DTYPES = [torch.float32, torch.float64, torch.float16]
SHAPES = [(1,), (7,), (129,), (3, 5, 3, 3), (0,), (1030,), (33, 130)]
SMALL_SHAPES = SHAPES[:5]
MASK_KINDS = ["none", "bool", "float", "mixed"]
_BITS = {torch.float16: torch.int16, torch.float32: torch.int32, torch.float64: torch.int64, torch.bool: torch.bool}


def _randn(shape, dtype):
    # Drawn in float64 and rounded once, so every dtype sees the same values.
    return torch.randn(shape, dtype=torch.float64).to(dtype)


def _mask(shape, kind, dtype):
    if kind == "none":
        return None
    if kind == "bool":
        return torch.rand(shape) > 0.4
    # A soft mask with exact zeros: zero prunes, any other value keeps.
    soft = torch.rand(shape, dtype=torch.float64)
    return torch.where(soft < 0.4, torch.zeros_like(soft), soft).to(dtype)


def _masks(kind, dtype, shapes=SHAPES):
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


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("adaptive", [False, True], ids=["sam", "asam"])
@pytest.mark.parametrize("mask_kind", MASK_KINDS)
def test_sq_norm_matches_reference(dtype, adaptive, mask_kind):
    grads = [_randn(s, dtype) for s in SHAPES]
    weights = [_randn(s, dtype) for s in SHAPES]
    masks = _masks(mask_kind, dtype)
    ours = sam_grad_sq_norm(grads, weights, masks, adaptive)
    ref = reference.sam_grad_sq_norm(grads, weights, masks, adaptive)
    assert ours.dtype == torch.float64 and ours.shape == () and ours.device == grads[0].device
    torch.testing.assert_close(ours, ref, rtol=_norm_rtol(dtype), atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_sq_norm_is_deterministic(dtype):
    shapes = [(5000,), (7,), (64, 129), (3, 5, 3, 3)]
    grads = [_randn(s, dtype) * 1e3 ** i for i, s in enumerate(shapes)]  # wide range: order matters
    weights = [_randn(s, dtype) for s in shapes]
    masks = _masks("mixed", dtype, shapes)
    for adaptive in (False, True):
        first = sam_grad_sq_norm(grads, weights, masks, adaptive)
        second = sam_grad_sq_norm([g.clone() for g in grads], weights, masks, adaptive)
        _assert_bits("norm", first, second)


@pytest.mark.parametrize("adaptive", [False, True], ids=["sam", "asam"])
def test_sq_norm_ignores_pruned_entries(adaptive):
    masks = _masks("mixed", torch.float32)
    grads = [_randn(s, torch.float32) for s in SHAPES]
    weights = [_randn(s, torch.float32) for s in SHAPES]
    clean = sam_grad_sq_norm(grads, weights, masks, adaptive)
    # inf/nan gradients and weights where pruned must add exactly nothing.
    poisoned = [g.masked_fill(_pruned(m, g), float("inf")) for g, m in zip(grads, masks)]
    bad_w = [w.masked_fill(_pruned(m, w), float("nan")) for w, m in zip(weights, masks)]
    _assert_bits("norm", sam_grad_sq_norm(poisoned, bad_w, masks, adaptive), clean)


def test_sq_norm_empty():
    zero = torch.zeros((), dtype=torch.float64)
    _assert_bits("no tensors", sam_grad_sq_norm([], [], [], False), zero)
    empties = [torch.empty(0), torch.empty(2, 0)]
    _assert_bits("empty tensors", sam_grad_sq_norm(empties, empties, [None, None], True), zero)


def test_sq_norm_reads_weights_only_when_adaptive():
    grads = [_randn((7,), torch.float32), _randn((129,), torch.float32)]
    weights = [_randn((7,), torch.float32), _randn((129,), torch.float32)]
    masks = [None, torch.rand(129) > 0.5]
    with_weights = sam_grad_sq_norm(grads, weights, masks, False)
    _assert_bits("no weights", sam_grad_sq_norm(grads, [], masks, False), with_weights)


# --- sam_perturb_ ----------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
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
    params = _poison_pruned([_randn(s, dtype) for s in SHAPES], masks)
    grads = _poison_pruned([_randn(s, dtype) for s in SHAPES], masks)
    rhos = _rhos(rho_kind, params)
    sq_norm = reference.sam_grad_sq_norm(grads, params, masks, adaptive)
    # Buffers full of garbage: every entry must be written.
    out = [torch.full_like(p, 123.0) for p in params]
    before = [p.clone() for p in params]
    assert sam_perturb_(out, params, grads, masks, rhos, sq_norm, adaptive, 1e-12) is None
    ref = reference.sam_perturb(params, grads, masks, rhos, sq_norm, adaptive, 1e-12)
    _assert_all_bits("out", out, ref)
    _assert_all_bits("params (read only)", params, before)
    for o, p, m in zip(out, params, masks):
        _assert_bits("pruned entries of out", o[_pruned(m, p)], p[_pruned(m, p)])


@pytest.mark.parametrize("norm_dtype", [torch.float32, torch.float64], ids=str)
def test_perturb_sq_norm_and_eps(norm_dtype):
    """sq_norm of another dtype, a zero norm (eps alone), a large eps."""
    params = [_randn(s, torch.float32) for s in SHAPES]
    grads = [_randn(s, torch.float32) for s in SHAPES]
    masks = _masks("bool", torch.float32)
    rhos = _rhos("scalar", params)
    for sq_norm, eps in [(torch.tensor(2.5, dtype=norm_dtype), 1e-12), (torch.tensor(0.0, dtype=norm_dtype), 1e-3),
                         (torch.tensor(7.0, dtype=norm_dtype), 0.5)]:
        out = [torch.empty_like(p) for p in params]
        sam_perturb_(out, params, grads, masks, rhos, sq_norm, True, eps)
        _assert_all_bits("out", out, reference.sam_perturb(params, grads, masks, rhos, sq_norm, True, eps))


def test_perturb_noncontiguous_out_and_inputs():
    shapes = [(6, 9), (4, 5, 3)]
    params = [_randn(s, torch.float64).transpose(0, -1) for s in shapes]
    grads = [_randn(s, torch.float64).transpose(0, -1) for s in shapes]
    masks = [(torch.rand(s) > 0.5).transpose(0, -1) for s in shapes]
    rhos = [torch.rand(p.shape[0]) for p in params]
    out = [torch.zeros(s, dtype=torch.float64).transpose(0, -1) for s in shapes]
    sq_norm = torch.tensor(3.0, dtype=torch.float64)
    sam_perturb_(out, params, grads, masks, rhos, sq_norm, True, 1e-12)
    _assert_all_bits("out", out, reference.sam_perturb(params, grads, masks, rhos, sq_norm, True, 1e-12))


# Empty tensors own no chunk: two in a row, first and between others, must not shift the chunks
# of the tensors after them; 9000 elements take two chunks.
EMPTY_MIX = [(0,), (0, 3), (9000,), (0,), (0, 4), (7, 3)]


def _empty_mix(dtype):
    params = [_randn(s, dtype) for s in EMPTY_MIX]
    grads = [_randn(s, dtype) for s in EMPTY_MIX]
    masks = [None, None, torch.rand(9000) > 0.5, None, torch.zeros(0, 4, dtype=torch.bool), None]
    return params, grads, masks


def test_perturb_empty():
    assert sam_perturb_([], [], [], [], [], torch.tensor(1.0), False, 1e-12) is None
    params, grads, masks = _empty_mix(torch.float32)
    rhos = [torch.tensor(0.05), torch.empty(0), torch.tensor(0.1), torch.tensor(0.2), torch.empty(0), torch.rand(7)]
    sq_norm = torch.tensor(3.0, dtype=torch.float64)
    out = [torch.full_like(p, float("nan")) for p in params]
    storage = [o.data_ptr() for o in out]
    assert sam_perturb_(out, params, grads, masks, rhos, sq_norm, True, 1e-12) is None
    assert [tuple(o.shape) for o in out] == EMPTY_MIX and [o.data_ptr() for o in out] == storage
    _assert_all_bits("out", out, reference.sam_perturb(params, grads, masks, rhos, sq_norm, True, 1e-12))


# --- sgd_step_ -------------------------------------------------------------

SGD_OPTIONS = list(itertools.product(
    [0.0, 0.9],  # momentum
    [0.0, 0.25],  # dampening
    [0.0, 1e-2],  # weight_decay
    [False, True],  # nesterov
    [False, True],  # maximize
    [False, True],  # first_step
))


def _sgd_case(dtype, mask_kind, momentum, shapes=SHAPES):
    masks = _masks(mask_kind, dtype, shapes)
    params = _poison_pruned([_randn(s, dtype) for s in shapes], masks)
    grads = [_randn(s, dtype) for s in shapes]
    buffers = _poison_pruned([_randn(s, dtype) for s in shapes], masks) if momentum else []
    return params, grads, buffers, masks


def _run_sgd(params, grads, buffers, masks, *options):
    ours_p, ours_b = [p.clone() for p in params], [b.clone() for b in buffers]
    assert sgd_step_(ours_p, grads, ours_b, masks, 0.1, *options) is None
    ref_p, ref_b = reference.sgd_step(params, grads, buffers, masks, 0.1, *options)
    return ours_p, ours_b, ref_p, ref_b


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(
    "momentum,dampening,weight_decay,nesterov,maximize,first_step", SGD_OPTIONS,
    ids=lambda v: str(v),
)
def test_sgd_step_matches_reference(dtype, momentum, dampening, weight_decay, nesterov, maximize, first_step):
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


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("mask_kind", MASK_KINDS)
def test_sgd_step_mask_kinds(dtype, mask_kind):
    options = (0.9, 0.0, 1e-2, True, False, False)
    params, grads, buffers, masks = _sgd_case(dtype, mask_kind, 0.9)
    ours_p, ours_b, ref_p, ref_b = _run_sgd(params, grads, buffers, masks, *options)
    _assert_all_bits("params", ours_p, ref_p)
    _assert_all_bits("momentum_buffers", ours_b, ref_b)


def test_sgd_step_several_steps():
    """A first step, then later ones, with the buffers carried over."""
    params, grads, buffers, masks = _sgd_case(torch.float32, "mixed", 0.9)
    ours_p, ours_b = [p.clone() for p in params], [b.clone() for b in buffers]
    ref_p, ref_b = params, buffers
    for step in range(3):
        g = [_randn(p.shape, torch.float32) for p in params]
        sgd_step_(ours_p, g, ours_b, masks, 0.05, 0.9, 0.0, 5e-4, False, False, step == 0)
        ref_p, ref_b = reference.sgd_step(ref_p, g, ref_b, masks, 0.05, 0.9, 0.0, 5e-4, False, False, step == 0)
    _assert_all_bits("params", ours_p, ref_p)
    _assert_all_bits("momentum_buffers", ours_b, ref_b)


def test_sgd_step_noncontiguous_params_and_buffers():
    shapes = [(6, 9), (4, 5, 3)]
    params = [_randn(s, torch.float32).transpose(0, -1) for s in shapes]
    grads = [_randn(s, torch.float32).transpose(0, -1) for s in shapes]
    buffers = [_randn(s, torch.float32).transpose(0, -1) for s in shapes]
    masks = [(torch.rand(s) > 0.5).transpose(0, -1) for s in shapes]
    options = (0.9, 0.1, 1e-2, False, True, False)
    ours_p, ours_b, ref_p, ref_b = _run_sgd(params, grads, buffers, masks, *options)
    _assert_all_bits("params", ours_p, ref_p)
    _assert_all_bits("momentum_buffers", ours_b, ref_b)


def test_sgd_step_empty():
    assert sgd_step_([], [], [], [], 0.1, 0.9, 0.0, 0.0, False, False, True) is None
    params, grads, masks = _empty_mix(torch.float32)
    buffers = [_randn(s, torch.float32) for s in EMPTY_MIX]
    ours_p, ours_b, ref_p, ref_b = _run_sgd(params, grads, buffers, masks, 0.9, 0.0, 1e-3, True, False, False)
    assert [tuple(p.shape) for p in ours_p] == [tuple(b.shape) for b in ours_b] == EMPTY_MIX
    _assert_all_bits("params", ours_p, ref_p)
    _assert_all_bits("momentum_buffers", ours_b, ref_b)


# --- launches, bad input ---------------------------------------------------


def test_one_launch_for_masked_and_dense_tensors(monkeypatch):
    """Masked weights and dense biases of one dtype go in one launch; empty tensors in none."""
    norm = _CountLaunches(multi_tensor._sq_norm_partials_kernel)
    perturb = _CountLaunches(kernels._sam_perturb_kernel)
    sgd = _CountLaunches(kernels._sgd_step_kernel)
    # The norm kernel is launched from the shared multi-tensor module.
    monkeypatch.setattr(multi_tensor, "_sq_norm_partials_kernel", norm)
    monkeypatch.setattr(kernels, "_sam_perturb_kernel", perturb)
    monkeypatch.setattr(kernels, "_sgd_step_kernel", sgd)
    shapes = [(7,), (3, 5, 3, 3), (0,), (129,)]
    params, grads, buffers, masks = _sgd_case(torch.float32, "none", 0.9, shapes)
    masks = [None, torch.rand(shapes[1]) > 0.5, None, torch.rand(shapes[3]) > 0.5]
    sq = sam_grad_sq_norm(grads, params, masks, True)
    out = [torch.empty_like(p) for p in params]
    sam_perturb_(out, params, grads, masks, _rhos("per_channel", params), sq, True, 1e-12)
    sgd_step_(params, grads, buffers, masks, 0.1, 0.9, 0.0, 0.0, False, False, False)
    assert (norm.launches, perturb.launches, sgd.launches) == (1, 1, 1)
    empties = [torch.empty(0), torch.empty(3, 0)]
    sam_grad_sq_norm(empties, empties, [None, None], False)
    sgd_step_(empties, empties, [], [None, None], 0.1, 0.0, 0.0, 0.0, False, False, False)
    assert (norm.launches, sgd.launches) == (1, 1)


def test_bad_input():
    w = [torch.zeros(4, 3)]
    with pytest.raises(ValueError, match="masks"):
        sam_grad_sq_norm(w, w, [], False)
    with pytest.raises(ValueError, match=r"grads\[0\]"):
        sgd_step_(w, [torch.zeros(3, 4)], [], [None], 0.1, 0.0, 0.0, 0.0, False, False, False)
    with pytest.raises(TypeError, match=r"grads\[0\]"):
        sgd_step_(w, [torch.zeros(4, 3, dtype=torch.float64)], [], [None], 0.1, 0.0, 0.0, 0.0, False, False, False)
    with pytest.raises(ValueError, match="momentum_buffers"):
        sgd_step_(w, w, [], [None], 0.1, 0.9, 0.0, 0.0, False, False, False)
    with pytest.raises(ValueError, match=r"masks\[0\]"):
        sam_grad_sq_norm(w, w, [torch.ones(3, dtype=torch.bool)], False)
    with pytest.raises(TypeError, match=r"masks\[0\]"):
        sam_grad_sq_norm(w, w, [torch.ones(4, 3, dtype=torch.int32)], False)
    with pytest.raises(ValueError, match=r"rhos\[0\]"):
        sam_perturb_([torch.empty(4, 3)], w, w, [None], [torch.ones(3)], torch.tensor(1.0), False, 1e-12)
    with pytest.raises(ValueError, match="sq_norm"):
        sam_perturb_([torch.empty(4, 3)], w, w, [None], [torch.tensor(1.0)], torch.ones(2), False, 1e-12)
