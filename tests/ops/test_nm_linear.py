"""The nm_linear op on every backend.

The first test runs on every backend (``backends.OP_BACKENDS``: reference, CPU C++, Triton under
the interpreter, CUDA C++), each skipped with the reason where this machine lacks it; the sections
after it are the backend-specific tests.

Reference and CPU C++ kernels: nm_linear (N:M weights, C++ CPU kernels through the registered op) vs sparsesam.reference,
and the NMPattern format.

Sizes are chosen for the kernels' paths: batches of 1, 3, 9, 17, 64 and 129
give 1, 2, 4 and 8 vectors per batch tile and partial and several tiles;
n = 1, 2, 4 (unrolled variants) and 3, 5, 15 (the general loop); 300 groups
of 4 at batch 129 give several cache blocks and dx tasks.

Triton kernels (marked triton): The Triton nm_linear kernels (sparsesam.triton_kernels.nm_linear) vs sparsesam.reference.

They run on CPU under the Triton interpreter:

    TRITON_INTERPRET=1 python -m pytest -m triton tests/ops/test_nm_linear.py

TRITON_INTERPRET must be set before triton is imported, so these cases skip
themselves when it is not. Sizes are small (the interpreter runs one program at a
time) but odd: rows longer than one 32-entry block, batches over one and
several blocks, several N:M (n = m - 1 included), odd out_features, in or
out features 0, a batch of 0. float16 stands in for the 16-bit path (the
interpreter cannot do bfloat16 arithmetic). Tolerances follow the
flash-attention rule of tests/tolerance.py.

On a GPU (marked gpu): nm_linear on a GPU: the Triton kernels and the CUDA C++ kernels vs sparsesam.reference.

Through the public op (autograd included) with sparsesam.ops.use_backend binding
the backend, so the CUDA router is covered too. Results must be within about
twice PyTorch's own error versus float64 (tests/tolerance.py). Skipped
without a GPU; the CUDA C++ cases also without a SPARSESAM_CUDA=1 build.
"""
from __future__ import annotations

import itertools
import textwrap

import pytest
import torch
import torch.nn.functional as F

from sparsesam import reference
from sparsesam.ops import nm_linear, use_backend
from sparsesam.pruning.nm import nm_mask
from sparsesam.sparse import NMPattern
from sparsesam.sparse.nm import detect

from backends import backend_op, GPU_BACKENDS, gpu_case, OP_BACKENDS, tk, triton_case
from linear_formats import (assert_backward_within_torch_error, assert_linear_format_matches_dense,
                            assert_op_within_torch_error, assert_same_bits_at_every_thread_count,
                            assert_script_passes_on_the_baseline_isa)
from op_cases import noncontiguous, outputs_and_grads
from tolerance import assert_within_torch_error


# ============================================================================
# Every backend (reference, cpu, triton, cuda) against the dense float64 math

@pytest.mark.parametrize("backend", OP_BACKENDS)
def test_every_backend_matches_f_linear_on_the_dense_weight(backend):
    forward, device = backend_op(backend, "nm_linear")
    backward, _ = backend_op(backend, "nm_linear_backward")
    pattern = NMPattern.from_mask(nm_mask(torch.rand(17, 32), 2, 4), 2, 4)
    assert_linear_format_matches_dense(forward, backward, device, pattern, lambda p: tuple(p))


# ============================================================================
# Reference and CPU C++ kernels

ops = torch.ops.sparsesam

# (leading dims of x, out_features, n, m, groups): in_features = groups * m.
SHAPES = [
    ((1,), 1, 1, 2, 1),
    ((3,), 5, 2, 4, 3),
    ((9,), 17, 1, 4, 5),
    ((17,), 33, 3, 8, 4),
    ((64,), 7, 4, 8, 9),
    ((129,), 37, 2, 4, 300),
    ((2, 5), 6, 5, 16, 2),
    ((), 7, 1, 16, 3),
    ((33,), 11, 15, 16, 2),
    ((0,), 5, 2, 4, 3),
    ((4,), 3, 2, 4, 0),
    ((4,), 0, 2, 4, 3),
]
DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)


def _pattern(n_out, n, m, groups):
    return NMPattern.from_mask(nm_mask(torch.rand(n_out, groups * m), n, m), n, m)


