"""Masked layers, drop-in replacement of a model's layers, sparse execution, and export."""
from .masked import MASK_MODES, MaskedConv2d, MaskedLinear
from .csr_linear import CSRLinear, SparseLinear
from .sparsify import export, left_dense, masked_layers, sparsify
from .sparse_conv2d import SparseConv2d
from .bsr_linear import BlockSparseLinear
from .nm_linear import NMSparseLinear
from .dispatch import EXECUTIONS, SPARSE_FORMATS, DispatchCache, dispatch_cache, executions, set_dispatch_cache
from .execution import execution_summary, resolve_execution, set_execution

__all__ = ["MASK_MODES", "MaskedLinear", "MaskedConv2d", "sparsify", "export", "masked_layers", "left_dense",
           "CSRLinear", "SparseLinear", "SparseConv2d", "BlockSparseLinear", "NMSparseLinear", "EXECUTIONS",
           "DispatchCache", "dispatch_cache", "set_dispatch_cache", "set_execution", "resolve_execution",
           "execution_summary", "executions", "SPARSE_FORMATS"]
