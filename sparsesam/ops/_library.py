"""Loading the compiled library and routing CUDA tensors to a backend.

CPU tensors always run the C++ kernels (csrc/cpu). For CUDA tensors the
backend is chosen at call time by ``SPARSESAM_BACKEND``:

* ``triton`` (default): the kernels in ``sparsesam.triton_kernels``;
* ``cuda``: the CUDA C++ kernels (registered by csrc/cuda in the
  ``sparsesam_cuda`` namespace; needs a build with a GPU or SPARSESAM_CUDA=1);
* ``reference``: ``sparsesam.reference``, pure PyTorch.

Every backend module exposes functions named exactly like the ops, with the
ops' signatures, so the router below is one ``getattr``.
"""
from __future__ import annotations

import importlib
import os
from typing import Callable

import torch

import sparsesam._C  # noqa: F401  (runs the TORCH_LIBRARY registrations)

BACKENDS = ("triton", "cuda", "reference")


def backend() -> str:
    """The backend CUDA tensors use now (``SPARSESAM_BACKEND``, default triton)."""
    name = os.environ.get("SPARSESAM_BACKEND", "triton").strip().lower()
    if name not in BACKENDS:
        raise ValueError(f"SPARSESAM_BACKEND must be one of {BACKENDS}, got {name!r}")
    return name


def cuda_cpp_available() -> bool:
    """Whether this build contains the CUDA C++ kernels."""
    return hasattr(torch.ops, "sparsesam_cuda") and hasattr(torch.ops.sparsesam_cuda, "masked_linear")


def _cuda_impl(op_name: str) -> Callable:
    name = backend()
    if name == "reference":
        return getattr(importlib.import_module("sparsesam.reference"), op_name)
    if name == "cuda":
        if not cuda_cpp_available():
            raise RuntimeError(
                "SPARSESAM_BACKEND=cuda but this build has no CUDA C++ kernels; "
                "reinstall with SPARSESAM_CUDA=1 (or on a machine with a GPU)"
            )
        return getattr(torch.ops.sparsesam_cuda, op_name)
    return getattr(importlib.import_module("sparsesam.triton_kernels"), op_name)


def register_cuda_router(op_name: str) -> None:
    """Bind ``sparsesam::<op_name>`` on CUDA to whichever backend is selected."""

    def route(*args):
        return _cuda_impl(op_name)(*args)

    route.__name__ = f"{op_name}_cuda_router"
    torch.library.register_kernel(f"sparsesam::{op_name}", "cuda", route)


def empty_output(like: torch.Tensor) -> torch.Tensor:
    """What an op returns for an output that was not asked for (see schemas.h)."""
    return like.new_empty((0,))


def none_if_empty(t: torch.Tensor, wanted: bool):
    return t if wanted else None
