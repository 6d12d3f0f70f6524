"""CSRLinear: a linear layer that stores and computes only a fixed mask's kept weights.

Where a :class:`~sparsesam.nn.MaskedLinear` keeps the dense weight and a mask
and computes ``x (W*M)^T`` densely (pruning saves nothing), a
``CSRLinear`` keeps ``values`` (the kept weights, a Parameter of nnz
entries) and the int32 :class:`~sparsesam.sparse.CSRPattern` of the mask,
and runs :func:`sparsesam.ops.csr_linear`: memory and time grow with
nnz. The pattern is fixed: to change the mask, go back to a MaskedLinear
(:meth:`CSRLinear.to_masked`), prune, and convert again; both directions
are exact (kept weights, mask and bias come back bit for bit).

state_dict: ``values``, ``bias``, and the CSR half of the pattern
(``crow_indices``, ``col_indices``); the transposed index is rebuilt on load,
so a checkpoint of another pattern (another nnz) loads too, and so does the
layer in another form (a MaskedLinear's ``weight`` + ``weight_mask``, BSR, N:M).
A whole model's layers change form with :func:`sparsesam.nn.set_execution`.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from ..ops import csr_linear
from ..sparse.csr import CSRPattern
from ._csr_weight import CSRWeight, check_pattern
from ._linear_forms import LinearForms


class CSRLinear(LinearForms, CSRWeight):
    """``y = x W^T + b`` with W kept only at the entries of a fixed ``pattern``.

    Build one from a layer with :meth:`from_masked` / :meth:`from_dense`, or
    directly from a pattern (values then start like ``nn.Linear``'s weight).
    """

    def __init__(self, in_features: int, out_features: int, pattern: CSRPattern, bias: bool = True,
                 device=None, dtype=None) -> None:
        super().__init__()
        check_pattern(pattern, (out_features, in_features), "(out_features, in_features)")
        factory = dict(device=device, dtype=dtype)
        self.in_features = in_features
        self.out_features = out_features
        self.values = nn.Parameter(torch.empty(pattern.nnz, **factory))
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

    @property
    def pattern_shape(self):
        return (self.out_features, self.in_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return csr_linear(x, self.values, self.pattern, self.bias)

    # --- conversions ----------------------------------------------------------

    @staticmethod
    def _pattern_of(mask: torch.Tensor) -> CSRPattern:
        return CSRPattern.from_mask(mask)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"nnz={self.nnz}, sparsity={self.sparsity:.4f}")


# The class's name before the CSR pieces were named csr_* ("sparse" now names the family of formats); kept so that
# code written against it keeps working.
SparseLinear = CSRLinear
