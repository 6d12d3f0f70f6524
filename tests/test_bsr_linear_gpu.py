"""bsr_linear on a GPU: the Triton kernels and the CUDA C++ kernels vs sparsesam.reference.

Through the public op (autograd included) with SPARSESAM_BACKEND selecting
the backend, so the CUDA router is covered too. Results must be within about
twice PyTorch's own error versus float64 (tests/tolerance.py). Skipped
without a GPU; the CUDA C++ cases also without a SPARSESAM_CUDA=1 build.
"""
from __future__ import annotations

import pytest
import torch

from sparsesam import reference
from sparsesam.ops import bsr_linear, cuda_cpp_available
from sparsesam.sparse import BSRPattern

from op_cases import outputs_and_grads, to64
from tolerance import assert_within_torch_error

if not torch.cuda.is_available():
    pytest.skip("needs a GPU", allow_module_level=True)

BACKENDS = ["triton", pytest.param("cuda", marks=pytest.mark.skipif(not cuda_cpp_available(),
                                                                    reason="build without the CUDA C++ kernels"))]
DTYPES = [torch.float32, torch.float64, torch.bfloat16]
# (leading dims of x, in_features, out_features, block, block density): the
# tl.dot and broadcast paths, a batch over several 256-row blocks, an
# all-pruned layer, a batch of 0, 3-D x.
SHAPES = [((1,), 1, 1, (1, 1), 1.0), ((7,), 64, 48, (16, 16), 0.6), ((300,), 128, 64, (4, 4), 0.2),
          ((5,), 16, 8, (4, 4), 0.0), ((0,), 8, 8, (4, 4), 0.5), ((2, 3), 35, 18, (6, 5), 0.5),
          ((256,), 1024, 512, (32, 32), 0.1), ((33,), 64, 7, (1, 8), 0.5)]


def _case(lead, n_in, n_out, block, density, dtype):
    keep = torch.rand(n_out // block[0], n_in // block[1]) < density
    if keep.shape[0] > 2 and keep.shape[1] > 2:
        keep[1] = False
        keep[:, -2] = False
    mask = keep.repeat_interleave(block[0], 0).repeat_interleave(block[1], 1)
    pattern = BSRPattern.from_mask(mask, block).to("cuda")
    rnd = lambda *s: torch.randn(*s, dtype=torch.float64, device="cuda").to(dtype)  # noqa: E731
    return pattern, dict(x=rnd(*lead, n_in), values=rnd(*pattern.values_shape), bias=rnd(n_out))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_forward_backward_vs_reference(backend, dtype, shape, monkeypatch):
    monkeypatch.setenv("SPARSESAM_BACKEND", backend)
    torch.manual_seed(0)
    pattern, inputs = _case(*shape, dtype)
    ours, ours_grads = outputs_and_grads(lambda x, values, bias: bsr_linear(x, values, pattern, bias), inputs)
    ref_fn = lambda x, values, bias: reference.bsr_linear(x, values, *pattern.index, bias)  # noqa: E731
    torch_own, torch_grads = outputs_and_grads(ref_fn, inputs)
    ref, ref_grads = outputs_and_grads(ref_fn, to64(inputs))
    batch = inputs["x"].numel() // max(pattern.in_features, 1)
    assert_within_torch_error("y", ours, torch_own, ref, reduction_size=pattern.in_features)
    for name, sums in (("x", pattern.out_features), ("values", batch), ("bias", batch)):
        assert_within_torch_error(f"d{name}", ours_grads[name], torch_grads[name], ref_grads[name], reduction_size=sums)


@pytest.mark.parametrize("backend", BACKENDS)
def test_only_one_gradient_reads_only_its_inputs(backend, monkeypatch):
    monkeypatch.setenv("SPARSESAM_BACKEND", backend)
    pattern, inputs = _case((33,), 64, 32, (8, 8), 0.3, torch.float32)
    x, values = inputs["x"], inputs["values"].requires_grad_()
    (dvalues,) = torch.autograd.grad(bsr_linear(x, values, pattern).sum(), [values])
    expected = reference.bsr_linear_backward(torch.ones(33, 32, device="cuda"), x, values.detach(), *pattern.index,
                                             [False, True])[1]
    torch.testing.assert_close(dvalues, expected)
    x = x.requires_grad_()
    (dx,) = torch.autograd.grad(bsr_linear(x, values.detach(), pattern).sum(), [x])
    torch.testing.assert_close(dx, torch.ones(33, 32, device="cuda") @ pattern.scatter(values.detach()))
