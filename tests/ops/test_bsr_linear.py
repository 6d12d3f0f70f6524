"""The bsr_linear op on every backend.

The first test runs on every backend (``backends.OP_BACKENDS``: reference, CPU C++, Triton under
the interpreter, CUDA C++), each skipped with the reason where this machine lacks it; the sections
after it are the backend-specific tests.

Reference and CPU C++ kernels: bsr_linear (block-sparse weights, C++ CPU kernels through the registered op) vs sparsesam.reference,
the BSRPattern format, and the BlockSparseLinear module.

Block sizes cover the register-tile paths of csrc/cpu/bsr_linear_kernels.h:
4-row groups (4x4, 8x8, 16x16, 32x32), leftover rows (3x5, 6x2), one-row
blocks (1x8, 1x1) and odd column counts; batches of 1, 3, 9, 17, 64 and 129
give 1, 2, 4 and 8 vectors per batch tile and partial and several tiles.

Triton kernels (marked triton): The Triton bsr_linear kernels (sparsesam.triton_kernels.bsr_linear) vs sparsesam.reference.

They run on CPU under the Triton interpreter:

    TRITON_INTERPRET=1 python -m pytest -m triton tests/ops/test_bsr_linear.py

TRITON_INTERPRET must be set before triton is imported, so these cases skip
themselves when it is not. Block sizes cover both paths of the kernels: tl.dot
(blocks of 16 x 16 and more, here 16x16 and 16x32) and the broadcast product
(4x4, 6x5, 1x8); batches over one and several 16..64-row blocks, empty block
rows and columns, an all-pruned layer, a batch of 0. float16 stands in for the
16-bit path (the interpreter cannot do bfloat16 arithmetic). Tolerances follow
the flash-attention rule of tests/tolerance.py.

On a GPU (marked gpu): bsr_linear on a GPU: the Triton kernels and the CUDA C++ kernels vs sparsesam.reference.

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
from sparsesam.nn import BlockSparseLinear, MaskedLinear
from sparsesam.ops import bsr_linear, use_backend
from sparsesam.sparse import block_structure_error, BSRPattern, largest_blocksize

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
    forward, device = backend_op(backend, "bsr_linear")
    backward, _ = backend_op(backend, "bsr_linear_backward")
    blocks = torch.rand(4, 3) < 0.5
    blocks[1] = False  # an empty block row
    mask = blocks.repeat_interleave(8, 0).repeat_interleave(16, 1)  # 32 x 48 in 8 x 16 blocks
    pattern = BSRPattern.from_mask(mask, (8, 16))
    assert_linear_format_matches_dense(forward, backward, device, pattern, lambda p: p.index)


# ============================================================================
# Reference and CPU C++ kernels

ops = torch.ops.sparsesam

# (leading dims of x, in_features, out_features, block (bh, bw), block density)
SHAPES = [
    ((1,), 1, 1, (1, 1), 1.0),
    ((3,), 8, 8, (4, 4), 0.5),
    ((9,), 40, 24, (8, 8), 0.5),
    ((17,), 64, 128, (16, 16), 0.3),
    ((64,), 64, 96, (32, 32), 0.5),
    ((129,), 160, 48, (4, 4), 0.3),
    ((2, 5), 24, 6, (3, 4), 0.5),
    ((7,), 35, 18, (6, 5), 0.5),
    ((33,), 64, 5, (1, 8), 0.4),
    ((10,), 13, 7, (1, 1), 0.5),
    ((), 16, 8, (4, 4), 0.5),
    ((0,), 8, 8, (4, 4), 0.5),
    ((4,), 0, 4, (4, 4), 1.0),
    ((4,), 8, 0, (4, 4), 1.0),
    ((5,), 16, 8, (4, 4), 0.0),
]
DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)


def _block_mask(n_out, n_in, block, density, empty_lines=True):
    """A mask keeping whole blocks at random, with an empty block row and column where there are 3+."""
    bh, bw = block
    keep = torch.rand(n_out // bh, n_in // bw) < density
    if empty_lines and keep.shape[0] > 2 and keep.shape[1] > 2:
        keep[1] = False      # a block row of bias only
        keep[:, -2] = False  # a block column no output reads
    return keep.repeat_interleave(bh, 0).repeat_interleave(bw, 1)


def _inputs(lead, n_in, n_out, block, density, dtype, bias=True):
    pattern = BSRPattern.from_mask(_block_mask(n_out, n_in, block, density), block)
    inputs = dict(
        x=torch.randn(*lead, n_in, dtype=torch.float64).to(dtype),
        values=torch.randn(pattern.values_shape, dtype=torch.float64).to(dtype),
        bias=torch.randn(n_out, dtype=torch.float64).to(dtype) if bias else None,
    )
    return pattern, inputs


def _ours(pattern):
    return lambda x, values, bias: bsr_linear(x, values, pattern, bias)


def _reference(pattern):
    return lambda x, values, bias: reference.bsr_linear(x, values, *pattern.index, bias)


def _check_against_reference(pattern, inputs):
    assert_op_within_torch_error(_ours(pattern), _reference(pattern), pattern, inputs)


# --- the op vs the reference ---------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_forward_backward_vs_reference(dtype, shape):
    pattern, inputs = _inputs(*shape, dtype)
    _check_against_reference(pattern, inputs)


def test_reference_is_f_linear_of_the_dense_weight():
    """The reference itself against an independent construction of W."""
    pattern, inputs = _inputs((5,), 24, 16, (4, 8), 0.5, torch.float64)
    dense = torch.zeros(16, 24, dtype=torch.float64)
    rows = pattern.block_row_of_each()
    for j in range(pattern.nblocks):
        r, c = int(rows[j]), int(pattern.col_indices[j])
        dense[r * 4:(r + 1) * 4, c * 8:(c + 1) * 8] = inputs["values"][j]
    torch.testing.assert_close(reference.bsr_linear(inputs["x"], inputs["values"], *pattern.index, inputs["bias"]),
                               F.linear(inputs["x"], dense, inputs["bias"]))


@pytest.mark.parametrize("layout", ["transposed", "row_slice", "expanded"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_noncontiguous_x(layout, dtype):
    pattern, inputs = _inputs((70,), 48, 24, (8, 8), 0.4, dtype)
    x = inputs["x"]
    if layout == "transposed":
        x = noncontiguous(x)
    elif layout == "row_slice":  # unit column stride, row stride > in_features
        x = torch.cat([x, torch.randn(70, 5, dtype=dtype)], dim=1)[:, :48]
    else:  # every row the same storage (stride 0)
        x = x[:1].expand(70, 48)
    assert not x.is_contiguous()
    inputs["x"] = x
    _check_against_reference(pattern, inputs)


def test_noncontiguous_values_and_grad():
    pattern, inputs = _inputs((9,), 16, 16, (4, 4), 0.5, torch.float64)
    values = inputs["values"].transpose(1, 2).contiguous().transpose(1, 2)
    assert not values.is_contiguous()
    y = ops.bsr_linear(inputs["x"], values, *pattern.index, None)
    torch.testing.assert_close(y, reference.bsr_linear(inputs["x"], values, *pattern.index, None))
    grad = noncontiguous(torch.randn(9, 16, dtype=torch.float64))
    ours = ops.bsr_linear_backward(grad, inputs["x"], values, *pattern.index, [True, True])
    theirs = reference.bsr_linear_backward(grad, inputs["x"], values, *pattern.index, [True, True])
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b)


def test_without_bias_and_only_some_grads():
    pattern, inputs = _inputs((6,), 16, 8, (4, 4), 0.5, torch.float64, bias=False)
    values = inputs["values"].requires_grad_()
    y = bsr_linear(inputs["x"], values, pattern)
    (dvalues,) = torch.autograd.grad(y.sum(), [values])
    dense_grad = torch.ones(6, 8, dtype=torch.float64).t() @ inputs["x"]
    torch.testing.assert_close(dvalues, pattern.gather(dense_grad))
    x = inputs["x"].requires_grad_()
    (dx,) = torch.autograd.grad(bsr_linear(x, inputs["values"], pattern).sum(), [x])
    torch.testing.assert_close(dx, torch.ones(6, 8, dtype=torch.float64) @ pattern.scatter(inputs["values"]))


def test_all_pruned_layer_gives_bias_and_zero_grads():
    pattern, inputs = _inputs((3,), 8, 4, (2, 4), 0.0, torch.float32)
    assert pattern.nblocks == 0
    out, grads = outputs_and_grads(_ours(pattern), inputs)
    torch.testing.assert_close(out, inputs["bias"].expand(3, 4))
    assert grads["values"].shape == (0, 2, 4) and torch.count_nonzero(grads["x"]) == 0


def test_dense_pattern_matches_f_linear():
    w = torch.randn(16, 24, dtype=torch.float64)
    x = torch.randn(40, 24, dtype=torch.float64)
    pattern = BSRPattern.from_mask(torch.ones(16, 24, dtype=torch.bool), (8, 8))
    torch.testing.assert_close(bsr_linear(x, pattern.gather(w), pattern), F.linear(x, w))


def test_same_weights_as_csr_give_the_same_function():
    """One weight, block-sparse and CSR: the two ops compute the same layer."""
    from sparsesam.ops import csr_linear
    from sparsesam.sparse import CSRPattern
    mask = _block_mask(32, 48, (8, 8), 0.4)
    w, x = torch.randn(32, 48, dtype=torch.float64), torch.randn(20, 48, dtype=torch.float64)
    bsr, csr = BSRPattern.from_mask(mask, 8), CSRPattern.from_mask(mask)
    torch.testing.assert_close(bsr_linear(x, bsr.gather(w), bsr), csr_linear(x, csr.gather(w), csr))


def test_result_does_not_depend_on_thread_count():
    pattern, inputs = _inputs((129,), 320, 96, (8, 8), 0.3, torch.float32)
    grad = torch.randn(129, 96)
    assert_same_bits_at_every_thread_count(lambda: (
        ops.bsr_linear(inputs["x"], inputs["values"], *pattern.index, inputs["bias"]),
        *ops.bsr_linear_backward(grad, inputs["x"], inputs["values"], *pattern.index, [True, True]),
    ))


@pytest.mark.parametrize("block", [(2, 3), (4, 4), (1, 8)], ids=str)
def test_gradcheck(block):
    pattern, inputs = _inputs((4,), 3 * block[1], 3 * block[0], block, 0.6, torch.float64)
    args = (inputs["x"].requires_grad_(), inputs["values"].requires_grad_(), inputs["bias"].requires_grad_())
    assert torch.autograd.gradcheck(lambda x, v, b: bsr_linear(x, v, pattern, b), args)


def test_opcheck():
    for shape in [((3,), 8, 8, (4, 4), 0.5), ((2, 3), 6, 4, (2, 3), 0.6), ((0,), 4, 4, (2, 2), 0.5),
                  ((5,), 8, 4, (4, 4), 0.0)]:
        pattern, inputs = _inputs(*shape, torch.float32)
        args = (inputs["x"].requires_grad_(), inputs["values"].requires_grad_(), *pattern.index, inputs["bias"])
        torch.library.opcheck(ops.bsr_linear.default, args)
        grad_out = torch.randn(*shape[0], shape[2])
        for output_mask in ([True, True], [True, False], [False, True]):
            torch.library.opcheck(
                ops.bsr_linear_backward.default,
                (grad_out, inputs["x"].detach(), inputs["values"].detach(), *pattern.index, output_mask),
            )


def test_autocast_bfloat16_matches_reference_under_autocast():
    pattern, inputs = _inputs((8,), 16, 12, (4, 4), 0.5, torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ours = bsr_linear(inputs["x"], inputs["values"], pattern, inputs["bias"])
    theirs = reference.bsr_linear(*(t.to(torch.bfloat16) for t in (inputs["x"], inputs["values"])), *pattern.index,
                                  inputs["bias"].to(torch.bfloat16))
    assert ours.dtype == torch.bfloat16
    torch.testing.assert_close(ours, theirs)


def test_compiles_with_torch_compile_fullgraph():
    pattern, inputs = _inputs((5,), 16, 8, (4, 4), 0.5, torch.float32)
    fn = torch.compile(lambda x, v, b: bsr_linear(x, v, pattern, b), fullgraph=True, backend="eager")
    torch.testing.assert_close(fn(inputs["x"], inputs["values"], inputs["bias"]),
                               reference.bsr_linear(inputs["x"], inputs["values"], *pattern.index, inputs["bias"]))


def test_baseline_isa_kernels_match_reference():
    """The kernels compiled for the baseline ISA (CPUs without AVX2), chosen
    with ATEN_CPU_CAPABILITY=default like ATen's own, in a fresh process."""
    script = textwrap.dedent("""
        import torch
        from sparsesam import reference
        from sparsesam.sparse import BSRPattern
        assert torch.backends.cpu.get_cpu_capability() == "DEFAULT"
        torch.manual_seed(0)
        for dtype in (torch.float32, torch.float64):
            for batch, n_in, n_out, block in ((1, 8, 4, (4, 4)), (5, 24, 14, (2, 3)), (9, 32, 16, (8, 8)),
                                              (17, 40, 3, (1, 8)), (100, 320, 64, (16, 16))):
                keep = torch.rand(n_out // block[0], n_in // block[1]) < 0.4
                keep[0, 0] = True
                mask = keep.repeat_interleave(block[0], 0).repeat_interleave(block[1], 1)
                p = BSRPattern.from_mask(mask, block)
                x, g = torch.randn(batch, n_in, dtype=torch.float64), torch.randn(batch, n_out, dtype=torch.float64)
                v, b = torch.randn(p.values_shape, dtype=torch.float64), torch.randn(n_out, dtype=torch.float64)
                y = torch.ops.sparsesam.bsr_linear(x.to(dtype), v.to(dtype), *p.index, b.to(dtype))
                dx, dv = torch.ops.sparsesam.bsr_linear_backward(g.to(dtype), x.to(dtype), v.to(dtype), *p.index,
                                                                 [True, True])
                ry = reference.bsr_linear(x, v, *p.index, b)
                rdx, rdv = reference.bsr_linear_backward(g, x, v, *p.index, [True, True])
                tol = 1e-12 if dtype == torch.float64 else 1e-4
                for ours, ref in ((y, ry), (dx, rdx), (dv, rdv)):
                    scale = max(1.0, ref.abs().max().item())
                    assert (ours.double() - ref).abs().max().item() <= tol * scale, (dtype, batch, n_in)
        print("ok")
    """)
    assert_script_passes_on_the_baseline_isa(script)


