"""BSRPattern: the fixed pattern of a block-structured weight, as BSR plus its transposed block index.

A weight ``W`` (out_features x in_features) whose mask keeps or prunes whole
``bh x bw`` blocks (``bh`` dividing out_features, ``bw`` dividing
in_features) is kept as

* ``values``: the kept blocks, shape ``(nblocks, bh, bw)``, contiguous, in
  block-row-major (BSR) order: the only floating state (the trainable
  Parameter of ``BlockSparseLinear``), and
* a ``BSRPattern``: five int32 tensors built once from the mask, and the
  block size:

  - ``crow_indices`` (out_features / bh + 1): where each block row's blocks start in ``values``;
  - ``col_indices`` (nblocks): the block column of each block, increasing within a block row;
  - ``ccol_indices`` (in_features / bw + 1): where each block column's blocks start in
    the transposed (block-column-major) order;
  - ``row_indices`` (nblocks): the block row of each block, in that transposed order;
  - ``bsr_positions`` (nblocks): where that block sits in ``values``.

It is :class:`~sparsesam.sparse.CSRPattern` one level up: the same index over
blocks instead of entries, read the same way (forward over the BSR half; dx
over the transposed half, so every input column is summed by one task, no
atomics; the weight gradient only at kept blocks). Each kept block is a small
dense product, so a block's weights share one index entry and each
activation value loaded serves ``bh`` outputs. Storage grows with the number
of kept blocks: ``4 * bh * bw`` bytes of float32 values and 12 bytes of
index per block, plus ``4 * (out_features / bh + in_features / bw + 2)``.

Indices are int32: a pattern with 2^31 blocks or more is refused.
"""
from __future__ import annotations

from typing import NamedTuple, Optional, Sequence, Tuple

import torch

from .. import _validate

Tensor = torch.Tensor

_INT32_LIMIT = 2**31 - 1

# Block sizes a block-structured mask is looked for in by default (largest
# area first): those where the CPU kernels measured faster than CSR on the
# same mask (B=256, 4096x4096, fwd+bwd: 8x8 1.2-1.6x, 16x16 and 32x32
# 1.2-1.9x at 50-95% sparsity). Any block size runs (pass it explicitly),
# but smaller ones do not pay: 4x4 is about even with CSR at 90-99%
# sparsity, 1x8 is slower (0.7x), and every mask is 1x1-structured (CSR's job).
BLOCK_SIZES: Tuple[Tuple[int, int], ...] = ((32, 32), (16, 16), (8, 8))


def check_blocksize(blocksize) -> Tuple[int, int]:
    """``blocksize`` as a pair of positive ints (an int means a square block)."""
    if isinstance(blocksize, int) and not isinstance(blocksize, bool):
        blocksize = (blocksize, blocksize)
    try:
        bh, bw = blocksize
    except (TypeError, ValueError):
        raise TypeError(f"blocksize must be an int or a pair of ints (bh, bw), got {blocksize!r}") from None
    for v in (bh, bw):
        if isinstance(v, bool) or not isinstance(v, int):
            raise TypeError(f"blocksize must be an int or a pair of ints (bh, bw), got {blocksize!r}")
    if bh < 1 or bw < 1:
        raise ValueError(f"blocksize must be positive, got {(bh, bw)}")
    return int(bh), int(bw)


def _check_mask(mask: Tensor) -> None:
    if not isinstance(mask, Tensor):
        raise TypeError(f"mask must be a torch.Tensor, got {type(mask).__name__}")
    if mask.dim() != 2:
        raise ValueError(f"mask must have 2 dimensions (out_features, in_features), got shape {tuple(mask.shape)}")
    _validate.finite_tensor("mask", mask)  # NaN != 0 would keep an entry; inf is no keep/prune flag


