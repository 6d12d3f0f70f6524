"""Backend binding (sparsesam/ops/_library.py): chosen once, rebound only on request.

CUDA tensors run the kernels of the bound backend; ``SPARSESAM_BACKEND`` is
read when sparsesam is imported and never again, ``set_backend`` /
``use_backend`` rebind every op at once, and an op a backend has no kernel
for runs its reference. Without a GPU the router itself cannot run, so these
tests check what it would call (``kernel``); the GPU case calls it.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from sparsesam import ops, reference

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True)
def _restore_backend():
    before = ops.backend()
    yield
    ops.set_backend(before)


def test_reference_binds_every_op_to_its_reference():
    with ops.use_backend("reference") as name:
        assert name == "reference" == ops.backend()
        for op in ops.OPS:
            assert ops.kernel(op) is getattr(reference, op), op


def test_use_backend_rebinds_the_previous_backend_on_exit_even_after_an_error():
    before = ops.backend()
    with pytest.raises(KeyError):
        with ops.use_backend("reference"):
            raise KeyError("inside")
    assert ops.backend() == before
    assert ops.set_backend("reference") == before and ops.backend() == "reference"


def test_triton_binds_its_kernels_and_the_reference_where_it_has_none():
    pytest.importorskip("triton")
    import sparsesam.triton_kernels as triton_kernels

    with ops.use_backend("triton"):
        for op in ops.OPS:
            expected = getattr(triton_kernels, op, None) or getattr(reference, op)
            assert ops.kernel(op) is expected, op
        assert ops.kernel("sparse_conv2d") is reference.sparse_conv2d  # no Triton kernel yet


@pytest.mark.skipif(ops.cuda_cpp_available(), reason="this build has the CUDA C++ kernels")
def test_cuda_backend_without_the_cuda_build_is_refused_when_chosen():
    before = ops.backend()
    with pytest.raises(RuntimeError, match="SPARSESAM_CUDA=1"):
        ops.set_backend("cuda")
    assert ops.backend() == before


@pytest.mark.skipif(not ops.cuda_cpp_available(), reason="build without the CUDA C++ kernels (SPARSESAM_CUDA=1)")
def test_cuda_binds_the_cuda_cpp_kernels():
    with ops.use_backend("cuda"):
        assert ops.kernel("masked_linear") is torch.ops.sparsesam_cuda.masked_linear.default
        assert ops.kernel("sparse_conv2d") is reference.sparse_conv2d  # no CUDA C++ kernel yet


@pytest.mark.parametrize("name, error", [("tpu", ValueError), ("", ValueError), (None, TypeError), (3, TypeError)])
def test_a_bad_backend_name_is_refused_and_names_the_argument(name, error):
    before = ops.backend()
    with pytest.raises(error, match="name must be"):
        ops.set_backend(name)
    assert ops.backend() == before


def test_kernel_refuses_an_unknown_op():
    with pytest.raises(ValueError, match="op_name"):
        ops.kernel("masked_linear_v2")


def test_the_environment_is_not_read_per_call(monkeypatch):
    with ops.use_backend("reference"):
        monkeypatch.setenv("SPARSESAM_BACKEND", "triton")
        assert ops.backend() == "reference" and ops.kernel("apply_mask") is reference.apply_mask


def _import_with_backend(value: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, SPARSESAM_BACKEND=value, PYTHONPATH=os.pathsep.join([str(ROOT), *sys.path]))
    code = "import sparsesam.ops as o; print(o.backend())"
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)


def test_sparsesam_backend_is_read_once_at_import():
    done = _import_with_backend(" Reference ")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "reference"
    bad = _import_with_backend("tpu")
    assert bad.returncode != 0 and "SPARSESAM_BACKEND must be one of" in bad.stderr


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_the_cuda_router_runs_the_bound_backend():
    x, w = torch.randn(5, 7, device="cuda", dtype=torch.float64), torch.randn(3, 7, device="cuda", dtype=torch.float64)
    mask = torch.rand(3, 7, device="cuda") > 0.5
    with ops.use_backend("reference"):
        y = ops.masked_linear(x, w, mask)
    torch.testing.assert_close(y, reference.masked_linear(x, w, mask), rtol=0, atol=0)