# --- bad input -----------------------------------------------------------------


def _good_args():
    pattern = BSRPattern.from_mask(_block_mask(4, 6, (2, 3), 0.6, empty_lines=False), (2, 3))
    return dict(x=torch.randn(3, 6), values=torch.randn(pattern.values_shape), pattern=pattern, bias=torch.randn(4))


@pytest.mark.parametrize(
    "change, error, words",
    [
        (lambda a: dict(values=torch.randn(a["pattern"].nblocks + 1, 2, 3)), ValueError, "values has shape"),
        (lambda a: dict(values=torch.randn(a["pattern"].nblocks, 3, 2)), ValueError, "values has shape"),
        (lambda a: dict(values=torch.randn(a["pattern"].nnz)), ValueError, "values must have 3 dimensions"),
        (lambda a: dict(values=torch.ones(a["pattern"].values_shape, dtype=torch.int32)), TypeError,
         "values must be a floating"),
        (lambda a: dict(x=torch.randn(3, 7)), ValueError, "x has shape"),
        (lambda a: dict(x=torch.randn(3, 6, dtype=torch.float64)), TypeError, "x dtype"),
        (lambda a: dict(x=torch.ones(3, 6, dtype=torch.int64)), TypeError, "x must be a floating"),
        (lambda a: dict(bias=torch.randn(3)), ValueError, "bias has 3 entries"),
        (lambda a: dict(bias=torch.randn(4, dtype=torch.float64)), TypeError, "bias dtype"),
        (lambda a: dict(pattern=a["pattern"].mask()), TypeError, "pattern must be a sparsesam.sparse.BSRPattern"),
        (lambda a: dict(values=torch.randn(a["pattern"].values_shape, device="meta")), ValueError, "values is on meta"),
    ],
)
def test_bad_input_names_the_argument(change, error, words):
    args = _good_args()
    args.update(change(args))
    with pytest.raises(error, match=words):
        bsr_linear(**args)


