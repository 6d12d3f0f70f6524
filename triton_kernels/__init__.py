"""Triton kernels for sparsesam's ops (the default backend for CUDA tensors).

Every function here has the name and signature of the op it implements, so
``sparsesam.ops._library`` binds it to the op by name (an op with no Triton
kernel here runs its reference). Under
``TRITON_INTERPRET=1`` (set before triton is imported) the same kernels run on
CPU tensors, which is how the tests exercise them without a GPU.
"""
from .masked_conv2d import masked_conv2d, masked_conv2d_backward
from .masked_linear import masked_linear, masked_linear_backward
from .masked_weight import apply_mask, masked_weight_grad
from .sam_step import sam_grad_sq_norm, sam_perturb_, sgd_step_
from .mask_scoring import mask_ascent_, mask_grad_sq_norm, mask_score_grad
from .csr_linear import csr_linear, csr_linear_backward
from .nm_linear import nm_linear, nm_linear_backward
from .bsr_linear import bsr_linear, bsr_linear_backward

__all__ = [
    "apply_mask",
    "masked_weight_grad",
    "masked_linear",
    "masked_linear_backward",
    "masked_conv2d",
    "masked_conv2d_backward",
    "sam_grad_sq_norm",
    "sam_perturb_",
    "sgd_step_",
    "mask_grad_sq_norm",
    "mask_ascent_",
    "mask_score_grad",
    "csr_linear",
    "csr_linear_backward",
    "nm_linear",
    "nm_linear_backward",
    "bsr_linear",
    "bsr_linear_backward",
]
