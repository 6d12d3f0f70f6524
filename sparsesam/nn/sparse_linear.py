"""SparseLinear: a linear layer that stores and computes only a fixed mask's kept weights.

Where a :class:`~sparsesam.nn.MaskedLinear` keeps the dense weight and a mask
and computes ``x (W*M)^T`` densely (pruning saves nothing), a
``SparseLinear`` keeps ``values`` (the kept weights, a Parameter of nnz
entries) and the int32 :class:`~sparsesam.sparse.CSRPattern` of the mask,
and runs :func:`sparsesam.ops.sparse_linear`: memory and time grow with
nnz. The pattern is fixed: to change the mask, go back to a MaskedLinear
(:meth:`SparseLinear.to_masked`), prune, and convert again; both directions
are exact (kept weights, mask and bias come back bit for bit).

state_dict: ``values``, ``bias``, and the CSR half of the pattern
(``crow_indices``, ``col_indices``); the transposed index is rebuilt on load,
so a checkpoint of another pattern (another nnz) loads too.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from ..ops import sparse_linear
from ..sparse.csr import CSRPattern
from ._csr_weight import CSRWeight, check_pattern
from ._linear_forms import LinearForms
from .masked import MaskedLinear


class SparseLinear(LinearForms, CSRWeight):
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
        return sparse_linear(x, self.values, self.pattern, self.bias)

    # --- conversions ----------------------------------------------------------

    @staticmethod
    def _pattern_of(mask: torch.Tensor) -> CSRPattern:
        return CSRPattern.from_mask(mask)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"nnz={self.nnz}, sparsity={self.sparsity:.4f}")


# --- Whole models ------------------------------------------------------------------
# The swap a dense/sparse dispatcher (or a user who knows a layer is sparse
# enough) performs: a new module replaces the old one under the same name.
# Unlike sparsify()'s in-place class change, the parameters are new tensors
# (values instead of weight): build the optimizer after converting.


def _swap(model: nn.Module, convert) -> nn.Module:
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            new = convert(child)
            if new is not None:
                setattr(parent, name, new)
    return model


def to_sparse(model: nn.Module, min_sparsity: float = 0.0) -> nn.Module:
    """Replace, in place, every fixed-mask ``MaskedLinear`` of ``model`` whose
    sparsity is at least ``min_sparsity`` by its ``SparseLinear``; returns ``model``."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if not 0.0 <= min_sparsity <= 1.0:
        raise ValueError(f"min_sparsity must lie in [0, 1], got {min_sparsity}")

    def convert(child):
        if isinstance(child, MaskedLinear) and child.mask_mode == "fixed" and child.sparsity >= min_sparsity:
            return SparseLinear.from_masked(child)
        return None

    return _swap(model, convert)


def to_masked(model: nn.Module) -> nn.Module:
    """Replace, in place, every ``SparseLinear`` of ``model`` by its ``MaskedLinear``; returns ``model``."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    return _swap(model, lambda child: child.to_masked() if isinstance(child, SparseLinear) else None)
