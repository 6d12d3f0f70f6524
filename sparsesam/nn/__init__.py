"""Masked layers, drop-in replacement of a model's layers, and export."""
from .masked import MASK_MODES, MaskedConv2d, MaskedLinear
from .sparse_linear import SparseLinear, to_masked, to_sparse
from .sparsify import export, masked_layers, sparsify
from .sparse_conv2d import SparseConv2d
from .dispatch import (EXECUTIONS, DispatchCache, dispatch_cache, execution_summary, resolve_execution,
                       set_dispatch_cache, set_execution)

__all__ = ["MASK_MODES", "MaskedLinear", "MaskedConv2d", "sparsify", "export", "masked_layers", "SparseLinear", "to_sparse", "to_masked",
           "SparseConv2d", "EXECUTIONS", "DispatchCache", "dispatch_cache", "set_dispatch_cache", "set_execution",
           "resolve_execution", "execution_summary"]
from .nm_linear import NMSparseLinear  # noqa: E402  (N:M weights; see nm_linear.py)

__all__ += ["NMSparseLinear"]
