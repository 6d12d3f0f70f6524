"""The Triton nm_linear kernels (sparsesam.triton_kernels.nm_linear) vs sparsesam.reference.

They run on CPU under the Triton interpreter:

    TRITON_INTERPRET=1 python -m pytest -m triton tests/test_triton_nm_linear.py

TRITON_INTERPRET must be set before triton is imported, so the module skips
itself when it is not. Sizes are small (the interpreter runs one program at a
time) but odd: rows longer than one 32-entry block, batches over one and
several blocks, several N:M (n = m - 1 included), odd out_features, in or
out features 0, a batch of 0. float16 stands in for the 16-bit path (the
interpreter cannot do bfloat16 arithmetic). Tolerances follow the
flash-attention rule of tests/tolerance.py.
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
from sparsesam.pruning.nm import nm_mask  # noqa: E402
from sparsesam.sparse import NMPattern  # noqa: E402
from sparsesam.triton_kernels import nm_linear, nm_linear_backward  # noqa: E402

from op_cases import noncontiguous  # noqa: E402
from tolerance import assert_within_torch_error  # noqa: E402

DTYPES = [torch.float32, torch.float64, torch.float16]
# (leading dims of x, out_features, n, m, groups)
SHAPES = [((1,), 1, 1, 2, 1), ((7,), 5, 2, 4, 20), ((2, 3), 17, 3, 8, 2), ((70,), 6, 1, 16, 2),
          ((5,), 3, 15, 16, 1), ((0,), 5, 2, 4, 3), ((4,), 3, 2, 4, 0), ((4,), 0, 1, 4, 2)]


def _case(lead, n_out, n, m, groups, dtype):
    pattern = NMPattern.from_mask(nm_mask(torch.rand(n_out, groups * m), n, m), n, m)
    rnd = lambda *s: torch.randn(*s, dtype=torch.float64).to(dtype)  # noqa: E731
    return pattern, rnd(*lead, groups * m), rnd(*pattern.values_shape), rnd(n_out), rnd(*lead, n_out)


@pytest.mark.parametrize("layout", ["contig", "noncontig"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_forward_matches_reference(shape, dtype, layout):
    pattern, x, values, bias, _ = _case(*shape, dtype)
    if layout == "noncontig":
        x = noncontiguous(x)
    for b in (bias, None):
        ours = nm_linear(x, values, *pattern, b)
        torch_own = reference.nm_linear(x, values, *pattern, b)
        ref = reference.nm_linear(x.double(), values.double(), *pattern, b.double() if b is not None else None)
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
    ours = nm_linear_backward(grad, x_arg, v_arg, *pattern, output_mask)
    torch_own = reference.nm_linear_backward(grad, x, values, *pattern, output_mask)
    ref = reference.nm_linear_backward(grad.double(), x.double(), values.double(), *pattern, output_mask)
    batch = grad.shape[:-1].numel()
    for name, o, t, r, wanted, sums in zip(("dx", "dvalues"), ours, torch_own, ref, output_mask,
                                           (pattern.out_features, batch)):
        if wanted:
            assert_within_torch_error(name, o, t, r.to(torch.float64), reduction_size=sums)
        else:
            assert o.shape == (0,)
