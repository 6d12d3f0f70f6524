"""BlockSparseLinear: a linear layer that stores and computes only the kept blocks of a block-structured mask.

The block counterpart of :class:`~sparsesam.nn.CSRLinear`, with the same
interface: it keeps ``values`` (the kept ``bh x bw`` blocks, a Parameter of
shape ``(nblocks, bh, bw)``) and the int32
:class:`~sparsesam.sparse.BSRPattern` of the mask, and runs
:func:`sparsesam.ops.bsr_linear`, where each kept block is a small dense
product. It applies only to masks that keep or prune whole blocks (e.g. from
:func:`sparsesam.pruning.bsr_magnitude_mask`); :meth:`applicable` says
whether a mask is one, and why not. Conversions to and from
:class:`~sparsesam.nn.MaskedLinear` are exact (kept weights, mask and bias
come back bit for bit).

state_dict: ``values``, ``bias``, and the BSR half of the pattern
(``crow_indices``, ``col_indices``); the block size is the shape of
``values`` and the transposed index is rebuilt on load, so a checkpoint of
another pattern (another number of blocks, even another block size) loads
into a layer of the same shape; so does the layer in another form (a
MaskedLinear's ``weight`` + ``weight_mask``, CSR, N:M) where its mask is
block-structured.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence, Tuple

import torch
from torch import nn

from ..ops import bsr_linear
from ..sparse.bsr import BLOCK_SIZES, BSRPattern, block_structure_error, check_blocksize, largest_blocksize
from ._checkpoint_forms import sparse_layer_state
from ._linear_forms import LinearForms

_BSR_BUFFERS = ("crow_indices", "col_indices")
_TRANSPOSED_BUFFERS = ("ccol_indices", "row_indices", "bsr_positions")


class BlockSparseLinear(LinearForms, nn.Module):
    """``y = x W^T + b`` with W kept only at the blocks of a fixed ``pattern``.

    Build one from a layer with :meth:`from_masked` / :meth:`from_dense`, or
    directly from a pattern (values then start like ``nn.Linear``'s weight).
    """

    def __init__(self, in_features: int, out_features: int, pattern: BSRPattern, bias: bool = True,
                 device=None, dtype=None) -> None:
        super().__init__()
        if not isinstance(pattern, BSRPattern):
            raise TypeError(f"pattern must be a sparsesam.sparse.BSRPattern, got {type(pattern).__name__}")
        if pattern.shape != (out_features, in_features):
            raise ValueError(f"pattern has shape {pattern.shape}; expected (out_features, in_features) = "
                             f"{(out_features, in_features)}")
        factory = dict(device=device, dtype=dtype)
        self.in_features = in_features
        self.out_features = out_features
        self.values = nn.Parameter(torch.empty(pattern.values_shape, **factory))
        self.bias = nn.Parameter(torch.empty(out_features, **factory)) if bias else None
        self._set_pattern(pattern.to(self.values.device))
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """nn.Linear's initialisation: U(-1/sqrt(in_features), 1/sqrt(in_features)) for values and bias."""
        bound = 1 / math.sqrt(self.in_features) if self.in_features > 0 else 0.0
        self.values.uniform_(-bound, bound)
        if self.bias is not None:
            self.bias.uniform_(-bound, bound)

    # --- the pattern ------------------------------------------------------------

    def _set_pattern(self, pattern: BSRPattern) -> None:
        for name in _BSR_BUFFERS:
            self.register_buffer(name, getattr(pattern, name))
        for name in _TRANSPOSED_BUFFERS:  # derived: not saved, rebuilt on load
            self.register_buffer(name, getattr(pattern, name), persistent=False)

    @property
    def blocksize(self) -> Tuple[int, int]:
        return tuple(self.values.shape[1:])

    @property
    def pattern(self) -> BSRPattern:
        return BSRPattern(*(getattr(self, name) for name in _BSR_BUFFERS + _TRANSPOSED_BUFFERS), self.blocksize)

    @property
    def nnz(self) -> int:
        """Kept weights (nblocks * bh * bw)."""
        return self.values.numel()

    @property
    def sparsity(self) -> float:
        """Fraction of the weight that is pruned."""
        return 1.0 - self.nnz / max(self.in_features * self.out_features, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return bsr_linear(x, self.values, self.pattern, self.bias)

    # --- conversions ----------------------------------------------------------

    @staticmethod
    def applicable(mask: torch.Tensor, candidates: Sequence[Tuple[int, int]] = BLOCK_SIZES) -> Optional[str]:
        """None when ``mask`` keeps or prunes whole blocks of one of ``candidates`` (default
        :data:`~sparsesam.sparse.bsr.BLOCK_SIZES`), else the reason it cannot run block-sparse."""
        if not isinstance(mask, torch.Tensor):
            return f"the mask is a {type(mask).__name__}, not a tensor"
        if mask.dim() != 2:
            return f"the mask has shape {tuple(mask.shape)}, not 2-D"
        if mask.is_floating_point() and not bool(torch.isfinite(mask).all()):
            return "the mask contains NaN or inf"
        if largest_blocksize(mask, candidates) is None:
            sizes = ", ".join(f"{bh}x{bw}" for bh, bw in candidates)
            return f"the mask is not block-structured for any block size of {sizes}"
        return None

    @classmethod
    def _pattern_of(cls, mask: torch.Tensor, block=None) -> BSRPattern:
        # block: (bh, bw) (or an int for square blocks); None picks the largest block
        # size of BLOCK_SIZES the mask is structured in.
        if block is None:
            block = largest_blocksize(mask)
            if block is None:
                raise ValueError(cls.applicable(mask) or "the mask is not block-structured")
        else:
            block = check_blocksize(block)
            error = block_structure_error(mask, block)
            if error is not None:
                raise ValueError(error)
        return BSRPattern.from_mask(mask, block)

    # --- state_dict -----------------------------------------------------------

    @staticmethod
    def _index_entries(pattern: BSRPattern):
        return {name: getattr(pattern, name) for name in _BSR_BUFFERS}

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        # A checkpoint of this layer in another form (dense, CSR, N:M) is taken to BSR first: its mask
        # must be block-structured (the largest block size of BLOCK_SIZES that fits is taken).
        state_dict = sparse_layer_state(self, "bsr", state_dict, prefix, error_msgs)
        if state_dict is None:
            return
        crow, col = state_dict.get(prefix + "crow_indices"), state_dict.get(prefix + "col_indices")
        values = state_dict.get(prefix + "values")
        if crow is not None and col is not None and isinstance(values, torch.Tensor):
            # Another pattern may come with another block count or block size
            # (values' shape): take it, resize values, then let nn.Module copy
            # values and bias in as usual.
            try:
                if values.dim() != 3:
                    raise ValueError(f"values must be 3-D (nblocks, bh, bw), got shape {tuple(values.shape)}")
                blocksize = tuple(int(s) for s in values.shape[1:])
                pattern = BSRPattern.from_bsr(crow, col, self.in_features, blocksize)
            except (TypeError, ValueError) as err:
                error_msgs.append(f"{prefix}crow_indices/col_indices/values: {err}")
                return
            if pattern.out_features != self.out_features or pattern.values_shape != tuple(values.shape):
                error_msgs.append(f"{prefix}crow_indices: the pattern is {pattern.shape} with "
                                  f"values_shape={pattern.values_shape}, the layer "
                                  f"{(self.out_features, self.in_features)} with values {tuple(values.shape)}")
                return
            self._set_pattern(pattern.to(self.crow_indices.device))
            if tuple(self.values.shape) != pattern.values_shape:
                self.values.data = self.values.data.new_empty(pattern.values_shape)
            state_dict = dict(state_dict)
            for name in _BSR_BUFFERS:  # already taken (and converted to int32)
                state_dict[prefix + name] = getattr(self, name)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)

    def extra_repr(self) -> str:
        bh, bw = self.blocksize
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"blocksize=({bh}, {bw}), nblocks={self.values.shape[0]}, sparsity={self.sparsity:.4f}")