def _corrupt(pattern: BSRPattern, field: str, position: int, value: int) -> BSRPattern:
    tensor = getattr(pattern, field).clone()
    tensor[position] = value
    return pattern._replace(**{field: tensor})


@pytest.mark.parametrize(
    "field, position, value, words, read_by",
    [
        # The forward reads the BSR half (crow, col); the backward's dx reads the transposed half.
        ("col_indices", 0, 3, "col_indices must lie in", "forward"),
        ("col_indices", -1, -1, "col_indices must lie in", "forward"),
        ("crow_indices", 1, 100, "crow_indices must be non-decreasing", "forward"),
        ("crow_indices", -1, 3, "crow_indices must start at 0 and end at nblocks", "forward"),
        ("row_indices", 0, 2, "row_indices in", "backward"),
        ("bsr_positions", 0, 1000, "bsr_positions in", "backward"),
        ("ccol_indices", 0, 1, "ccol_indices must start at 0", "backward"),
    ],
)
def test_corrupt_pattern_is_refused_by_the_kernel(field, position, value, words, read_by):
    """The C++ op checks every index before reading through it (a ValueError, never a crash).

    Forward and backward are checked apart: the pass that reads the corrupt
    field must refuse it, and a forward that does not read it must give the
    intact pattern's result.
    """
    pattern = BSRPattern.from_mask(torch.ones(4, 6, dtype=torch.bool), (2, 2))
    bad = _corrupt(pattern, field, position, value)
    x, values = torch.randn(3, 6), torch.randn(pattern.values_shape)
    if read_by == "forward":
        with pytest.raises(ValueError, match=words):
            ops.bsr_linear(x, values, *bad.index, None)
    else:
        forward = ops.bsr_linear(x, values, *bad.index, None)
        torch.testing.assert_close(forward, ops.bsr_linear(x, values, *pattern.index, None), rtol=0, atol=0)
    grad = torch.ones(3, 4)
    with pytest.raises(ValueError, match=words):
        ops.bsr_linear_backward(grad, x, values, *bad.index, [True, True])


