"""NMPattern: the fixed N:M sparsity pattern of a weight, as one byte per kept entry.

An N:M mask keeps exactly ``n`` of every group of ``m`` consecutive inputs of
each output row (groups run along the input dimension, as in
``sparsesam.pruning.nm`` and sparse tensor cores); ``in_features`` is a
multiple of ``m`` and ``1 <= n < m <= 16``. A weight ``W`` (out_features x
in_features) pruned by it is kept as

* ``values``: (out_features, in_features * n / m), contiguous: the kept
  entries of each row, group after group, in increasing input order within a
  group (the trainable Parameter of ``NMSparseLinear``), and
* an ``NMPattern``: ``indices``, a uint8 tensor of the same shape holding each
  entry's position in its group (in ``[0, m)``, strictly increasing within a
  group), plus ``n`` and ``m``.

Entry ``(r, g * n + s)`` is the weight at ``(r, g * m + indices[r, g * n + s])``.
No offsets are needed: every row has the same number of entries and every
group the same count, so the kernels run regular loops (sparsesam.ops.nm_linear)
and ``dx`` is column-parallel without a transposed index (a range of groups is
a range of input columns). Storage: ``n / m`` of the dense values plus one
byte of index per kept entry (CSR: four bytes of value and twelve of index).
"""
from __future__ import annotations

from typing import NamedTuple, Optional, Tuple, Union

import torch

from .. import _validate

Tensor = torch.Tensor

MAX_M = 16


