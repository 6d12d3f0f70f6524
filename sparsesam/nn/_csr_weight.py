"""CSRWeight: what CSRLinear and SparseConv2d share, a weight kept as ``values`` at a fixed CSRPattern.

The layer holds ``values`` (a Parameter of nnz entries) and the pattern's five
int32 tensors as buffers. Only the CSR half (``crow_indices``,
``col_indices``) is saved; the transposed half is derived and rebuilt on
load, so a checkpoint of another pattern (another nnz) loads into a layer of
the same shape, and so does a checkpoint of the layer in another form
(:mod:`._checkpoint_forms`). Subclasses say what the pattern's shape must be
through :attr:`pattern_shape` (rows, columns), and the dense weight's through
:attr:`weight_shape`.
"""
from __future__ import annotations

from typing import Tuple

from torch import nn

from ..sparse.csr import CSRPattern
from ._checkpoint_forms import sparse_layer_state

_CSR_BUFFERS = ("crow_indices", "col_indices")
_TRANSPOSED_BUFFERS = ("ccol_indices", "row_indices", "csr_positions")


def check_pattern(pattern, expected: Tuple[int, int], what: str) -> None:
    """TypeError/ValueError unless ``pattern`` is a CSRPattern of shape ``expected`` (described by ``what``)."""
    if not isinstance(pattern, CSRPattern):
        raise TypeError(f"pattern must be a sparsesam.sparse.CSRPattern, got {type(pattern).__name__}")
    if pattern.shape != expected:
        raise ValueError(f"pattern has shape {pattern.shape}; expected {what} = {expected}")


class CSRWeight(nn.Module):
    """Mixin for a module whose weight is ``values`` at the entries of a fixed :class:`CSRPattern`."""

    # A subclass defines ``pattern_shape``: the (rows, columns) its pattern must have.

    def _set_pattern(self, pattern: CSRPattern) -> None:
        for name in _CSR_BUFFERS:
            self.register_buffer(name, getattr(pattern, name))
        for name in _TRANSPOSED_BUFFERS:  # derived: not saved, rebuilt on load
            self.register_buffer(name, getattr(pattern, name), persistent=False)

    @property
    def pattern(self) -> CSRPattern:
        return CSRPattern(*(getattr(self, name) for name in CSRPattern._fields))

    @property
    def nnz(self) -> int:
        return self.values.numel()

    @property
    def sparsity(self) -> float:
        """Fraction of the weight that is pruned."""
        return 1.0 - self.pattern.density

    @staticmethod
    def _index_entries(pattern: CSRPattern):
        return {name: getattr(pattern, name) for name in _CSR_BUFFERS}

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        # A checkpoint of this layer in another form (dense, BSR, N:M) is taken to CSR first.
        state_dict = sparse_layer_state(self, "csr", state_dict, prefix, error_msgs)
        if state_dict is None:
            return
        crow, col = state_dict.get(prefix + "crow_indices"), state_dict.get(prefix + "col_indices")
        if crow is not None and col is not None:
            # Another pattern may come with another nnz: take it, resize values,
            # then let nn.Module copy values and bias in as usual.
            rows, cols = self.pattern_shape
            try:
                pattern = CSRPattern.from_csr(crow, col, cols)
            except (TypeError, ValueError) as err:
                error_msgs.append(f"{prefix}crow_indices/col_indices: {err}")
                return
            if pattern.out_features != rows:
                error_msgs.append(f"{prefix}crow_indices: the pattern has {pattern.out_features} rows, the layer {rows}")
                return
            self._set_pattern(pattern.to(self.crow_indices.device))
            if self.values.numel() != pattern.nnz:
                self.values.data = self.values.data.new_empty(pattern.nnz)
            state_dict = dict(state_dict)
            for name in _CSR_BUFFERS:  # already taken (and converted to int32)
                state_dict[prefix + name] = getattr(self, name)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)