@pytest.mark.parametrize("values_shape", [(6, 3, 2), (6, 2, 1)], ids=["transposed blocks", "narrower blocks"])
def test_raw_op_with_values_of_the_wrong_block_shape_names_values(values_shape):
    """The raw op learns the block width only from values (the index holds block counts): when x does not
    fit, the message names values' block shape as well as x, forward and backward."""
    pattern = BSRPattern.from_mask(torch.ones(4, 6, dtype=torch.bool), (2, 3))   # values_shape (4, 2, 3)
    values = torch.randn(pattern.nblocks, *values_shape[1:])
    x = torch.randn(3, 6)
    words = r"x has shape \[3, 6\] but in_features = 2 block columns \(ccol_indices\) x bw = .* values' block shape"
    with pytest.raises(ValueError, match=words):
        ops.bsr_linear(x, values, *pattern.index, None)
    with pytest.raises(ValueError, match=words):
        ops.bsr_linear_backward(torch.ones(3, 4), x, values, *pattern.index, [True, True])


def test_int64_index_and_flat_values_are_refused_by_the_kernel():
    pattern = BSRPattern.from_mask(torch.ones(4, 6, dtype=torch.bool), (2, 3))
    bad = pattern._replace(col_indices=pattern.col_indices.long())
    with pytest.raises(TypeError, match="col_indices must be int32"):
        ops.bsr_linear(torch.randn(3, 6), torch.randn(pattern.values_shape), *bad.index, None)
    with pytest.raises(ValueError, match="values must be 3-D"):
        ops.bsr_linear(torch.randn(3, 6), torch.randn(pattern.nnz), *pattern.index, None)


