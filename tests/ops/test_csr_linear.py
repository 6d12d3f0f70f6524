"""The csr_linear op on every backend.

The first test runs on every backend (``backends.OP_BACKENDS``: reference, CPU C++, Triton under
the interpreter, CUDA C++), each skipped with the reason where this machine lacks it; the sections
after it are the backend-specific tests.

Reference and CPU C++ kernels: csr_linear (CSR weights, C++ CPU kernels through the registered op) vs sparsesam.reference,
the CSRPattern format, and the CSRLinear module.

Sizes are chosen for the kernels' paths: batches of 1, 3, 9, 17, 64 and 129
give 1, 2, 4 and 8 vectors per batch tile and partial and several tiles;
in_features 1100 at batch 129 gives several column (cache) blocks.

Triton kernels (marked triton): The Triton csr_linear kernels (sparsesam.triton_kernels.csr_linear) vs sparsesam.reference.

They run on CPU under the Triton interpreter:

    TRITON_INTERPRET=1 python -m pytest -m triton tests/ops/test_csr_linear.py

TRITON_INTERPRET must be set before triton is imported, so these cases skip
themselves when it is not. Sizes are small (the interpreter runs one program at a
time) but odd: rows longer than one 32-entry block, batches over one and
several 16..64-row blocks, empty rows and columns, an all-pruned layer, a
batch of 0. float16 stands in for the 16-bit path (the interpreter cannot do
bfloat16 arithmetic; see tests/ops/test_csr_linear.py). Tolerances follow the
flash-attention rule of tests/tolerance.py.

On a GPU (marked gpu): csr_linear on a GPU: the Triton kernels and the CUDA C++ kernels vs sparsesam.reference.

Through the public op (autograd included) with sparsesam.ops.use_backend binding
the backend, so the CUDA router is covered too. Results must be within about
twice PyTorch's own error versus float64 (tests/tolerance.py). Skipped
without a GPU; the CUDA C++ cases also without a SPARSESAM_CUDA=1 build.
"""
from __future__ import annotations

import itertools
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F

from sparsesam import reference
from sparsesam.nn import MaskedLinear, CSRLinear
from sparsesam.ops import csr_linear, use_backend
from sparsesam.sparse import CSRPattern

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
    forward, device = backend_op(backend, "csr_linear")
    backward, _ = backend_op(backend, "csr_linear_backward")
    mask = torch.rand(17, 33) < 0.3
    mask[3] = False  # an empty row
    assert_linear_format_matches_dense(forward, backward, device, CSRPattern.from_mask(mask), lambda p: tuple(p))


# ============================================================================
# Reference and CPU C++ kernels

ops = torch.ops.sparsesam

# (leading dims of x, in_features, out_features, density)
SHAPES = [
    ((1,), 1, 1, 1.0),
    ((3,), 7, 5, 0.5),
    ((9,), 33, 17, 0.3),
    ((17,), 65, 129, 0.1),
    ((64,), 129, 33, 0.5),
    ((129,), 1100, 37, 0.3),
    ((2, 5), 31, 6, 0.4),
    ((), 13, 7, 0.5),
    ((0,), 7, 5, 0.5),
    ((4,), 0, 3, 1.0),
    ((4,), 6, 0, 1.0),
    ((5,), 9, 4, 0.0),
]
DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)


def _mask(n_out, n_in, density, empty_lines=True):
    mask = torch.rand(n_out, n_in) < density
    if empty_lines and n_out > 2 and n_in > 2:
        mask[1] = False      # an empty row (an output of bias only)
        mask[:, -2] = False  # an empty column (an input no output reads)
    return mask


def _inputs(lead, n_in, n_out, density, dtype, bias=True):
    mask = _mask(n_out, n_in, density)
    pattern = CSRPattern.from_mask(mask)
    inputs = dict(
        x=torch.randn(*lead, n_in, dtype=torch.float64).to(dtype),
        values=torch.randn(pattern.nnz, dtype=torch.float64).to(dtype),
        bias=torch.randn(n_out, dtype=torch.float64).to(dtype) if bias else None,
    )
    return pattern, inputs


