"""Deprecated module path of :mod:`sparsesam.nn.csr_linear`.

The CSR layer's module was ``sparsesam/nn/sparse_linear.py`` before the CSR pieces were named ``csr_*``
("sparse" now names the family of formats: CSR, BSR, N:M). Importing this path still works, so code and
pickles that name ``sparsesam.nn.sparse_linear.CSRLinear`` keep loading, but it warns.
"""
import warnings

from .csr_linear import CSRLinear, SparseLinear

warnings.warn("sparsesam.nn.sparse_linear is deprecated: import CSRLinear from sparsesam.nn "
              "(or sparsesam.nn.csr_linear)", DeprecationWarning, stacklevel=2)

__all__ = ["CSRLinear", "SparseLinear"]