# --- BSRPattern ------------------------------------------------------------------


def test_pattern_of_a_mask():
    mask = _block_mask(12, 20, (3, 4), 0.4)
    p = BSRPattern.from_mask(mask, (3, 4))
    assert all(t.dtype == torch.int32 and t.is_contiguous() for t in p.index)
    assert p.shape == (12, 20) and p.blocksize == (3, 4) and p.nnz == int(mask.sum())
    assert torch.equal(p.mask(), mask)
    w = torch.randn(12, 20)
    values = p.gather(w)
    assert values.shape == (p.nblocks, 3, 4) and values.is_contiguous()
    assert torch.equal(p.scatter(values), w * mask)
    # BSR: block rows in order, block columns increasing within a block row.
    block_keep = mask[::3, ::4]
    assert torch.equal(torch.stack([p.block_row_of_each(), p.col_indices.long()], 1), block_keep.nonzero())
    # The transposed index lists, block column by block column, every block
    # once: its block row and where it sits in the values.
    pos = p.bsr_positions.long()
    assert torch.equal(torch.sort(pos).values, torch.arange(p.nblocks))
    col_of_t = torch.repeat_interleave(torch.arange(5), p.ccol_indices.diff().long())
    assert torch.equal(p.col_indices.long()[pos], col_of_t)
    assert torch.equal(p.block_row_of_each()[pos], p.row_indices.long())


def test_mask_that_is_not_block_structured_is_refused():
    mask = _block_mask(8, 8, (4, 4), 1.0, empty_lines=False)
    mask[5, 6] = False
    with pytest.raises(ValueError, match=r"not 4x4 block-structured: block \(1, 1\)"):
        BSRPattern.from_mask(mask, 4)
    with pytest.raises(ValueError, match="does not divide"):
        BSRPattern.from_mask(torch.ones(6, 8, dtype=torch.bool), (4, 4))
    assert block_structure_error(mask, (1, 1)) is None  # every mask is 1x1-structured
    with pytest.raises(ValueError, match="blocksize must be positive"):
        BSRPattern.from_mask(mask, (0, 4))
    with pytest.raises(TypeError, match="blocksize must be"):
        BSRPattern.from_mask(mask, (4.0, 4))


