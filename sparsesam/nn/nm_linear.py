"""NMSparseLinear: a linear layer that stores and computes only a fixed N:M mask's kept weights.

The N:M counterpart of :class:`~sparsesam.nn.CSRLinear` (same interface):
it keeps ``values`` (a Parameter of shape (out_features, in_features * n / m))
and the uint8 :class:`~sparsesam.sparse.NMPattern` of the mask, and runs
:func:`sparsesam.ops.nm_linear`. Index storage is one byte per kept entry
(CSR: twelve) and the kernels' loops are regular (no row offsets).

Which N:M: a mask is taken as N:M for the first M of (4, 8, 16, 2) for which
every group of M consecutive inputs of every row keeps the same number N,
with 1 <= N < M (:func:`sparsesam.sparse.nm.detect`): 4 first because 2:4 is
the hardware format and every 1:2 mask is also 2:4; a mask that is 1:4 is
also 2:8 and 4:16, and the smallest M is the tightest description; M = 2
only serves an input dimension that 4 does not divide. Conversions both ways
are exact (kept weights, mask and bias come back bit for bit).

state_dict: ``values``, ``bias``, ``indices`` and (as extra state) ``n`` and
``m``; a checkpoint of another N:M pattern of the same shape loads too, and
so does the layer in another form (a MaskedLinear's ``weight`` +
``weight_mask``, CSR, BSR) where its mask is N:M.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import nn

from ..ops.nm_linear import nm_linear
from ..sparse.nm import NMPattern, detect
from ._checkpoint_forms import sparse_layer_state
from ._linear_forms import LinearForms


class NMSparseLinear(LinearForms, nn.Module):
    """``y = x W^T + b`` with W kept only at the entries of a fixed N:M ``pattern``.

    Build one from a layer with :meth:`from_masked` / :meth:`from_dense`, or
    directly from a pattern (values then start like ``nn.Linear``'s weight).
    """

    def __init__(self, in_features: int, out_features: int, pattern: NMPattern, bias: bool = True,
                 device=None, dtype=None) -> None:
        super().__init__()
        if not isinstance(pattern, NMPattern):
            raise TypeError(f"pattern must be a sparsesam.sparse.NMPattern, got {type(pattern).__name__}")
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

    def _set_pattern(self, pattern: NMPattern) -> None:
        self.register_buffer("indices", pattern.indices)
        self.n, self.m = pattern.n, pattern.m

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """nn.Linear's initialisation: U(-1/sqrt(in_features), 1/sqrt(in_features)) for values and bias."""
        bound = 1 / math.sqrt(self.in_features) if self.in_features > 0 else 0.0
        self.values.uniform_(-bound, bound)
        if self.bias is not None:
            self.bias.uniform_(-bound, bound)

    @property
    def pattern(self) -> NMPattern:
        return NMPattern(self.indices, self.n, self.m)

    @property
    def nnz(self) -> int:
        return self.values.numel()

    @property
    def sparsity(self) -> float:
        """Fraction of the weight that is pruned (1 - n / m)."""
        return 1.0 - self.n / self.m

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nm_linear(x, self.values, self.pattern, self.bias)

    # --- which masks -----------------------------------------------------------

    @classmethod
    def applicable(cls, mask: torch.Tensor) -> Optional[str]:
        """None when ``mask`` (out_features x in_features) is exactly N:M for a
        supported (N, M) (see the module docstring), else the reason it is not."""
        if not isinstance(mask, torch.Tensor):
            return f"mask must be a torch.Tensor, got {type(mask).__name__}"
        if mask.dim() != 2:
            return f"mask must have 2 dimensions (out_features, in_features), got shape {tuple(mask.shape)}"
        found = detect(mask)
        return found if isinstance(found, str) else None

    # --- conversions ----------------------------------------------------------

    @staticmethod
    def _pattern_of(mask: torch.Tensor, n: Optional[int] = None, m: Optional[int] = None) -> NMPattern:
        # n and m are detected unless given; ValueError if the mask is not N:M.
        return NMPattern.from_mask(mask, n, m)

    # --- state_dict ---------------------------------------------------------------

    def get_extra_state(self):
        return {"n": self.n, "m": self.m}

    def set_extra_state(self, state) -> None:
        pass  # taken (and checked) with the index in _load_from_state_dict

    @staticmethod
    def _index_entries(pattern: NMPattern):
        return {"indices": pattern.indices, "_extra_state": {"n": pattern.n, "m": pattern.m}}

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        # A checkpoint of this layer in another form (dense, CSR, BSR) is taken to N:M first: its mask must be N:M.
        state_dict = sparse_layer_state(self, "nm", state_dict, prefix, error_msgs)
        if state_dict is None:
            return
        indices, extra = state_dict.get(prefix + "indices"), state_dict.get(prefix + "_extra_state")
        if indices is not None and extra is not None:
            # Another N:M pattern may come with another n and m: take it, resize
            # values, then let nn.Module copy values and bias in as usual.
            try:
                pattern = NMPattern.from_indices(indices, extra["n"], extra["m"])
            except (TypeError, ValueError, KeyError) as err:
                error_msgs.append(f"{prefix}indices/_extra_state: {err!r}")
                return
            if pattern.shape != (self.out_features, self.in_features):
                error_msgs.append(f"{prefix}indices: the pattern has shape {pattern.shape}, the layer "
                                  f"{(self.out_features, self.in_features)}")
                return
            self._set_pattern(pattern.to(self.indices.device))
            if tuple(self.values.shape) != pattern.values_shape:
                self.values.data = self.values.data.new_empty(pattern.values_shape)
            state_dict = dict(state_dict)
            state_dict[prefix + "indices"] = self.indices
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"n={self.n}, m={self.m}, nnz={self.nnz}, sparsity={self.sparsity:.4f}")
