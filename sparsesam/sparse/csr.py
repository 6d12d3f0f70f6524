"""CSRPattern: the fixed sparsity pattern of a weight, as CSR plus its transposed index.

A weight ``W`` (out_features x in_features) pruned by a fixed mask is kept as

* ``values``: ``W`` at the kept entries in row-major (CSR) order, the only
  floating state (the trainable Parameter of ``CSRLinear``), and
* a ``CSRPattern``, five int32 tensors built once from the mask:

  - ``crow_indices`` (out_features + 1): where each row's entries start in ``values``;
  - ``col_indices`` (nnz): the column of each entry, increasing within a row;
  - ``ccol_indices`` (in_features + 1): where each column's entries start in
    the transposed (column-major) order;
  - ``row_indices`` (nnz): the row of each entry, in that transposed order;
  - ``csr_positions`` (nnz): where that entry sits in ``values``.

The forward reads the CSR half (a row-parallel SpMM); the backward reads the
transposed half for ``dx`` (column-parallel: every input column is summed by
one task, so there are no atomics and no scatter) and the CSR half for the
weight gradient, computed only at kept entries (an SDDMM). Storage grows with
nnz: 4 bytes of values and 12 of index per kept entry, plus
``4 * (out_features + in_features + 2)`` bytes; no dense mask is kept.

Indices are int32: a pattern with 2^31 entries or more (8 GiB of float32
values) is refused.
"""
from __future__ import annotations

from typing import NamedTuple, Tuple

import torch

from .. import _validate

Tensor = torch.Tensor

_INT32_LIMIT = 2**31 - 1


