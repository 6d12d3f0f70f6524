"""The backends an op's tests run on, as marks that skip with the reason.

Every op file under tests/ops/ holds all of that op's tests: the reference
and the CPU C++ kernels (always run), the Triton kernels (marked ``triton``:
``make test-triton`` runs them on CPU under ``TRITON_INTERPRET=1``, which
must be set before triton is imported) and the kernels on a GPU (marked
``gpu``: the Triton and CUDA C++ kernels on device, run by
scripts/gpu_check.sh). ``make test`` collects them all and skips what this
machine cannot run, saying why.

``OP_BACKENDS`` parametrizes a test over all four (reference, CPU C++,
Triton under the interpreter, CUDA C++); ``backend_op`` gives the test the
op's kernel in that backend and the device its inputs live on. ``tk`` is
``sparsesam.triton_kernels``, imported on first use so that a machine
without triton still collects every file.
"""
from __future__ import annotations

import importlib
import importlib.util
import os

import pytest
import torch

from sparsesam import reference
from sparsesam.ops import cuda_cpp_available

TRITON_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
HAS_TRITON = importlib.util.find_spec("triton") is not None
HAS_GPU = torch.cuda.is_available()


def _marked(*marks):
    def apply(test):
        for mark in reversed(marks):
            test = mark(test)
        return test

    return apply


# The Triton kernels on CPU tensors, through the interpreter.
triton_case = _marked(
    pytest.mark.triton,
    pytest.mark.skipif(not TRITON_INTERPRET, reason="needs TRITON_INTERPRET=1 set before triton is imported "
                                                    "(make test-triton)"),
    pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed"),
)

# The public op on CUDA tensors, through the bound backend (Triton or CUDA C++).
gpu_case = _marked(pytest.mark.gpu, pytest.mark.skipif(not HAS_GPU, reason="needs a GPU"))

# The CUDA C++ kernels (torch.ops.sparsesam_cuda) called directly on a GPU.
cuda_cpp_case = _marked(
    pytest.mark.gpu,
    pytest.mark.skipif(not (HAS_GPU and cuda_cpp_available()),
                       reason="needs a GPU and a build with the CUDA C++ kernels (SPARSESAM_CUDA=1)"),
)

# The backends a GPU test binds (sparsesam.ops.use_backend); cuda only in a build that has it.
GPU_BACKENDS = ["triton", pytest.param("cuda", marks=pytest.mark.skipif(
    not cuda_cpp_available(), reason="build without the CUDA C++ kernels (SPARSESAM_CUDA=1)"))]


# reference and cpu always run; triton under the interpreter (CPU tensors); cuda on a GPU.
OP_BACKENDS = [
    "reference",
    "cpu",
    pytest.param("triton", marks=[
        pytest.mark.triton,
        pytest.mark.skipif(not TRITON_INTERPRET, reason="needs TRITON_INTERPRET=1 set before triton is imported "
                                                        "(make test-triton)"),
        pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")]),
    pytest.param("cuda", marks=[
        pytest.mark.gpu,
        pytest.mark.skipif(not (HAS_GPU and cuda_cpp_available()),
                           reason="needs a GPU and a build with the CUDA C++ kernels (SPARSESAM_CUDA=1)")]),
]


def backend_op(backend: str, op_name: str):
    """``(kernel, device)``: ``op_name`` as ``backend`` implements it, and where its inputs must live.

    Skips (saying so) where the backend has no kernel for the op: CUDA
    tensors then run the reference (sparsesam/ops/_library.py).
    """
    if backend == "reference":
        return getattr(reference, op_name), torch.device("cpu")
    if backend == "cpu":
        return getattr(torch.ops.sparsesam, op_name).default, torch.device("cpu")
    if backend == "triton":
        if not hasattr(tk, op_name):
            pytest.skip(f"no Triton kernel for {op_name}: CUDA tensors run its reference")
        return getattr(tk, op_name), torch.device("cpu")  # the interpreter runs on CPU tensors
    if backend == "cuda":
        if not torch._C._dispatch_has_kernel_for_dispatch_key(f"sparsesam_cuda::{op_name}", "CUDA"):
            pytest.skip(f"no CUDA C++ kernel for {op_name}: CUDA tensors run its reference")
        return getattr(torch.ops.sparsesam_cuda, op_name).default, torch.device("cuda")
    raise ValueError(f"backend must be one of reference, cpu, triton, cuda; got {backend!r}")


class _TritonKernels:
    """``sparsesam.triton_kernels`` and its submodules, imported when first touched."""

    def __getattr__(self, name: str):
        package = importlib.import_module("sparsesam.triton_kernels")
        if hasattr(package, name):
            return getattr(package, name)
        try:
            return importlib.import_module(f"sparsesam.triton_kernels.{name}")
        except ModuleNotFoundError:
            raise AttributeError(f"sparsesam.triton_kernels has no {name}") from None


tk = _TritonKernels()

