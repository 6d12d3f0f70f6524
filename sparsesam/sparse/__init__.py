"""Sparse weight formats for true sparse execution of fixed masks.

:class:`CSRPattern` is the index of a fixed unstructured mask (CSR plus the
transposed index its backward reads); ``sparsesam.ops.csr_linear`` runs a
linear layer on it and ``sparsesam.nn.CSRLinear`` is the module.
:class:`BSRPattern` is the block index of a mask that keeps whole blocks
(``sparsesam.ops.bsr_linear``, ``sparsesam.nn.BlockSparseLinear``).
:class:`NMPattern` is the index of a fixed N:M mask (one byte per kept entry);
``sparsesam.ops.nm_linear`` and ``sparsesam.nn.NMSparseLinear`` run it.
"""
from .bsr import BLOCK_SIZES, BSRPattern, block_structure_error, largest_blocksize
from .csr import CSRPattern
from .nm import NMPattern

__all__ = ["CSRPattern", "BSRPattern", "NMPattern", "BLOCK_SIZES", "block_structure_error", "largest_blocksize"]