def _ours(pattern):
    return lambda x, values, bias: csr_linear(x, values, pattern, bias)


def _reference(pattern):
    return lambda x, values, bias: reference.csr_linear(x, values, *pattern, bias)


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
    pattern, inputs = _inputs((70,), 45, 23, 0.3, dtype)
    x = inputs["x"]
    if layout == "transposed":
        x = noncontiguous(x)
    elif layout == "row_slice":  # unit column stride, row stride > in_features
        x = torch.cat([x, torch.randn(70, 5, dtype=dtype)], dim=1)[:, :45]
    else:  # every row the same storage (stride 0)
        x = x[:1].expand(70, 45)
    assert not x.is_contiguous()
    inputs["x"] = x
    _check_against_reference(pattern, inputs)


def test_without_bias_and_only_some_grads():
    pattern, inputs = _inputs((6,), 11, 9, 0.5, torch.float64, bias=False)
    values = inputs["values"].requires_grad_()
    y = csr_linear(inputs["x"], values, pattern)
    (dvalues,) = torch.autograd.grad(y.sum(), [values])
    expected = (torch.ones(6, 9, dtype=torch.float64).t() @ inputs["x"])[pattern.entry_rows(), pattern.col_indices.long()]
    torch.testing.assert_close(dvalues, expected)
    x = inputs["x"].requires_grad_()
    (dx,) = torch.autograd.grad(csr_linear(x, inputs["values"], pattern).sum(), [x])
    torch.testing.assert_close(dx, torch.ones(6, 9, dtype=torch.float64) @ pattern.scatter(inputs["values"]))


def test_all_pruned_layer_gives_bias_and_zero_grads():
    pattern, inputs = _inputs((3,), 5, 4, 0.0, torch.float32)
    assert pattern.nnz == 0
    out, grads = outputs_and_grads(_ours(pattern), inputs)
    torch.testing.assert_close(out, inputs["bias"].expand(3, 4))
    assert grads["values"].shape == (0,) and torch.count_nonzero(grads["x"]) == 0


def test_dense_pattern_matches_f_linear():
    w = torch.randn(13, 21, dtype=torch.float64)
    x = torch.randn(40, 21, dtype=torch.float64)
    pattern = CSRPattern.from_mask(torch.ones(13, 21, dtype=torch.bool))
    torch.testing.assert_close(csr_linear(x, pattern.gather(w), pattern), F.linear(x, w))


def test_sparse_linear_is_the_deprecated_name_of_csr_linear():
    """The op was sparse_linear before the CSR pieces were named csr_*: the old Python names still work and
    warn, while torch.ops knows only csr_linear (the schema list has one name per op)."""
    import importlib
    import sparsesam.ops
    pattern, inputs = _inputs((5,), 6, 4, 0.5, torch.float64)
    with pytest.warns(DeprecationWarning, match="csr_linear"):
        old = sparsesam.ops.sparse_linear(inputs["x"], inputs["values"], pattern, inputs["bias"])
    assert torch.equal(old, csr_linear(inputs["x"], inputs["values"], pattern, inputs["bias"]))
    assert not hasattr(torch.ops.sparsesam, "sparse_linear") and not hasattr(torch.ops.sparsesam,
                                                                              "sparse_linear_backward")
    sys.modules.pop("sparsesam.nn.sparse_linear", None)  # the warning comes once per import of the module
    with pytest.warns(DeprecationWarning, match="csr_linear"):
        old_module = importlib.import_module("sparsesam.nn.sparse_linear")
    assert old_module.CSRLinear is old_module.SparseLinear is CSRLinear


def test_result_does_not_depend_on_thread_count():
    pattern, inputs = _inputs((129,), 300, 77, 0.2, torch.float32)
    grad = torch.randn(129, 77)
    assert_same_bits_at_every_thread_count(lambda: (
        ops.csr_linear(inputs["x"], inputs["values"], *pattern, inputs["bias"]),
        *ops.csr_linear_backward(grad, inputs["x"], inputs["values"], *pattern, [True, True]),
    ))


