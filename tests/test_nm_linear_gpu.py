"""nm_linear on a GPU: the Triton kernels and the CUDA C++ kernels vs sparsesam.reference.

Through the public op (autograd included) with SPARSESAM_BACKEND selecting
the backend, so the CUDA router is covered too. Results must be within about
twice PyTorch's own error versus float64 (tests/tolerance.py). Skipped
without a GPU; the CUDA C++ cases also without a SPARSESAM_CUDA=1 build.
"""
from __future__ import annotations

import pytest
import torch

from sparsesam import reference
from sparsesam.ops import cuda_cpp_available, nm_linear
from sparsesam.pruning.nm import nm_mask
from sparsesam.sparse import NMPattern

from op_cases import outputs_and_grads, to64
from tolerance import assert_within_torch_error

if not torch.cuda.is_available():
    pytest.skip("needs a GPU", allow_module_level=True)

BACKENDS = ["triton", pytest.param("cuda", marks=pytest.mark.skipif(not cuda_cpp_available(),
                                                                    reason="build without the CUDA C++ kernels"))]
DTYPES = [torch.float32, torch.float64, torch.bfloat16]
# (leading dims of x, out_features, n, m, groups): odd sizes, a batch over
# several 256-row blocks, a batch of 0, 3-D x, several N:M.
SHAPES = [((1,), 1, 1, 2, 1), ((7,), 5, 2, 4, 18), ((300,), 65, 1, 8, 16), ((0,), 7, 2, 4, 2),
          ((2, 3), 17, 3, 8, 2), ((256,), 512, 2, 4, 256), ((33,), 9, 15, 16, 3)]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_forward_backward_vs_reference(backend, dtype, shape, monkeypatch):
    monkeypatch.setenv("SPARSESAM_BACKEND", backend)
    lead, n_out, n, m, groups = shape
    pattern = NMPattern.from_mask(nm_mask(torch.rand(n_out, groups * m), n, m), n, m).to("cuda")
    rnd = lambda *s: torch.randn(*s, dtype=torch.float64, device="cuda").to(dtype)  # noqa: E731
    inputs = dict(x=rnd(*lead, groups * m), values=rnd(*pattern.values_shape), bias=rnd(n_out))
    ours, ours_grads = outputs_and_grads(lambda x, values, bias: nm_linear(x, values, pattern, bias), inputs)
    ref_fn = lambda x, values, bias: reference.nm_linear(x, values, *pattern, bias)  # noqa: E731
    torch_own, torch_grads = outputs_and_grads(ref_fn, inputs)
    ref, ref_grads = outputs_and_grads(ref_fn, to64(inputs))
    batch = inputs["x"].shape[:-1].numel()
    assert_within_torch_error("y", ours, torch_own, ref, reduction_size=pattern.in_features)
    for name, sums in (("x", pattern.out_features), ("values", batch), ("bias", batch)):
        assert_within_torch_error(f"d{name}", ours_grads[name], torch_grads[name], ref_grads[name], reduction_size=sums)