class CSRPattern(NamedTuple):
    """The int32 index of a fixed unstructured mask; see the module docstring.

    Build it with :meth:`from_mask` (or :meth:`from_csr`); its tensors are
    passed to the ops in field order.
    """

    crow_indices: Tensor
    col_indices: Tensor
    ccol_indices: Tensor
    row_indices: Tensor
    csr_positions: Tensor

    # --- construction ---------------------------------------------------------

    @classmethod
    def from_mask(cls, mask: Tensor) -> "CSRPattern":
        """The pattern of ``mask != 0`` for a 2-D mask (out_features x in_features)."""
        if not isinstance(mask, Tensor):
            raise TypeError(f"mask must be a torch.Tensor, got {type(mask).__name__}")
        if mask.dim() != 2:
            raise ValueError(f"mask must have 2 dimensions (out_features, in_features), got shape {tuple(mask.shape)}")
        _validate.finite_tensor("mask", mask)  # NaN != 0 would keep an entry; inf is no keep/prune flag
        out_features, in_features = mask.shape
        _check_int32(out_features, in_features, int(torch.count_nonzero(mask)))
        rows, cols = (mask != 0).nonzero(as_tuple=True)  # row-major: the CSR order
        crow = _offsets(rows, out_features)
        return cls._with_transposed(crow, cols, rows, in_features)

    @classmethod
    def from_csr(cls, crow_indices: Tensor, col_indices: Tensor, in_features: int) -> "CSRPattern":
        """The pattern of a CSR index (e.g. one loaded from a checkpoint), checked and completed.

        Columns must be strictly increasing within each row (no duplicates).
        """
        for name, t in (("crow_indices", crow_indices), ("col_indices", col_indices)):
            if not isinstance(t, Tensor):
                raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
            if t.dtype not in (torch.int32, torch.int64) or t.dim() != 1:
                raise TypeError(f"{name} must be a 1-D int32 or int64 tensor, got {t.dtype} of shape {tuple(t.shape)}")
        if not isinstance(in_features, int) or in_features < 0:
            raise ValueError(f"in_features must be a non-negative int, got {in_features!r}")
        if crow_indices.numel() < 1:
            raise ValueError("crow_indices must have out_features + 1 >= 1 entries")
        crow, col = crow_indices.long(), col_indices.long()
        out_features, nnz = crow.numel() - 1, col.numel()
        _check_int32(out_features, in_features, nnz)
        counts = crow.diff()
        if int(crow[0]) != 0 or int(crow[-1]) != nnz or bool((counts < 0).any()):
            raise ValueError(f"crow_indices must go from 0 to nnz={nnz} without decreasing")
        if nnz and (int(col.min()) < 0 or int(col.max()) >= in_features):
            raise ValueError(f"col_indices must lie in [0, in_features={in_features})")
        rows = torch.repeat_interleave(torch.arange(out_features, device=crow.device), counts)
        same_row = rows[1:] == rows[:-1]
        if bool((same_row & (col[1:] <= col[:-1])).any()):
            raise ValueError("col_indices must be strictly increasing within each row")
        return cls._with_transposed(crow, col, rows, in_features)

    @classmethod
    def _with_transposed(cls, crow: Tensor, cols: Tensor, rows: Tensor, in_features: int) -> "CSRPattern":
        # A stable sort by column keeps rows increasing within each column.
        order = torch.argsort(cols, stable=True)
        i32 = lambda t: t.to(torch.int32).contiguous()  # noqa: E731
        return cls(i32(crow), i32(cols), i32(_offsets(cols, in_features)), i32(rows[order]), i32(order))

    # --- shape ------------------------------------------------------------------

    @property
    def out_features(self) -> int:
        return self.crow_indices.numel() - 1

    @property
    def in_features(self) -> int:
        return self.ccol_indices.numel() - 1

    @property
    def shape(self) -> Tuple[int, int]:
        return (self.out_features, self.in_features)

    @property
    def nnz(self) -> int:
        return self.col_indices.numel()

    @property
    def density(self) -> float:
        """Fraction of the weight that is kept."""
        return self.nnz / max(self.out_features * self.in_features, 1)

    @property
    def device(self) -> torch.device:
        return self.crow_indices.device

    def nbytes(self) -> int:
        """Bytes of the index (the values come on top)."""
        return sum(t.numel() * t.element_size() for t in self)

    # --- conversions ------------------------------------------------------------

    def entry_rows(self) -> Tensor:
        """The row of each entry, in CSR order (int64)."""
        counts = self.crow_indices.diff().long()
        return torch.repeat_interleave(torch.arange(self.out_features, device=self.device), counts)

    def gather(self, weight: Tensor) -> Tensor:
        """The kept entries of a dense ``weight``, in CSR order (the ``values`` of this pattern)."""
        if not isinstance(weight, Tensor):
            raise TypeError(f"weight must be a torch.Tensor, got {type(weight).__name__}")
        if tuple(weight.shape) != self.shape:
            raise ValueError(f"weight has shape {tuple(weight.shape)} but the pattern is {self.shape}")
        return weight[self.entry_rows(), self.col_indices.long()]

    def scatter(self, values: Tensor) -> Tensor:
        """The dense weight with ``values`` at the kept entries and exact zeros elsewhere."""
        if not isinstance(values, Tensor):
            raise TypeError(f"values must be a torch.Tensor, got {type(values).__name__}")
        if values.shape != (self.nnz,):
            raise ValueError(f"values has shape {tuple(values.shape)}; the pattern has nnz={self.nnz}")
        dense = values.new_zeros(self.shape)
        dense[self.entry_rows(), self.col_indices.long()] = values
        return dense

    def mask(self) -> Tensor:
        """The dense bool mask of this pattern."""
        keep = torch.zeros(self.shape, dtype=torch.bool, device=self.device)
        keep[self.entry_rows(), self.col_indices.long()] = True
        return keep

    def to(self, device) -> "CSRPattern":
        return CSRPattern(*(t.to(device) for t in self))


def _offsets(group: Tensor, length: int) -> Tensor:
    """length + 1 offsets: where each group starts when entries are ordered by ``group``."""
    counts = torch.bincount(group, minlength=length) if group.numel() else group.new_zeros(length)
    return torch.cat([counts.new_zeros(1), counts.cumsum(0)])


def _check_int32(out_features: int, in_features: int, nnz: int) -> None:
    if max(out_features, in_features, nnz) > _INT32_LIMIT:
        raise ValueError(
            f"a CSRPattern uses int32 indices: out_features={out_features}, in_features={in_features} and "
            f"nnz={nnz} must each stay below 2^31"
        )