def check_nm(n, m) -> Tuple[int, int]:
    """``(n, m)`` as ints, or TypeError/ValueError: an N:M pattern needs ``1 <= n < m <= 16``."""
    for name, value in (("n", n), ("m", m)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if not 2 <= m <= MAX_M:
        raise ValueError(f"m must be in [2, {MAX_M}], got {m}")
    if not 1 <= n < m:
        raise ValueError(f"n must be in [1, m={m}) (n = m keeps every weight: use a dense layer), got {n}")
    return n, m


def _check_mask(mask) -> None:
    if not isinstance(mask, Tensor):
        raise TypeError(f"mask must be a torch.Tensor, got {type(mask).__name__}")
    if mask.dim() != 2:
        raise ValueError(f"mask must have 2 dimensions (out_features, in_features), got shape {tuple(mask.shape)}")
    _validate.finite_tensor("mask", mask)  # NaN != 0 would keep an entry; inf is no keep/prune flag


def group_counts(mask: Tensor, m: int) -> Tensor:
    """Kept entries of every group of ``m`` inputs: (out_features, in_features / m)."""
    out_features, in_features = mask.shape
    return (mask != 0).view(out_features, in_features // m, m).sum(dim=-1)


# The M tried by detect(), in order: 4 first (2:4 is the hardware format, and
# every 1:2 mask is also 2:4), then coarser groups, then 2 for an input
# dimension that only 2 divides.
DETECT_M = (4, 8, 16, 2)


def detect(mask: Tensor, ms=DETECT_M) -> Union[Tuple[int, int], str]:
    """``(n, m)`` for the first ``m`` of ``ms`` for which ``mask`` is exactly N:M
    (every group of ``m`` inputs keeps the same ``n``, ``1 <= n < m``), else a
    sentence saying why none fits."""
    _check_mask(mask)
    out_features, in_features = mask.shape
    if out_features == 0 or in_features == 0:
        return f"the mask is empty (shape {tuple(mask.shape)})"
    reasons = []
    for m in ms:
        if in_features % m:
            reasons.append(f"in_features={in_features} is not a multiple of {m}")
            continue
        counts = group_counts(mask, m)
        lo, hi = int(counts.min()), int(counts.max())
        if lo != hi:
            reasons.append(f"groups of {m} keep between {lo} and {hi} weights")
        elif not 1 <= lo < m:
            reasons.append(f"groups of {m} keep {lo} of {m} weights")
        else:
            return lo, m
    return "the mask is not N:M for any supported M: " + "; ".join(reasons)


class NMPattern(NamedTuple):
    """The uint8 index of a fixed N:M mask; see the module docstring.

    Build it with :meth:`from_mask` (or :meth:`from_indices`); ``(indices, n, m)``
    are passed to the ops in field order.
    """

    indices: Tensor
    n: int
    m: int

    # --- construction ---------------------------------------------------------

    @classmethod
    def from_mask(cls, mask: Tensor, n: Optional[int] = None, m: Optional[int] = None) -> "NMPattern":
        """The pattern of ``mask != 0`` (out_features x in_features), which must be exactly N:M.

        Without ``n`` and ``m`` they are found by :func:`detect`.
        """
        _check_mask(mask)
        if n is None and m is None:
            found = detect(mask)
            if isinstance(found, str):
                raise ValueError(found)
            n, m = found
        elif n is None or m is None:
            raise ValueError("give both n and m, or neither (to detect them)")
        n, m = check_nm(n, m)
        out_features, in_features = mask.shape
        if in_features % m:
            raise ValueError(f"mask has in_features={in_features}, not a multiple of m={m}")
        keep = (mask != 0).view(out_features, in_features // m, m)
        counts = keep.sum(dim=-1)
        if bool((counts != n).any()):
            raise ValueError(f"mask is not {n}:{m}: its groups of {m} inputs keep between {int(counts.min())} and "
                             f"{int(counts.max())} weights")
        # A stable sort of "pruned?" puts each group's kept positions first, in increasing order.
        kept = torch.sort((~keep).to(torch.uint8), dim=-1, stable=True).indices[..., :n]
        return cls(kept.to(torch.uint8).reshape(out_features, in_features // m * n).contiguous(), n, m)

    @classmethod
    def from_indices(cls, indices: Tensor, n: int, m: int) -> "NMPattern":
        """The pattern of an index (e.g. one loaded from a checkpoint), checked."""
        n, m = check_nm(n, m)
        if not isinstance(indices, Tensor):
            raise TypeError(f"indices must be a torch.Tensor, got {type(indices).__name__}")
        if indices.dtype != torch.uint8 or indices.dim() != 2:
            raise TypeError(f"indices must be a 2-D uint8 tensor, got {indices.dtype} of shape {tuple(indices.shape)}")
        if indices.shape[1] % n:
            raise ValueError(f"indices has {indices.shape[1]} entries per row, not a multiple of n={n}")
        if indices.numel():
            idx = indices.view(indices.shape[0], -1, n).long()
            if int(idx.max()) >= m:
                raise ValueError(f"indices must lie in [0, m={m})")
            if n > 1 and bool((idx[..., 1:] <= idx[..., :-1]).any()):
                raise ValueError("indices must be strictly increasing within each group")
        return cls(indices.contiguous(), n, m)

    # --- shape ------------------------------------------------------------------

    @property
    def out_features(self) -> int:
        return self.indices.shape[0]

    @property
    def groups(self) -> int:
        return self.indices.shape[1] // self.n

    @property
    def in_features(self) -> int:
        return self.groups * self.m

    @property
    def shape(self) -> Tuple[int, int]:
        return (self.out_features, self.in_features)

    @property
    def values_shape(self) -> Tuple[int, int]:
        """The shape of this pattern's values: (out_features, in_features * n / m)."""
        return tuple(self.indices.shape)

    @property
    def nnz(self) -> int:
        return self.indices.numel()

    @property
    def density(self) -> float:
        """Fraction of the weight that is kept (n / m)."""
        return self.n / self.m

    @property
    def device(self) -> torch.device:
        return self.indices.device

    def nbytes(self) -> int:
        """Bytes of the index (one per kept entry; the values come on top)."""
        return self.indices.numel() * self.indices.element_size()

    # --- conversions ------------------------------------------------------------

    def _grouped_index(self) -> Tensor:
        return self.indices.long().view(self.out_features, self.groups, self.n)

    def gather(self, weight: Tensor) -> Tensor:
        """The kept entries of a dense ``weight``: the (contiguous) values of this pattern."""
        if not isinstance(weight, Tensor):
            raise TypeError(f"weight must be a torch.Tensor, got {type(weight).__name__}")
        if tuple(weight.shape) != self.shape:
            raise ValueError(f"weight has shape {tuple(weight.shape)} but the pattern is {self.shape}")
        grouped = weight.reshape(self.out_features, self.groups, self.m)
        return grouped.gather(-1, self._grouped_index()).reshape(self.values_shape).contiguous()

    def scatter(self, values: Tensor) -> Tensor:
        """The dense weight with ``values`` at the kept entries and exact zeros elsewhere."""
        if not isinstance(values, Tensor):
            raise TypeError(f"values must be a torch.Tensor, got {type(values).__name__}")
        if tuple(values.shape) != self.values_shape:
            raise ValueError(f"values has shape {tuple(values.shape)}; the pattern's values are {self.values_shape}")
        dense = values.new_zeros(self.out_features, self.groups, self.m)
        dense.scatter_(-1, self._grouped_index(), values.reshape(self.out_features, self.groups, self.n))
        return dense.view(self.shape)

    def mask(self) -> Tensor:
        """The dense bool mask of this pattern."""
        keep = torch.zeros(self.out_features, self.groups, self.m, dtype=torch.bool, device=self.device)
        keep.scatter_(-1, self._grouped_index(), True)
        return keep.view(self.shape)

    def to(self, device) -> "NMPattern":
        return NMPattern(self.indices.to(device), self.n, self.m)