def _inputs(lead, n_out, n, m, groups, dtype, bias=True):
    pattern = _pattern(n_out, n, m, groups)
    rnd = lambda *s: torch.randn(*s, dtype=torch.float64).to(dtype)  # noqa: E731
    inputs = dict(x=rnd(*lead, groups * m), values=rnd(*pattern.values_shape), bias=rnd(n_out) if bias else None)
    return pattern, inputs


def _ours(pattern):
    return lambda x, values, bias: nm_linear(x, values, pattern, bias)


def _reference(pattern):
    return lambda x, values, bias: reference.nm_linear(x, values, *pattern, bias)


def _check_against_reference(pattern, inputs):
    assert_op_within_torch_error(_ours(pattern), _reference(pattern), pattern, inputs)


# --- the op vs the reference ---------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_forward_backward_vs_reference(dtype, shape):
    pattern, inputs = _inputs(*shape, dtype)
    _check_against_reference(pattern, inputs)


@pytest.mark.parametrize("layout", ["transposed", "row_slice", "expanded"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_noncontiguous_x(layout, dtype):
    pattern, inputs = _inputs((70,), 23, 2, 4, 11, dtype)
    x = inputs["x"]
    if layout == "transposed":
        x = noncontiguous(x)
    elif layout == "row_slice":  # unit column stride, row stride > in_features
        x = torch.cat([x, torch.randn(70, 5, dtype=dtype)], dim=1)[:, :44]
    else:  # every row the same storage (stride 0)
        x = x[:1].expand(70, 44)
    assert not x.is_contiguous()
    inputs["x"] = x
    _check_against_reference(pattern, inputs)


def test_noncontiguous_values_and_bias():
    pattern, inputs = _inputs((5,), 9, 2, 4, 3, torch.float64)
    inputs["values"] = noncontiguous(inputs["values"])
    inputs["bias"] = torch.randn(18, dtype=torch.float64)[::2]
    _check_against_reference(pattern, inputs)


def test_without_bias_and_only_some_grads():
    pattern, inputs = _inputs((6,), 9, 1, 4, 3, torch.float64, bias=False)
    values = inputs["values"].requires_grad_()
    y = nm_linear(inputs["x"], values, pattern)
    (dvalues,) = torch.autograd.grad(y.sum(), [values])
    expected = pattern.gather(torch.ones(6, 9, dtype=torch.float64).t() @ inputs["x"])
    torch.testing.assert_close(dvalues, expected)
    x = inputs["x"].requires_grad_()
    (dx,) = torch.autograd.grad(nm_linear(x, inputs["values"], pattern).sum(), [x])
    torch.testing.assert_close(dx, torch.ones(6, 9, dtype=torch.float64) @ pattern.scatter(inputs["values"]))


def test_zero_values_give_bias_and_zero_dx():
    pattern, inputs = _inputs((3,), 4, 2, 4, 2, torch.float32)
    inputs["values"] = torch.zeros(pattern.values_shape)
    out, grads = outputs_and_grads(_ours(pattern), inputs)
    torch.testing.assert_close(out, inputs["bias"].expand(3, 4))
    assert torch.count_nonzero(grads["x"]) == 0 and torch.count_nonzero(grads["values"]) > 0


def test_matches_f_linear_on_the_masked_weight():
    w = torch.randn(13, 24, dtype=torch.float64)
    x = torch.randn(40, 24, dtype=torch.float64)
    pattern = NMPattern.from_mask(nm_mask(w.abs(), 2, 4))
    torch.testing.assert_close(nm_linear(x, pattern.gather(w), pattern), F.linear(x, w * pattern.mask()))


def test_result_does_not_depend_on_thread_count():
    pattern, inputs = _inputs((129,), 77, 2, 4, 75, torch.float32)
    grad = torch.randn(129, 77)
    args = (inputs["values"], pattern.indices, pattern.n, pattern.m)
    assert_same_bits_at_every_thread_count(lambda: (
        ops.nm_linear(inputs["x"], *args, inputs["bias"]),
        *ops.nm_linear_backward(grad, inputs["x"], *args, [True, True]),
    ))


@pytest.mark.parametrize("nm", [(2, 4), (1, 8), (3, 8)], ids=str)
def test_gradcheck(nm):
    pattern, inputs = _inputs((4,), 6, *nm, 2, torch.float64)
    args = (inputs["x"].requires_grad_(), inputs["values"].requires_grad_(), inputs["bias"].requires_grad_())
    assert torch.autograd.gradcheck(lambda x, v, b: nm_linear(x, v, pattern, b), args)


def test_opcheck():
    for shape in [((3,), 5, 2, 4, 2), ((2, 3), 7, 1, 8, 1), ((0,), 3, 2, 4, 1), ((5,), 4, 3, 16, 2)]:
        pattern, inputs = _inputs(*shape, torch.float32)
        args = (inputs["x"].requires_grad_(), inputs["values"].requires_grad_(), *pattern, inputs["bias"])
        torch.library.opcheck(ops.nm_linear.default, args)
        grad_out = torch.randn(*shape[0], shape[1])
        for output_mask in ([True, True], [True, False], [False, True]):
            torch.library.opcheck(
                ops.nm_linear_backward.default,
                (grad_out, inputs["x"].detach(), inputs["values"].detach(), *pattern, output_mask),
            )


def test_autocast_bfloat16_matches_reference_under_autocast():
    pattern, inputs = _inputs((8,), 12, 2, 4, 4, torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ours = nm_linear(inputs["x"], inputs["values"], pattern, inputs["bias"])
    theirs = reference.nm_linear(*(t.to(torch.bfloat16) for t in (inputs["x"], inputs["values"])), *pattern,
                                 inputs["bias"].to(torch.bfloat16))
    assert ours.dtype == torch.bfloat16
    torch.testing.assert_close(ours, theirs)


def test_baseline_isa_kernels_match_reference():
    """The kernels compiled for the baseline ISA (CPUs without AVX2), chosen
    with ATEN_CPU_CAPABILITY=default, in a fresh process: every tile width,
    every n variant, several tiles and cache blocks."""
    script = textwrap.dedent("""
        import torch
        from sparsesam import reference
        from sparsesam.pruning.nm import nm_mask
        from sparsesam.sparse import NMPattern
        assert torch.backends.cpu.get_cpu_capability() == "DEFAULT"
        torch.manual_seed(0)
        for dtype in (torch.float32, torch.float64):
            for batch, n_out, n, m, groups in ((1, 3, 1, 4, 2), (5, 7, 2, 4, 3), (9, 5, 4, 8, 2), (17, 9, 3, 8, 3),
                                               (100, 21, 2, 4, 600)):
                p = NMPattern.from_mask(nm_mask(torch.rand(n_out, groups * m), n, m), n, m)
                x = torch.randn(batch, groups * m, dtype=torch.float64)
                g = torch.randn(batch, n_out, dtype=torch.float64)
                v, b = torch.randn(*p.values_shape, dtype=torch.float64), torch.randn(n_out, dtype=torch.float64)
                y = torch.ops.sparsesam.nm_linear(x.to(dtype), v.to(dtype), *p, b.to(dtype))
                dx, dv = torch.ops.sparsesam.nm_linear_backward(g.to(dtype), x.to(dtype), v.to(dtype), *p,
                                                                [True, True])
                ry = reference.nm_linear(x, v, *p, b)
                rdx, rdv = reference.nm_linear_backward(g, x, v, *p, [True, True])
                tol = 1e-12 if dtype == torch.float64 else 1e-4
                for ours, ref in ((y, ry), (dx, rdx), (dv, rdv)):
                    scale = max(1.0, ref.abs().max().item())
                    assert (ours.double() - ref).abs().max().item() <= tol * scale, (dtype, batch, n, m)
        print("ok")
    """)
    assert_script_passes_on_the_baseline_isa(script)


# --- bad input -----------------------------------------------------------------


def _good_args():
    pattern = _pattern(4, 2, 4, 2)
    return dict(x=torch.randn(3, 8), values=torch.randn(4, 4), pattern=pattern, bias=torch.randn(4))


@pytest.mark.parametrize(
    "change, error, words",
    [
        (lambda a: dict(values=torch.randn(4, 5)), ValueError, "values has shape"),
        (lambda a: dict(values=torch.randn(16)), ValueError, "values must have 2 dimensions"),
        (lambda a: dict(values=torch.ones(4, 4, dtype=torch.int32)), TypeError, "values must be a floating"),
        (lambda a: dict(x=torch.randn(3, 9)), ValueError, "x has shape"),
        (lambda a: dict(x=torch.randn(3, 8, dtype=torch.float64)), TypeError, "x dtype"),
        (lambda a: dict(x=torch.ones(3, 8, dtype=torch.int64)), TypeError, "x must be a floating"),
        (lambda a: dict(bias=torch.randn(3)), ValueError, "bias has 3 entries"),
        (lambda a: dict(bias=torch.randn(4, dtype=torch.float64)), TypeError, "bias dtype"),
        (lambda a: dict(pattern=a["pattern"].mask()), TypeError, "pattern must be a sparsesam.sparse.NMPattern"),
        (lambda a: dict(values=torch.randn(4, 4, device="meta")), ValueError, "values is on meta"),
    ],
)
def test_bad_input_names_the_argument(change, error, words):
    args = _good_args()
    args.update(change(args))
    with pytest.raises(error, match=words):
        nm_linear(**args)


@pytest.mark.parametrize("value", [4, 255])
def test_index_out_of_its_group_is_refused_by_the_kernel(value):
    """The C++ op checks every index byte before reading through it (a ValueError, never a crash)."""
    pattern = _pattern(4, 2, 4, 3)
    bad = pattern.indices.clone()
    bad[2, 3] = value
    x, values = torch.randn(3, 12), torch.randn(*pattern.values_shape)
    with pytest.raises(ValueError, match=r"indices must lie in \[0, m=4\)"):
        ops.nm_linear(x, values, bad, 2, 4, None)
    for mask in ([True, False], [False, True]):
        with pytest.raises(ValueError, match=r"indices must lie in \[0, m=4\)"):
            ops.nm_linear_backward(torch.ones(3, 4), x, values, bad, 2, 4, mask)


def test_kernel_refuses_bad_index_dtype_and_nm():
    pattern = _pattern(4, 2, 4, 3)
    x, values = torch.randn(3, 12), torch.randn(*pattern.values_shape)
    with pytest.raises(TypeError, match="indices must be uint8"):
        ops.nm_linear(x, values, pattern.indices.int(), 2, 4, None)
    with pytest.raises(ValueError, match="1 <= n < m <= 16"):
        ops.nm_linear(x, values, pattern.indices, 2, 32, None)
    with pytest.raises(ValueError, match="1 <= n < m <= 16"):
        ops.nm_linear(x, values, pattern.indices, 4, 4, None)
    with pytest.raises(ValueError, match="not a multiple of n=4"):
        ops.nm_linear(x, values, pattern.indices, 4, 8, None)


# --- NMPattern ------------------------------------------------------------------


@pytest.mark.parametrize("nm", [(1, 2), (2, 4), (1, 4), (3, 8), (5, 16), (15, 16)], ids=str)
def test_pattern_of_a_mask(nm):
    n, m = nm
    mask = nm_mask(torch.rand(9, 4 * m), n, m)
    p = NMPattern.from_mask(mask, n, m)
    assert p.indices.dtype == torch.uint8 and p.indices.is_contiguous()
    assert p.shape == (9, 4 * m) and p.values_shape == (9, 4 * n) and p.nnz == int(mask.sum())
    assert torch.equal(p.mask(), mask)
    idx = p.indices.long().view(9, 4, n)
    assert bool((idx < m).all()) and (n == 1 or bool((idx[..., 1:] > idx[..., :-1]).all()))
    w = torch.randn(9, 4 * m)
    values = p.gather(w)
    assert values.is_contiguous()
    assert torch.equal(p.scatter(values), w * mask)
    # Values are the kept weights in row-major order.
    assert torch.equal(values.flatten(), w[mask])


def test_pattern_storage_is_n_over_m_values_plus_a_byte_per_entry():
    p = NMPattern.from_mask(nm_mask(torch.rand(256, 512), 2, 4), 2, 4)
    assert p.nbytes() == p.nnz == 256 * 512 // 2
    assert p.density == 0.5


def test_pattern_detection_rule():
    rand = lambda n, m, cols=48: nm_mask(torch.rand(6, cols), n, m)  # noqa: E731
    assert detect(rand(1, 2)) == (2, 4)            # every 1:2 mask is 2:4
    assert detect(rand(1, 4)) == (1, 4)            # and 1:4 is also 2:8, 4:16: the smallest M wins
    assert detect(rand(1, 2, cols=6)) == (1, 2)    # 6 inputs: only M = 2 fits
    mask = rand(2, 8)
    mask[0, :8] = torch.tensor([1, 1, 0, 0, 0, 0, 0, 0], dtype=torch.bool)  # 2:0 in groups of 4
    assert detect(mask) == (2, 8)
    assert "not N:M" in detect(torch.rand(6, 48) < 0.3)
    assert "not N:M" in detect(torch.ones(6, 48, dtype=torch.bool))  # dense: N = M
    assert "empty" in detect(torch.ones(0, 48, dtype=torch.bool))
    p = NMPattern.from_mask(rand(3, 8))
    assert (p.n, p.m) == (3, 8)


def test_a_2_8_mask_is_detected_as_1_4_exactly_when_every_group_of_4_keeps_one():
    split = torch.zeros(6, 48, dtype=torch.bool)
    split[:, 0::8] = split[:, 5::8] = True         # one kept weight in each half of every 8
    assert detect(split) == (1, 4)
    together = torch.zeros(6, 48, dtype=torch.bool)
    together[:, 1::8] = together[:, 2::8] = True   # both in the first half: groups of 4 keep 2 and 0
    assert detect(together) == (2, 8)
    # A random 2:8 mask is split in all 36 groups with probability (4/7)^36 ~ 2e-9; this seed's is not.
    torch.manual_seed(0)
    assert detect(nm_mask(torch.rand(6, 48), 2, 8)) == (2, 8)


def test_pattern_bad_masks():
    with pytest.raises(ValueError, match=r"mask is not 2:4: its groups of 4 inputs keep between"):
        NMPattern.from_mask(torch.rand(4, 8) < 0.5, 2, 4)
    with pytest.raises(ValueError, match="not a multiple of m=4"):
        NMPattern.from_mask(torch.ones(4, 6), 2, 4)
    with pytest.raises(ValueError, match="not N:M for any supported M"):
        NMPattern.from_mask(torch.rand(5, 16) < 0.5)
    with pytest.raises(ValueError, match="mask must have 2 dimensions"):
        NMPattern.from_mask(torch.ones(3, dtype=torch.bool), 1, 2)
    with pytest.raises(ValueError, match="mask contains NaN"):
        NMPattern.from_mask(torch.full((2, 4), float("nan")), 2, 4)
    with pytest.raises(TypeError, match="mask must be a torch.Tensor"):
        NMPattern.from_mask([[1, 0]], 1, 2)
    with pytest.raises(ValueError, match="n must be in"):
        NMPattern.from_mask(torch.ones(2, 4), 4, 4)
    with pytest.raises(ValueError, match="m must be in"):
        NMPattern.from_mask(torch.ones(2, 32), 1, 32)
    with pytest.raises(ValueError, match="give both n and m"):
        NMPattern.from_mask(torch.ones(2, 4), 2)


def test_pattern_from_indices_checks():
    p = _pattern(5, 2, 4, 3)
    q = NMPattern.from_indices(p.indices.clone(), 2, 4)
    assert torch.equal(q.indices, p.indices) and (q.n, q.m) == (2, 4)
    bad = p.indices.clone()
    bad[0, 0], bad[0, 1] = 2, 1
    with pytest.raises(ValueError, match="strictly increasing"):
        NMPattern.from_indices(bad, 2, 4)
    bad[0, 0], bad[0, 1] = 1, 4
    with pytest.raises(ValueError, match=r"lie in \[0, m=4\)"):
        NMPattern.from_indices(bad, 2, 4)
    with pytest.raises(TypeError, match="2-D uint8"):
        NMPattern.from_indices(p.indices.int(), 2, 4)
    with pytest.raises(ValueError, match="not a multiple of n=4"):
        NMPattern.from_indices(p.indices, 4, 8)


def test_pattern_gather_scatter_checks():
    p = _pattern(3, 1, 4, 2)
    with pytest.raises(ValueError, match="weight has shape"):
        p.gather(torch.randn(3, 7))
    with pytest.raises(ValueError, match="values has shape"):
        p.scatter(torch.randn(6))


# ============================================================================
# Triton kernels (marked triton)

DTYPES_triton = [torch.float32, torch.float64, torch.float16]
# (leading dims of x, out_features, n, m, groups)
SHAPES_triton = [((1,), 1, 1, 2, 1), ((7,), 5, 2, 4, 20), ((2, 3), 17, 3, 8, 2), ((70,), 6, 1, 16, 2),
          ((5,), 3, 15, 16, 1), ((0,), 5, 2, 4, 3), ((4,), 3, 2, 4, 0), ((4,), 0, 1, 4, 2)]


def _case(lead, n_out, n, m, groups, dtype):
    pattern = NMPattern.from_mask(nm_mask(torch.rand(n_out, groups * m), n, m), n, m)
    rnd = lambda *s: torch.randn(*s, dtype=torch.float64).to(dtype)  # noqa: E731
    return pattern, rnd(*lead, groups * m), rnd(*pattern.values_shape), rnd(n_out), rnd(*lead, n_out)


@triton_case
@pytest.mark.parametrize("layout", ["contig", "noncontig"])
@pytest.mark.parametrize("dtype", DTYPES_triton, ids=str)
@pytest.mark.parametrize("shape", SHAPES_triton, ids=str)
def test_forward_matches_reference(shape, dtype, layout):
    pattern, x, values, bias, _ = _case(*shape, dtype)
    if layout == "noncontig":
        x = noncontiguous(x)
    for b in (bias, None):
        ours = tk.nm_linear(x, values, *pattern, b)
        torch_own = reference.nm_linear(x, values, *pattern, b)
        ref = reference.nm_linear(x.double(), values.double(), *pattern, b.double() if b is not None else None)
        assert_within_torch_error("y", ours, torch_own, ref, reduction_size=pattern.in_features)


@triton_case
@pytest.mark.parametrize("output_mask", list(itertools.product([True, False], repeat=2)), ids=str)
@pytest.mark.parametrize("dtype", DTYPES_triton, ids=str)
@pytest.mark.parametrize("shape", SHAPES_triton, ids=str)
def test_backward_matches_reference(shape, dtype, output_mask):
    pattern, x, values, _, grad = _case(*shape, dtype)
    grad = noncontiguous(grad)
    # What autograd did not save arrives as a zero-stride placeholder, never read.
    x_arg = x if output_mask[1] else torch.zeros((), dtype=dtype).expand(x.shape)
    v_arg = values if output_mask[0] else torch.zeros((), dtype=dtype).expand(values.shape)
    ours = tk.nm_linear_backward(grad, x_arg, v_arg, *pattern, output_mask)
    torch_own = reference.nm_linear_backward(grad, x, values, *pattern, output_mask)
    ref = reference.nm_linear_backward(grad.double(), x.double(), values.double(), *pattern, output_mask)
    assert_backward_within_torch_error(ours, torch_own, ref, output_mask, pattern, grad)


# ============================================================================
# On a GPU (marked gpu)

DTYPES_gpu = [torch.float32, torch.float64, torch.bfloat16]
# (leading dims of x, out_features, n, m, groups): odd sizes, a batch over
# several 256-row blocks, a batch of 0, 3-D x, several N:M.
SHAPES_gpu = [((1,), 1, 1, 2, 1), ((7,), 5, 2, 4, 18), ((300,), 65, 1, 8, 16), ((0,), 7, 2, 4, 2),
          ((2, 3), 17, 3, 8, 2), ((256,), 512, 2, 4, 256), ((33,), 9, 15, 16, 3)]


@gpu_case
@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES_gpu, ids=str)
@pytest.mark.parametrize("shape", SHAPES_gpu, ids=str)
def test_forward_backward_vs_reference_gpu(backend, dtype, shape):
    with use_backend(backend):
        lead, n_out, n, m, groups = shape
        pattern = NMPattern.from_mask(nm_mask(torch.rand(n_out, groups * m), n, m), n, m).to("cuda")
        rnd = lambda *s: torch.randn(*s, dtype=torch.float64, device="cuda").to(dtype)  # noqa: E731
        inputs = dict(x=rnd(*lead, groups * m), values=rnd(*pattern.values_shape), bias=rnd(n_out))
        _check_against_reference(pattern, inputs)