def test_largest_blocksize_picks_the_largest_area():
    assert largest_blocksize(_block_mask(64, 64, (16, 16), 0.5)) in ((16, 16), (32, 32))
    mask = _block_mask(64, 64, (8, 8), 0.5, empty_lines=False)
    mask[:8, :8] = True
    mask[8:16, :8] = False  # 8x8 but not 16x16
    assert largest_blocksize(mask) == (8, 8)
    one_by_eight = _block_mask(12, 24, (1, 8), 0.5)
    assert largest_blocksize(one_by_eight) is None  # not among the default (measured faster) sizes
    assert largest_blocksize(one_by_eight, [(4, 4), (1, 8)]) == (1, 8)
    unstructured = torch.zeros(16, 16, dtype=torch.bool)
    unstructured[0, 0] = True
    assert largest_blocksize(unstructured) is None


def test_pattern_from_bsr_round_trip_and_checks():
    p = BSRPattern.from_mask(_block_mask(12, 16, (2, 4), 0.5), (2, 4))
    q = BSRPattern.from_bsr(p.crow_indices.long(), p.col_indices.long(), 16, (2, 4))
    assert all(torch.equal(a, b) for a, b in zip(p.index, q.index)) and q.blocksize == (2, 4)
    crow = torch.tensor([0, 2, 3])
    with pytest.raises(ValueError, match="strictly increasing"):
        BSRPattern.from_bsr(crow, torch.tensor([3, 1, 0]), 16, 4)
    with pytest.raises(ValueError, match="col_indices must lie in"):
        BSRPattern.from_bsr(crow, torch.tensor([1, 4, 0]), 16, 4)
    with pytest.raises(ValueError, match="crow_indices must go from 0"):
        BSRPattern.from_bsr(torch.tensor([0, 2, 2]), torch.tensor([1, 2, 0]), 16, 4)
    with pytest.raises(ValueError, match="multiple of bw"):
        BSRPattern.from_bsr(crow, torch.tensor([1, 2, 0]), 15, 4)


def test_pattern_bad_masks():
    with pytest.raises(ValueError, match="mask must have 2 dimensions"):
        BSRPattern.from_mask(torch.ones(4, dtype=torch.bool), 2)
    with pytest.raises(ValueError, match="mask contains NaN"):
        BSRPattern.from_mask(torch.full((2, 2), float("nan")), 1)
    with pytest.raises(TypeError, match="mask must be a torch.Tensor"):
        BSRPattern.from_mask([[1, 0]], 1)