def test_gradcheck():
    pattern, inputs = _inputs((4,), 7, 6, 0.5, torch.float64)
    args = (inputs["x"].requires_grad_(), inputs["values"].requires_grad_(), inputs["bias"].requires_grad_())
    assert torch.autograd.gradcheck(lambda x, v, b: csr_linear(x, v, pattern, b), args)


def test_opcheck():
    for shape in [((3,), 6, 5, 0.5), ((2, 3), 4, 7, 0.6), ((0,), 3, 2, 0.5), ((5,), 4, 3, 0.0)]:
        pattern, inputs = _inputs(*shape, torch.float32)
        args = (inputs["x"].requires_grad_(), inputs["values"].requires_grad_(), *pattern, inputs["bias"])
        torch.library.opcheck(ops.csr_linear.default, args)
        grad_out = torch.randn(*shape[0], shape[2])
        for output_mask in ([True, True], [True, False], [False, True]):
            torch.library.opcheck(
                ops.csr_linear_backward.default,
                (grad_out, inputs["x"].detach(), inputs["values"].detach(), *pattern, output_mask),
            )


def test_autocast_bfloat16_matches_reference_under_autocast():
    pattern, inputs = _inputs((8,), 16, 12, 0.5, torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ours = csr_linear(inputs["x"], inputs["values"], pattern, inputs["bias"])
    theirs = reference.csr_linear(*(t.to(torch.bfloat16) for t in (inputs["x"], inputs["values"])), *pattern,
                                     inputs["bias"].to(torch.bfloat16))
    assert ours.dtype == torch.bfloat16
    torch.testing.assert_close(ours, theirs)


def test_baseline_isa_kernels_match_reference():
    """The kernels compiled for the baseline ISA (the path of CPUs without
    AVX2), chosen with ATEN_CPU_CAPABILITY=default like ATen's own, in a
    fresh process: every tile width, several tiles and column blocks."""
    script = textwrap.dedent("""
        import torch
        from sparsesam import reference
        from sparsesam.sparse import CSRPattern
        assert torch.backends.cpu.get_cpu_capability() == "DEFAULT"
        torch.manual_seed(0)
        for dtype in (torch.float32, torch.float64):
            for batch, n_in, n_out in ((1, 5, 3), (5, 9, 7), (9, 17, 5), (17, 33, 9), (100, 1300, 21)):
                mask = torch.rand(n_out, n_in) < 0.3
                p = CSRPattern.from_mask(mask)
                x, g = torch.randn(batch, n_in, dtype=torch.float64), torch.randn(batch, n_out, dtype=torch.float64)
                v, b = torch.randn(p.nnz, dtype=torch.float64), torch.randn(n_out, dtype=torch.float64)
                y = torch.ops.sparsesam.csr_linear(x.to(dtype), v.to(dtype), *p, b.to(dtype))
                dx, dv = torch.ops.sparsesam.csr_linear_backward(g.to(dtype), x.to(dtype), v.to(dtype), *p, [True, True])
                ry = reference.csr_linear(x, v, *p, b)
                rdx, rdv = reference.csr_linear_backward(g, x, v, *p, [True, True])
                tol = 1e-12 if dtype == torch.float64 else 1e-4
                for ours, ref in ((y, ry), (dx, rdx), (dv, rdv)):
                    scale = max(1.0, ref.abs().max().item())
                    assert (ours.double() - ref).abs().max().item() <= tol * scale, (dtype, batch, n_in)
        print("ok")
    """)
    assert_script_passes_on_the_baseline_isa(script)


# --- bad input -----------------------------------------------------------------


def _good_args():
    pattern = CSRPattern.from_mask(torch.rand(4, 5) < 0.6)
    return dict(x=torch.randn(3, 5), values=torch.randn(pattern.nnz), pattern=pattern, bias=torch.randn(4))


@pytest.mark.parametrize(
    "change, error, words",
    [
        (lambda a: dict(values=torch.randn(a["pattern"].nnz + 1)), ValueError, "values has"),
        (lambda a: dict(values=torch.randn(a["pattern"].nnz, 1)), ValueError, "values must have 1 dimensions"),
        (lambda a: dict(values=torch.ones(a["pattern"].nnz, dtype=torch.int32)), TypeError, "values must be a floating"),
        (lambda a: dict(x=torch.randn(3, 6)), ValueError, "x has shape"),
        (lambda a: dict(x=torch.randn(3, 5, dtype=torch.float64)), TypeError, "x dtype"),
        (lambda a: dict(x=torch.ones(3, 5, dtype=torch.int64)), TypeError, "x must be a floating"),
        (lambda a: dict(bias=torch.randn(3)), ValueError, "bias has 3 entries"),
        (lambda a: dict(bias=torch.randn(4, dtype=torch.float64)), TypeError, "bias dtype"),
        (lambda a: dict(pattern=a["pattern"].mask()), TypeError, "pattern must be a sparsesam.sparse.CSRPattern"),
        (lambda a: dict(values=torch.randn(a["pattern"].nnz, device="meta")), ValueError, "values is on meta"),
    ],
)
def test_bad_input_names_the_argument(change, error, words):
    args = _good_args()
    args.update(change(args))
    with pytest.raises(error, match=words):
        csr_linear(**args)


def _corrupt(pattern: CSRPattern, field: str, position: int, value: int) -> CSRPattern:
    tensor = getattr(pattern, field).clone()
    tensor[position] = value
    return pattern._replace(**{field: tensor})


@pytest.mark.parametrize(
    "field, position, value, words, read_by",
    [
        # The forward reads the CSR half (crow, col); the backward's dx reads the transposed half.
        ("col_indices", 0, 5, "col_indices must lie in", "forward"),
        ("col_indices", -1, -1, "col_indices must lie in", "forward"),
        ("crow_indices", 2, 100, "crow_indices must be non-decreasing", "forward"),
        ("crow_indices", -1, 3, "crow_indices must start at 0 and end at nnz", "forward"),
        ("row_indices", 0, 4, "row_indices in", "backward"),
        ("csr_positions", 0, 1000, "csr_positions in", "backward"),
        ("ccol_indices", 0, 1, "ccol_indices must start at 0", "backward"),
    ],
)
def test_corrupt_pattern_is_refused_by_the_kernel(field, position, value, words, read_by):
    """The C++ op checks every index before reading through it (a ValueError, never a crash).

    Forward and backward are checked apart: the pass that reads the corrupt
    field must refuse it, and a forward that does not read it must give the
    intact pattern's result.
    """
    pattern = CSRPattern.from_mask(torch.ones(4, 5, dtype=torch.bool))
    bad = _corrupt(pattern, field, position, value)
    x, values = torch.randn(3, 5), torch.randn(pattern.nnz)
    if read_by == "forward":
        with pytest.raises(ValueError, match=words):
            ops.csr_linear(x, values, *bad, None)
    else:
        forward = ops.csr_linear(x, values, *bad, None)
        torch.testing.assert_close(forward, ops.csr_linear(x, values, *pattern, None), rtol=0, atol=0)
    grad = torch.ones(3, 4)
    with pytest.raises(ValueError, match=words):
        ops.csr_linear_backward(grad, x, values, *bad, [True, True])


def test_int64_index_is_refused_by_the_kernel():
    pattern = CSRPattern.from_mask(torch.ones(4, 5, dtype=torch.bool))
    bad = pattern._replace(col_indices=pattern.col_indices.long())
    with pytest.raises(TypeError, match="col_indices must be int32"):
        ops.csr_linear(torch.randn(3, 5), torch.randn(pattern.nnz), *bad, None)


# --- CSRPattern ------------------------------------------------------------------


def test_pattern_of_a_mask():
    mask = _mask(9, 12, 0.4)
    p = CSRPattern.from_mask(mask)
    assert all(t.dtype == torch.int32 and t.is_contiguous() for t in p)
    assert p.shape == (9, 12) and p.nnz == int(mask.sum())
    assert torch.equal(p.mask(), mask)
    w = torch.randn(9, 12)
    assert torch.equal(p.scatter(p.gather(w)), w * mask)
    # CSR: rows in order, columns increasing within a row.
    rows, cols = p.entry_rows(), p.col_indices.long()
    assert torch.equal(torch.stack([rows, cols], 1), mask.nonzero())
    # The transposed index lists, column by column, every entry once: its row
    # and where it sits in the CSR values.
    pos = p.csr_positions.long()
    assert torch.equal(torch.sort(pos).values, torch.arange(p.nnz))
    col_of_t = torch.repeat_interleave(torch.arange(12), p.ccol_indices.diff().long())
    assert torch.equal(cols[pos], col_of_t)
    assert torch.equal(rows[pos], p.row_indices.long())


def test_pattern_from_csr_round_trip_and_checks():
    p = CSRPattern.from_mask(_mask(6, 8, 0.5))
    q = CSRPattern.from_csr(p.crow_indices.long(), p.col_indices.long(), 8)
    assert all(torch.equal(a, b) for a, b in zip(p, q))
    crow = torch.tensor([0, 2, 3])
    with pytest.raises(ValueError, match="strictly increasing"):
        CSRPattern.from_csr(crow, torch.tensor([3, 1, 0]), 4)
    with pytest.raises(ValueError, match="strictly increasing"):
        CSRPattern.from_csr(crow, torch.tensor([1, 1, 0]), 4)
    with pytest.raises(ValueError, match="col_indices must lie in"):
        CSRPattern.from_csr(crow, torch.tensor([1, 4, 0]), 4)
    with pytest.raises(ValueError, match="crow_indices must go from 0"):
        CSRPattern.from_csr(torch.tensor([0, 2, 2]), torch.tensor([1, 2, 0]), 4)
    with pytest.raises(TypeError, match="col_indices must be a 1-D int32 or int64"):
        CSRPattern.from_csr(crow, torch.tensor([1.0, 2.0, 0.0]), 4)


def test_pattern_bad_masks():
    with pytest.raises(ValueError, match="mask must have 2 dimensions"):
        CSRPattern.from_mask(torch.ones(3, dtype=torch.bool))
    with pytest.raises(ValueError, match="mask contains NaN"):
        CSRPattern.from_mask(torch.full((2, 2), float("nan")))
    with pytest.raises(TypeError, match="mask must be a torch.Tensor"):
        CSRPattern.from_mask([[1, 0]])


def test_pattern_storage_grows_with_nnz():
    sparse = CSRPattern.from_mask(torch.rand(256, 512) < 0.01)
    denser = CSRPattern.from_mask(torch.rand(256, 512) < 0.1)
    for p in (sparse, denser):
        assert p.nbytes() == 12 * p.nnz + 4 * (256 + 512 + 2)


# --- CSRLinear ----------------------------------------------------------------


def _masked_layer(n_in=23, n_out=17, density=0.3, bias=True, dtype=torch.float32):
    layer = MaskedLinear(n_in, n_out, bias=bias, dtype=dtype)
    layer.set_mask(_mask(n_out, n_in, density))
    return layer


@pytest.mark.parametrize("bias", [True, False])
def test_masked_to_sparse_to_masked_is_exact(bias):
    masked = _masked_layer(bias=bias)
    sparse = CSRLinear.from_masked(masked)
    back = sparse.to_masked()
    assert torch.equal(back.weight_mask, masked.weight_mask)
    assert torch.equal(back.weight, masked.effective_weight().detach())
    assert (back.bias is None) == (not bias) and (not bias or torch.equal(back.bias, masked.bias))
    again = CSRLinear.from_masked(back)
    assert torch.equal(again.values, sparse.values)
    assert all(torch.equal(a, b) for a, b in zip(again.pattern, sparse.pattern))


def test_sparse_layer_computes_the_masked_layer():
    masked = _masked_layer(dtype=torch.float64)
    sparse = CSRLinear.from_masked(masked)
    x = torch.randn(11, 23, dtype=torch.float64)
    torch.testing.assert_close(sparse(x), masked(x))
    torch.testing.assert_close(sparse.to_dense()(x), masked(x))
    dense = CSRLinear.from_linear(sparse.to_dense())  # zero weights are the pruned ones
    assert torch.equal(dense.pattern.mask(), masked.weight_mask)


def test_storage_is_o_nnz():
    layer = CSRLinear.from_dense(torch.randn(300, 400), torch.rand(300, 400) < 0.05, torch.randn(300))
    tensors = list(layer.parameters()) + list(layer.buffers())
    stored = sum(t.numel() * t.element_size() for t in tensors)
    assert stored == 16 * layer.nnz + 4 * (300 + 400 + 2) + 4 * 300
    assert stored < 0.25 * 300 * 400 * 4  # at 5% density: a quarter of the dense weight alone


def test_training_step_moves_kept_values_only():
    masked = _masked_layer()
    sparse = CSRLinear.from_masked(masked)
    opt = torch.optim.SGD(sparse.parameters(), lr=0.1)
    before = sparse.values.detach().clone()
    sparse(torch.randn(8, 23)).square().sum().backward()
    opt.step()
    assert sparse.values.shape == before.shape and not torch.equal(sparse.values, before)
    assert torch.equal(sparse.to_masked().weight_mask, masked.weight_mask)


def test_trainable_mask_is_refused():
    layer = MaskedLinear(4, 3, mask_mode="trainable")
    with pytest.raises(ValueError, match="trainable"):
        CSRLinear.from_masked(layer)
    with pytest.raises(TypeError, match="must be a MaskedLinear"):
        CSRLinear.from_masked(torch.nn.Linear(4, 3))


def test_state_dict_round_trip_with_another_pattern():
    source = CSRLinear.from_masked(_masked_layer(density=0.2))
    target = CSRLinear.from_masked(_masked_layer(density=0.7))
    assert target.nnz != source.nnz
    state = source.state_dict()
    assert set(state) == {"values", "bias", "crow_indices", "col_indices"}  # no derived index
    target.load_state_dict(state)
    assert target.nnz == source.nnz
    assert all(torch.equal(a, b) for a, b in zip(target.pattern, source.pattern))
    x = torch.randn(5, 23)
    assert torch.equal(target(x), source(x))


def test_state_dict_of_the_wrong_shape_is_refused():
    target = CSRLinear.from_masked(_masked_layer())
    other = CSRLinear.from_masked(_masked_layer(n_in=23, n_out=9))
    with pytest.raises(RuntimeError, match="the pattern has 9 rows"):
        target.load_state_dict(other.state_dict())


def test_dtype_and_device_moves_keep_int32_index():
    layer = CSRLinear.from_masked(_masked_layer()).double()
    assert layer.values.dtype == torch.float64
    assert all(t.dtype == torch.int32 for t in layer.pattern)
    x = torch.randn(4, 23, dtype=torch.float64)
    torch.testing.assert_close(layer(x), layer.to_dense()(x))


def test_constructor_checks():
    pattern = CSRPattern.from_mask(torch.ones(3, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="pattern has shape"):
        CSRLinear(3, 4, pattern)
    with pytest.raises(TypeError, match="pattern must be"):
        CSRLinear(4, 3, torch.ones(3, 4))
    layer = CSRLinear(4, 3, pattern)
    assert layer.values.abs().max() <= 0.5 and layer.bias.abs().max() <= 0.5


def test_whole_model_to_sparse_and_back():
    torch.manual_seed(0)
    model = torch.nn.Sequential(_masked_layer(23, 17, 0.1), torch.nn.ReLU(), _masked_layer(17, 5, 0.8),
                                MaskedLinear(5, 3, mask_mode="trainable"))
    x = torch.randn(4, 23)
    before = model(x)
    from sparsesam.nn import set_execution
    sparse_enough = [m for m in model if getattr(m, "mask_mode", None) == "fixed" and m.sparsity >= 0.5]
    set_execution(model, "csr", layers=sparse_enough)
    # Only the fixed mask at >= 50% sparsity became sparse.
    assert [type(m).__name__ for m in model] == ["CSRLinear", "ReLU", "MaskedLinear", "MaskedLinear"]
    torch.testing.assert_close(model(x), before)
    set_execution(model, "dense")
    assert all(not isinstance(m, CSRLinear) for m in model)
    torch.testing.assert_close(model(x), before)


# ============================================================================
# Triton kernels (marked triton)

DTYPES_triton = [torch.float32, torch.float64, torch.float16]
# (leading dims of x, in_features, out_features, density)
SHAPES_triton = [((1,), 1, 1, 1.0), ((7,), 70, 5, 0.8), ((2, 3), 17, 9, 0.4), ((129,), 20, 6, 0.5), ((0,), 7, 5, 0.5),
          ((5,), 9, 4, 0.0)]


def _case(lead, n_in, n_out, density, dtype):
    mask = torch.rand(n_out, n_in) < density
    if n_out > 2 and n_in > 2:
        mask[1] = False
        mask[:, -2] = False
    pattern = CSRPattern.from_mask(mask)
    rnd = lambda *s: torch.randn(*s, dtype=torch.float64).to(dtype)  # noqa: E731
    return pattern, rnd(*lead, n_in), rnd(pattern.nnz), rnd(n_out), rnd(*lead, n_out)


@triton_case
@pytest.mark.parametrize("layout", ["contig", "noncontig"])
@pytest.mark.parametrize("dtype", DTYPES_triton, ids=str)
@pytest.mark.parametrize("shape", SHAPES_triton, ids=str)
def test_forward_matches_reference(shape, dtype, layout):
    pattern, x, values, bias, _ = _case(*shape, dtype)
    if layout == "noncontig":
        x = noncontiguous(x)
    for b in (bias, None):
        ours = tk.csr_linear(x, values, *pattern, b)
        torch_own = reference.csr_linear(x, values, *pattern, b)
        ref = reference.csr_linear(x.double(), values.double(), *pattern, b.double() if b is not None else None)
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
    ours = tk.csr_linear_backward(grad, x_arg, v_arg, *pattern, output_mask)
    torch_own = reference.csr_linear_backward(grad, x, values, *pattern, output_mask)
    ref = reference.csr_linear_backward(grad.double(), x.double(), values.double(), *pattern, output_mask)
    assert_backward_within_torch_error(ours, torch_own, ref, output_mask, pattern, grad)


# ============================================================================
# On a GPU (marked gpu)

DTYPES_gpu = [torch.float32, torch.float64, torch.bfloat16]
# (leading dims of x, in_features, out_features, density): odd sizes, a batch
# over several 256-row blocks, an all-pruned layer, a batch of 0, 3-D x.
SHAPES_gpu = [((1,), 1, 1, 1.0), ((7,), 70, 5, 0.8), ((300,), 129, 65, 0.1), ((5,), 9, 4, 0.0), ((0,), 7, 5, 0.5),
          ((2, 3), 17, 9, 0.4), ((256,), 1024, 512, 0.05)]


def _case_gpu(lead, n_in, n_out, density, dtype):
    mask = torch.rand(n_out, n_in) < density
    if n_out > 2 and n_in > 2:
        mask[1] = False
        mask[:, -2] = False
    pattern = CSRPattern.from_mask(mask).to("cuda")
    rnd = lambda *s: torch.randn(*s, dtype=torch.float64, device="cuda").to(dtype)  # noqa: E731
    return pattern, dict(x=rnd(*lead, n_in), values=rnd(pattern.nnz), bias=rnd(n_out))


@gpu_case
@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES_gpu, ids=str)
@pytest.mark.parametrize("shape", SHAPES_gpu, ids=str)
def test_forward_backward_vs_reference_gpu(backend, dtype, shape):
    with use_backend(backend):
        torch.manual_seed(0)
        pattern, inputs = _case_gpu(*shape, dtype)
        _check_against_reference(pattern, inputs)


@gpu_case
@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_only_one_gradient_reads_only_its_inputs(backend):
    with use_backend(backend):
        pattern, inputs = _case_gpu((33,), 40, 30, 0.3, torch.float32)
        x, values = inputs["x"], inputs["values"].requires_grad_()
        (dvalues,) = torch.autograd.grad(csr_linear(x, values, pattern).sum(), [values])
        expected = reference.csr_linear_backward(torch.ones(33, 30, device="cuda"), x, values.detach(), *pattern,
                                                    [False, True])[1]
        torch.testing.assert_close(dvalues, expected)
        x = x.requires_grad_()
        (dx,) = torch.autograd.grad(csr_linear(x, values.detach(), pattern).sum(), [x])
        torch.testing.assert_close(dx, torch.ones(33, 30, device="cuda") @ pattern.scatter(values.detach()))
