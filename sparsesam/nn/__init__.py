"""Masked layers, drop-in replacement of a model's layers, and export."""
from .masked import MASK_MODES, MaskedConv2d, MaskedLinear
from .sparse_linear import SparseLinear, to_masked, to_sparse
from .sparsify import export, masked_layers, sparsify

__all__ = ["MASK_MODES", "MaskedLinear", "MaskedConv2d", "sparsify", "export", "masked_layers", "SparseLinear", "to_sparse", "to_masked"]