def test_pattern_storage_grows_with_kept_blocks():
    sparse = BSRPattern.from_mask(_block_mask(256, 512, (8, 8), 0.01), 8)
    denser = BSRPattern.from_mask(_block_mask(256, 512, (8, 8), 0.1), 8)
    assert sparse.nblocks < denser.nblocks
    for p in (sparse, denser):
        assert p.nbytes() == 12 * p.nblocks + 4 * (256 // 8 + 512 // 8 + 2)


# --- BlockSparseLinear ------------------------------------------------------------


def _masked_layer(n_in=48, n_out=32, block=(8, 8), density=0.3, bias=True, dtype=torch.float32):
    layer = MaskedLinear(n_in, n_out, bias=bias, dtype=dtype)
    layer.set_mask(_block_mask(n_out, n_in, block, density))
    return layer


@pytest.mark.parametrize("bias", [True, False])
def test_masked_to_block_sparse_to_masked_is_exact(bias):
    masked = _masked_layer(bias=bias)
    sparse = BlockSparseLinear.from_masked(masked, block=(8, 8))
    back = sparse.to_masked()
    assert torch.equal(back.weight_mask, masked.weight_mask)
    assert torch.equal(back.weight, masked.effective_weight().detach())
    assert (back.bias is None) == (not bias) and (not bias or torch.equal(back.bias, masked.bias))
    again = BlockSparseLinear.from_masked(back, block=(8, 8))
    assert torch.equal(again.values, sparse.values)
    assert all(torch.equal(a, b) for a, b in zip(again.pattern.index, sparse.pattern.index))


def test_from_masked_detects_the_block_size_or_raises():
    masked = _masked_layer(64, 32, (16, 16), 0.5)
    detected = BlockSparseLinear.from_masked(masked)
    assert detected.blocksize in ((16, 16), (32, 32))
    assert torch.equal(detected.to_masked().weight_mask, masked.weight_mask)
    assert BlockSparseLinear.applicable(masked.weight_mask) is None
    masked.weight_mask[0, 0] = not bool(masked.weight_mask[0, 0])
    reason = BlockSparseLinear.applicable(masked.weight_mask)
    assert reason is not None and "not block-structured" in reason
    with pytest.raises(ValueError, match="not block-structured"):
        BlockSparseLinear.from_masked(masked)
    with pytest.raises(ValueError, match="partly kept"):
        BlockSparseLinear.from_masked(masked, block=4)
    assert "not 2-D" in BlockSparseLinear.applicable(torch.ones(3, dtype=torch.bool))


def test_block_sparse_layer_computes_the_masked_layer():
    masked = _masked_layer(dtype=torch.float64)
    sparse = BlockSparseLinear.from_masked(masked)
    x = torch.randn(11, 48, dtype=torch.float64)
    torch.testing.assert_close(sparse(x), masked(x))
    torch.testing.assert_close(sparse.to_dense()(x), masked(x))
    assert torch.equal(sparse.dense_weight(), masked.effective_weight().detach())
    assert sparse.nnz == int(masked.weight_mask.sum())
    assert sparse.sparsity == pytest.approx(masked.sparsity)


def test_storage_is_o_kept_blocks():
    layer = BlockSparseLinear.from_dense(torch.randn(320, 400), _block_mask(320, 400, (8, 8), 0.05),
                                         torch.randn(320), block=8)
    tensors = list(layer.parameters()) + list(layer.buffers())
    stored = sum(t.numel() * t.element_size() for t in tensors)
    assert stored == 4 * layer.nnz + 12 * layer.values.shape[0] + 4 * (40 + 50 + 2) + 4 * 320
    assert stored < 0.25 * 320 * 400 * 4


def test_training_step_moves_kept_values_only():
    masked = _masked_layer()
    sparse = BlockSparseLinear.from_masked(masked)
    opt = torch.optim.SGD(sparse.parameters(), lr=0.1)
    before = sparse.values.detach().clone()
    sparse(torch.randn(8, 48)).square().sum().backward()
    opt.step()
    assert sparse.values.shape == before.shape and not torch.equal(sparse.values, before)
    assert torch.equal(sparse.to_masked().weight_mask, masked.weight_mask)


def test_trainable_mask_is_refused():
    layer = MaskedLinear(4, 4, mask_mode="trainable")
    with pytest.raises(ValueError, match="trainable"):
        BlockSparseLinear.from_masked(layer)
    with pytest.raises(TypeError, match="must be a MaskedLinear"):
        BlockSparseLinear.from_masked(torch.nn.Linear(4, 4))


def test_state_dict_round_trip_with_another_pattern_and_block_size():
    source = BlockSparseLinear.from_masked(_masked_layer(block=(4, 8), density=0.2), block=(4, 8))
    target = BlockSparseLinear.from_masked(_masked_layer(block=(8, 8), density=0.7), block=(8, 8))
    assert target.nnz != source.nnz
    state = source.state_dict()
    assert set(state) == {"values", "bias", "crow_indices", "col_indices"}  # no derived index
    target.load_state_dict(state)
    assert target.nnz == source.nnz and target.blocksize == (4, 8)
    assert all(torch.equal(a, b) for a, b in zip(target.pattern.index, source.pattern.index))
    x = torch.randn(5, 48)
    assert torch.equal(target(x), source(x))


def test_state_dict_of_the_wrong_shape_is_refused():
    target = BlockSparseLinear.from_masked(_masked_layer())
    other = BlockSparseLinear.from_masked(_masked_layer(n_in=48, n_out=16), block=8)
    with pytest.raises(RuntimeError, match="the pattern is"):
        target.load_state_dict(other.state_dict())


def test_dtype_moves_keep_int32_index():
    layer = BlockSparseLinear.from_masked(_masked_layer()).double()
    assert layer.values.dtype == torch.float64
    assert all(t.dtype == torch.int32 for t in layer.pattern.index)
    x = torch.randn(4, 48, dtype=torch.float64)
    torch.testing.assert_close(layer(x), layer.to_dense()(x))


def test_constructor_checks():
    pattern = BSRPattern.from_mask(torch.ones(4, 8, dtype=torch.bool), (2, 4))
    with pytest.raises(ValueError, match="pattern has shape"):
        BlockSparseLinear(4, 8, pattern)
    with pytest.raises(TypeError, match="pattern must be"):
        BlockSparseLinear(8, 4, torch.ones(4, 8))
    layer = BlockSparseLinear(8, 4, pattern)
    assert layer.values.shape == (4, 2, 4)
    assert layer.values.abs().max() <= 8 ** -0.5 and layer.bias.abs().max() <= 8 ** -0.5


# ============================================================================
# Triton kernels (marked triton)

DTYPES_triton = [torch.float32, torch.float64, torch.float16]
# (leading dims of x, in_features, out_features, block, block density)
SHAPES_triton = [((1,), 1, 1, (1, 1), 1.0), ((7,), 64, 48, (16, 16), 0.6), ((2, 3), 64, 32, (16, 32), 0.5),
          ((70,), 20, 12, (4, 4), 0.5), ((5,), 35, 18, (6, 5), 0.5), ((9,), 32, 3, (1, 8), 0.6),
          ((0,), 8, 8, (4, 4), 0.5), ((5,), 16, 8, (4, 4), 0.0)]


def _case(lead, n_in, n_out, block, density, dtype):
    keep = torch.rand(n_out // block[0], n_in // block[1]) < density
    if keep.shape[0] > 2 and keep.shape[1] > 2:
        keep[1] = False
        keep[:, -2] = False
    mask = keep.repeat_interleave(block[0], 0).repeat_interleave(block[1], 1)
    pattern = BSRPattern.from_mask(mask, block)
    rnd = lambda *s: torch.randn(*s, dtype=torch.float64).to(dtype)  # noqa: E731
    return pattern, rnd(*lead, n_in), rnd(*pattern.values_shape), rnd(n_out), rnd(*lead, n_out)


@triton_case
@pytest.mark.parametrize("layout", ["contig", "noncontig"])
@pytest.mark.parametrize("dtype", DTYPES_triton, ids=str)
@pytest.mark.parametrize("shape", SHAPES_triton, ids=str)
def test_forward_matches_reference(shape, dtype, layout):
    pattern, x, values, bias, _ = _case(*shape, dtype)
    if layout == "noncontig":
        x = noncontiguous(x)
    for b in (bias, None):
        ours = tk.bsr_linear(x, values, *pattern.index, b)
        torch_own = reference.bsr_linear(x, values, *pattern.index, b)
        ref = reference.bsr_linear(x.double(), values.double(), *pattern.index, b.double() if b is not None else None)
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
    ours = tk.bsr_linear_backward(grad, x_arg, v_arg, *pattern.index, output_mask)
    torch_own = reference.bsr_linear_backward(grad, x, values, *pattern.index, output_mask)
    ref = reference.bsr_linear_backward(grad.double(), x.double(), values.double(), *pattern.index, output_mask)
    assert_backward_within_torch_error(ours, torch_own, ref, output_mask, pattern, grad)


# ============================================================================
# On a GPU (marked gpu)

DTYPES_gpu = [torch.float32, torch.float64, torch.bfloat16]
# (leading dims of x, in_features, out_features, block, block density): the
# tl.dot and broadcast paths, a batch over several 256-row blocks, an
# all-pruned layer, a batch of 0, 3-D x.
SHAPES_gpu = [((1,), 1, 1, (1, 1), 1.0), ((7,), 64, 48, (16, 16), 0.6), ((300,), 128, 64, (4, 4), 0.2),
          ((5,), 16, 8, (4, 4), 0.0), ((0,), 8, 8, (4, 4), 0.5), ((2, 3), 35, 18, (6, 5), 0.5),
          ((256,), 1024, 512, (32, 32), 0.1), ((33,), 64, 7, (1, 8), 0.5)]


def _case_gpu(lead, n_in, n_out, block, density, dtype):
    keep = torch.rand(n_out // block[0], n_in // block[1]) < density
    if keep.shape[0] > 2 and keep.shape[1] > 2:
        keep[1] = False
        keep[:, -2] = False
    mask = keep.repeat_interleave(block[0], 0).repeat_interleave(block[1], 1)
    pattern = BSRPattern.from_mask(mask, block).to("cuda")
    rnd = lambda *s: torch.randn(*s, dtype=torch.float64, device="cuda").to(dtype)  # noqa: E731
    return pattern, dict(x=rnd(*lead, n_in), values=rnd(*pattern.values_shape), bias=rnd(n_out))


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
        pattern, inputs = _case_gpu((33,), 64, 32, (8, 8), 0.3, torch.float32)
        x, values = inputs["x"], inputs["values"].requires_grad_()
        (dvalues,) = torch.autograd.grad(bsr_linear(x, values, pattern).sum(), [values])
        expected = reference.bsr_linear_backward(torch.ones(33, 32, device="cuda"), x, values.detach(), *pattern.index,
                                                 [False, True])[1]
        torch.testing.assert_close(dvalues, expected)
        x = x.requires_grad_()
        (dx,) = torch.autograd.grad(bsr_linear(x, values.detach(), pattern).sum(), [x])
        torch.testing.assert_close(dx, torch.ones(33, 32, device="cuda") @ pattern.scatter(values.detach()))
