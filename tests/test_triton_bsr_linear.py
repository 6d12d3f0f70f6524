"""The Triton bsr_linear kernels (sparsesam.triton_kernels.bsr_linear) vs sparsesam.reference.

They run on CPU under the Triton interpreter:

    TRITON_INTERPRET=1 python -m pytest -m triton tests/test_triton_bsr_linear.py

TRITON_INTERPRET must be set before triton is imported, so the module skips
itself when it is not. Block sizes cover both paths of the kernels: tl.dot
(blocks of 16 x 16 and more, here 16x16 and 16x32) and the broadcast product
(4x4, 6x5, 1x8); batches over one and several 16..64-row blocks, empty block
rows and columns, an all-pruned layer, a batch of 0. float16 stands in for the
16-bit path (the interpreter cannot do bfloat16 arithmetic). Tolerances follow
the flash-attention rule of tests/tolerance.py.
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
from sparsesam.sparse import BSRPattern  # noqa: E402
from sparsesam.triton_kernels import bsr_linear, bsr_linear_backward  # noqa: E402

from op_cases import noncontiguous  # noqa: E402
from tolerance import assert_within_torch_error  # noqa: E402

DTYPES = [torch.float32, torch.float64, torch.float16]
# (leading dims of x, in_features, out_features, block, block density)
SHAPES = [((1,), 1, 1, (1, 1), 1.0), ((7,), 64, 48, (16, 16), 0.6), ((2, 3), 64, 32, (16, 32), 0.5),
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


@pytest.mark.parametrize("layout", ["contig", "noncontig"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_forward_matches_reference(shape, dtype, layout):
    pattern, x, values, bias, _ = _case(*shape, dtype)
    if layout == "noncontig":
        x = noncontiguous(x)
    for b in (bias, None):
        ours = bsr_linear(x, values, *pattern.index, b)
        torch_own = reference.bsr_linear(x, values, *pattern.index, b)
        ref = reference.bsr_linear(x.double(), values.double(), *pattern.index, b.double() if b is not None else None)
        assert_within_torch_error("y", ours, torch_own, ref, reduction_size=pattern.in_features)


@pytest.mark.parametrize("output_mask", list(itertools.product([True, False], repeat=2)), ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_backward_matches_reference(shape, dtype, output_mask):
    pattern, x, values, _, grad = _case(*shape, dtype)
    grad = noncontiguous(grad)
    # What autograd did not save arrives as a zero-stride placeholder, never read.
    x_arg = x if output_mask[1] else torch.zeros((), dtype=dtype).expand(x.shape)
    v_arg = values if output_mask[0] else torch.zeros((), dtype=dtype).expand(values.shape)
    ours = bsr_linear_backward(grad, x_arg, v_arg, *pattern.index, output_mask)
    torch_own = reference.bsr_linear_backward(grad, x, values, *pattern.index, output_mask)
    ref = reference.bsr_linear_backward(grad.double(), x.double(), values.double(), *pattern.index, output_mask)
    batch = grad.numel() // max(pattern.out_features, 1)
    for name, o, t, r, wanted, sums in zip(("dx", "dvalues"), ours, torch_own, ref, output_mask,
                                           (pattern.out_features, batch)):
        if wanted:
            assert_within_torch_error(name, o, t, r.to(torch.float64), reduction_size=sums)
        else:
            assert o.shape == (0,)
