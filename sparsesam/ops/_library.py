"""Loading the compiled library and binding CUDA tensors to one backend.

CPU tensors always run the C++ kernels (csrc/cpu). CUDA tensors run the
kernels of one backend, bound for every op at once:

* ``triton`` (default): the kernels in ``sparsesam.triton_kernels``;
* ``cuda``: the CUDA C++ kernels (registered by csrc/cuda in the
  ``sparsesam_cuda`` namespace; needs a build with a GPU or SPARSESAM_CUDA=1);
* ``reference``: ``sparsesam.reference``, pure PyTorch.

The backend is chosen once: from ``SPARSESAM_BACKEND`` when this module is
imported, and afterwards only by :func:`set_backend` or, for a block of code,
the :func:`use_backend` context manager. Nothing reads the environment per call.

Every op of ``csrc/common/schemas.h`` (read through ``sparsesam._C.schemas()``,
the same list the C++ side registers) gets one CUDA kernel here, at import: a
router that calls the op's kernel in the bound backend's table. A backend
module exposes functions named exactly like the ops, with the ops'
signatures; an op a backend has no kernel for (today sparse_conv2d, on
Triton and CUDA C++) runs its reference, named in that op's docstring.
Kernels are looked up on the first CUDA call of each op after a (re)binding,
so importing sparsesam imports neither triton nor the reference.
"""
from __future__ import annotations

import contextlib
import importlib
import os
from typing import Callable, Dict, Iterator, Tuple

import torch

import sparsesam._C as _compiled  # importing it runs the TORCH_LIBRARY registrations

BACKENDS = ("triton", "cuda", "reference")

# Every op name, in schemas.h order: "name(args) -> returns".
OPS: Tuple[str, ...] = tuple(schema.split("(", 1)[0].strip() for schema in _compiled.schemas())


def _checked_name(name, source: str) -> str:
    if not isinstance(name, str):
        raise TypeError(f"{source} must be a string, one of {BACKENDS}, got {type(name).__name__}")
    key = name.strip().lower()
    if key not in BACKENDS:
        raise ValueError(f"{source} must be one of {BACKENDS}, got {name!r}")
    return key


def cuda_cpp_available() -> bool:
    """Whether this build contains the CUDA C++ kernels."""
    return hasattr(torch.ops, "sparsesam_cuda") and hasattr(torch.ops.sparsesam_cuda, "masked_linear")


def _require_cuda_cpp() -> None:
    if not cuda_cpp_available():
        raise RuntimeError("the cuda backend needs the CUDA C++ kernels, which this build lacks; "
                           "reinstall with SPARSESAM_CUDA=1 (or on a machine with a GPU)")


# The bound backend and its kernels, filled op by op on first use.
_bound = _checked_name(os.environ.get("SPARSESAM_BACKEND", "triton"), "SPARSESAM_BACKEND")
_kernels: Dict[str, Callable] = {}


def backend() -> str:
    """The backend CUDA tensors run now."""
    return _bound


def set_backend(name: str) -> str:
    """Bind every op's CUDA kernel to backend ``name`` (one of :data:`BACKENDS`); returns the previous one."""
    global _bound
    name = _checked_name(name, "name")
    if name == "cuda":
        _require_cuda_cpp()
    previous = _bound
    _bound = name
    _kernels.clear()
    return previous


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[str]:
    """``with use_backend("cuda"): ...`` runs CUDA tensors on ``name`` inside the block, then rebinds the previous one."""
    previous = set_backend(name)
    try:
        yield backend()
    finally:
        set_backend(previous)


def _lookup(backend_name: str, op_name: str) -> Callable:
    if backend_name == "cuda":
        _require_cuda_cpp()
        if torch._C._dispatch_has_kernel_for_dispatch_key(f"sparsesam_cuda::{op_name}", "CUDA"):
            return getattr(torch.ops.sparsesam_cuda, op_name).default
    elif backend_name == "triton":
        triton_kernels = importlib.import_module("sparsesam.triton_kernels")
        if hasattr(triton_kernels, op_name):
            return getattr(triton_kernels, op_name)
    return getattr(importlib.import_module("sparsesam.reference"), op_name)


def _bound_kernel(op_name: str) -> Callable:
    found = _kernels.get(op_name)
    if found is None:
        found = _kernels[op_name] = _lookup(_bound, op_name)
    return found


def kernel(op_name: str) -> Callable:
    """The function ``sparsesam::<op_name>`` runs for CUDA tensors under the bound backend."""
    if op_name not in OPS:
        raise ValueError(f"op_name must be one of the ops of csrc/common/schemas.h, got {op_name!r}")
    return _bound_kernel(op_name)


def _register_cuda_router(op_name: str) -> None:
    def route(*args):
        return _bound_kernel(op_name)(*args)

    route.__name__ = f"{op_name}_cuda_router"
    torch.library.register_kernel(f"sparsesam::{op_name}", "cuda", route)


for _op in OPS:
    _register_cuda_router(_op)


def empty_output(like: torch.Tensor) -> torch.Tensor:
    """What an op returns for an output that was not asked for (see schemas.h)."""
    return like.new_empty((0,))


def none_if_empty(t: torch.Tensor, wanted: bool):
    return t if wanted else None