def block_structure_error(mask: Tensor, blocksize) -> Optional[str]:
    """None when ``mask`` keeps or prunes whole ``blocksize`` blocks, else why not (one sentence)."""
    _check_mask(mask)
    bh, bw = check_blocksize(blocksize)
    rows, cols = mask.shape
    if rows % bh or cols % bw:
        return f"the block size {(bh, bw)} does not divide the mask's shape {(rows, cols)}"
    keep = (mask != 0).reshape(rows // bh, bh, cols // bw, bw)
    kept = keep.sum(dim=(1, 3))
    partial = (kept > 0) & (kept < bh * bw)
    if bool(partial.any()):
        r, c = (int(i) for i in partial.nonzero()[0])
        return (f"the mask is not {bh}x{bw} block-structured: block ({r}, {c}) (rows {r * bh}..{r * bh + bh - 1}, "
                f"columns {c * bw}..{c * bw + bw - 1}) is partly kept")
    return None


def largest_blocksize(mask: Tensor, candidates: Sequence[Tuple[int, int]] = BLOCK_SIZES) -> Optional[Tuple[int, int]]:
    """The candidate block size of largest area (first listed on ties) that ``mask`` is structured in, or None."""
    _check_mask(mask)
    sizes = sorted((check_blocksize(c) for c in candidates), key=lambda s: -s[0] * s[1])
    for size in sizes:
        if block_structure_error(mask, size) is None:
            return size
    return None


class BSRPattern(NamedTuple):
    """The int32 block index of a fixed block-structured mask; see the module docstring.

    Build it with :meth:`from_mask` (or :meth:`from_bsr`). The ops take its
    five tensors, :attr:`index`, in field order; ``blocksize`` is (bh, bw).
    """

    crow_indices: Tensor
    col_indices: Tensor
    ccol_indices: Tensor
    row_indices: Tensor
    bsr_positions: Tensor
    blocksize: Tuple[int, int]

    # --- construction ---------------------------------------------------------

    @classmethod
    def from_mask(cls, mask: Tensor, blocksize) -> "BSRPattern":
        """The pattern of ``mask != 0`` (out_features x in_features), which must keep or prune whole blocks."""
        _check_mask(mask)
        bh, bw = check_blocksize(blocksize)
        error = block_structure_error(mask, (bh, bw))
        if error is not None:
            raise ValueError(error)
        rows, cols = mask.shape
        block_rows, block_cols = rows // bh, cols // bw
        block_keep = (mask != 0).reshape(block_rows, bh, block_cols, bw).any(dim=3).any(dim=1)
        _check_int32(block_rows, block_cols, int(block_keep.sum()))
        brow, bcol = block_keep.nonzero(as_tuple=True)  # row-major: the BSR order
        return cls._with_transposed(_offsets(brow, block_rows), bcol, brow, block_cols, (bh, bw))

    @classmethod
    def from_bsr(cls, crow_indices: Tensor, col_indices: Tensor, in_features: int, blocksize) -> "BSRPattern":
        """The pattern of a BSR block index (e.g. one loaded from a checkpoint), checked and completed.

        Block columns must be strictly increasing within each block row.
        """
        for name, t in (("crow_indices", crow_indices), ("col_indices", col_indices)):
            if not isinstance(t, Tensor):
                raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
            if t.dtype not in (torch.int32, torch.int64) or t.dim() != 1:
                raise TypeError(f"{name} must be a 1-D int32 or int64 tensor, got {t.dtype} of shape {tuple(t.shape)}")
        bh, bw = check_blocksize(blocksize)
        if isinstance(in_features, bool) or not isinstance(in_features, int) or in_features < 0 or in_features % bw:
            raise ValueError(f"in_features must be a non-negative multiple of bw={bw}, got {in_features!r}")
        if crow_indices.numel() < 1:
            raise ValueError("crow_indices must have out_features / bh + 1 >= 1 entries")
        crow, col = crow_indices.long(), col_indices.long()
        block_rows, block_cols, nblocks = crow.numel() - 1, in_features // bw, col.numel()
        _check_int32(block_rows, block_cols, nblocks)
        counts = crow.diff()
        if int(crow[0]) != 0 or int(crow[-1]) != nblocks or bool((counts < 0).any()):
            raise ValueError(f"crow_indices must go from 0 to nblocks={nblocks} without decreasing")
        if nblocks and (int(col.min()) < 0 or int(col.max()) >= block_cols):
            raise ValueError(f"col_indices must lie in [0, in_features / bw = {block_cols})")
        rows = torch.repeat_interleave(torch.arange(block_rows, device=crow.device), counts)
        if bool(((rows[1:] == rows[:-1]) & (col[1:] <= col[:-1])).any()):
            raise ValueError("col_indices must be strictly increasing within each block row")
        return cls._with_transposed(crow, col, rows, block_cols, (bh, bw))

    @classmethod
    def _with_transposed(cls, crow: Tensor, cols: Tensor, rows: Tensor, block_cols: int,
                         blocksize: Tuple[int, int]) -> "BSRPattern":
        # A stable sort by block column keeps block rows increasing within each block column.
        order = torch.argsort(cols, stable=True)
        i32 = lambda t: t.to(torch.int32).contiguous()  # noqa: E731
        return cls(i32(crow), i32(cols), i32(_offsets(cols, block_cols)), i32(rows[order]), i32(order),
                   tuple(blocksize))

    # --- shape ------------------------------------------------------------------

    @property
    def index(self) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        """The five index tensors, in the order the ops take them."""
        return tuple(self[:5])

    @property
    def block_rows(self) -> int:
        return self.crow_indices.numel() - 1

    @property
    def block_cols(self) -> int:
        return self.ccol_indices.numel() - 1

    @property
    def out_features(self) -> int:
        return self.block_rows * self.blocksize[0]

    @property
    def in_features(self) -> int:
        return self.block_cols * self.blocksize[1]

    @property
    def shape(self) -> Tuple[int, int]:
        return (self.out_features, self.in_features)

    @property
    def nblocks(self) -> int:
        return self.col_indices.numel()

    @property
    def nnz(self) -> int:
        """Kept weights: nblocks * bh * bw."""
        return self.nblocks * self.blocksize[0] * self.blocksize[1]

    @property
    def values_shape(self) -> Tuple[int, int, int]:
        return (self.nblocks, *self.blocksize)

    @property
    def density(self) -> float:
        """Fraction of the weight that is kept."""
        return self.nnz / max(self.out_features * self.in_features, 1)

    @property
    def device(self) -> torch.device:
        return self.crow_indices.device

    def nbytes(self) -> int:
        """Bytes of the index (the values come on top)."""
        return sum(t.numel() * t.element_size() for t in self.index)

    # --- conversions ------------------------------------------------------------

    def block_row_of_each(self) -> Tensor:
        """The block row of each block, in BSR order (int64)."""
        counts = self.crow_indices.diff().long()
        return torch.repeat_interleave(torch.arange(self.block_rows, device=self.device), counts)

    def _blocked(self, dense: Tensor) -> Tensor:
        """``dense`` (out x in) as a (block_rows, block_cols, bh, bw) view."""
        bh, bw = self.blocksize
        return dense.view(self.block_rows, bh, self.block_cols, bw).permute(0, 2, 1, 3)

    def gather(self, weight: Tensor) -> Tensor:
        """The kept blocks of a dense ``weight``, (nblocks, bh, bw) in BSR order (the ``values`` of this pattern)."""
        if not isinstance(weight, Tensor):
            raise TypeError(f"weight must be a torch.Tensor, got {type(weight).__name__}")
        if tuple(weight.shape) != self.shape:
            raise ValueError(f"weight has shape {tuple(weight.shape)} but the pattern is {self.shape}")
        blocks = self._blocked(weight.contiguous())[self.block_row_of_each(), self.col_indices.long()]
        return blocks.contiguous()

    def scatter(self, values: Tensor) -> Tensor:
        """The dense weight with ``values`` at the kept blocks and exact zeros elsewhere."""
        if not isinstance(values, Tensor):
            raise TypeError(f"values must be a torch.Tensor, got {type(values).__name__}")
        if tuple(values.shape) != self.values_shape:
            raise ValueError(f"values has shape {tuple(values.shape)}; the pattern has values_shape={self.values_shape}")
        dense = values.new_zeros(self.shape)
        self._blocked(dense)[self.block_row_of_each(), self.col_indices.long()] = values
        return dense

    def mask(self) -> Tensor:
        """The dense bool mask of this pattern."""
        keep = torch.zeros(self.shape, dtype=torch.bool, device=self.device)
        self._blocked(keep)[self.block_row_of_each(), self.col_indices.long()] = True
        return keep

    def to(self, device) -> "BSRPattern":
        return BSRPattern(*(t.to(device) for t in self.index), self.blocksize)


def _offsets(group: Tensor, length: int) -> Tensor:
    """length + 1 offsets: where each group starts when entries are ordered by ``group``."""
    counts = torch.bincount(group, minlength=length) if group.numel() else group.new_zeros(length)
    return torch.cat([counts.new_zeros(1), counts.cumsum(0)])


def _check_int32(block_rows: int, block_cols: int, nblocks: int) -> None:
    if max(block_rows, block_cols, nblocks) > _INT32_LIMIT:
        raise ValueError(
            f"a BSRPattern uses int32 indices: block_rows={block_rows}, block_cols={block_cols} and "
            f"nblocks={nblocks} must each stay below 2^31"
        )
