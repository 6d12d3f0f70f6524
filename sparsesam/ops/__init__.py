"""The typed Python face of every sparsesam op.

One module per op (or op family); each checks its arguments (clear errors
naming the argument), registers the fake impl and autograd. CUDA tensors run
the backend bound once for every op (``SPARSESAM_BACKEND`` at import, then
:func:`set_backend` / the :func:`use_backend` context manager; see
``ops/_library.py``). Callers never pick kernels.
"""
from ._library import BACKENDS, OPS, backend, cuda_cpp_available, kernel, set_backend, use_backend
from .masked_conv2d import masked_conv2d
from .masked_linear import masked_linear
from .masked_weight import apply_mask, masked_weight_grad
from .sam_step import sam_grad_sq_norm, sam_perturb_, sgd_step_
from .mask_scoring import mask_ascent_, mask_grad_sq_norm, mask_score_grad
from .csr_linear import csr_linear, sparse_linear
from .sparse_conv2d import sparse_conv2d
from .nm_linear import nm_linear
from .bsr_linear import bsr_linear

__all__ = [
    "BACKENDS",
    "OPS",
    "backend",
    "set_backend",
    "use_backend",
    "kernel",
    "cuda_cpp_available",
    "apply_mask",
    "masked_weight_grad",
    "masked_linear",
    "masked_conv2d",
    "sam_grad_sq_norm",
    "sam_perturb_",
    "sgd_step_",
    "mask_grad_sq_norm",
    "mask_ascent_",
    "mask_score_grad",
    "csr_linear",
    "sparse_linear",
    "sparse_conv2d",
    "nm_linear",
    "bsr_linear",
]
