"""Sparse weight formats for true sparse execution of fixed masks.

:class:`CSRPattern` is the index of a fixed unstructured mask (CSR plus the
transposed index its backward reads); ``sparsesam.ops.sparse_linear`` runs a
linear layer on it and ``sparsesam.nn.SparseLinear`` is the module.
"""
from .csr import CSRPattern

__all__ = ["CSRPattern"]
from .bsr import BLOCK_SIZES, BSRPattern, block_structure_error, largest_blocksize  # noqa: E402

__all__ += ["BSRPattern", "BLOCK_SIZES", "block_structure_error", "largest_blocksize"]
