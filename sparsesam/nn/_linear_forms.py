"""LinearForms: the conversions every sparse linear layer (CSR, BSR, N:M) shares.

A sparse linear layer keeps ``values`` (its kept weights, in its format's
layout), ``bias``, ``in_features``, ``out_features`` and a ``pattern`` with
``gather`` (dense weight -> values), ``scatter`` (values -> dense weight) and
``mask``. Its class says how a mask becomes a pattern: ``_pattern_of(mask,
**options)``, a ValueError when the mask lacks the format's structure. All
conversions copy (never share) and are exact: kept weights, mask and bias come
back bit for bit.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from .masked import MaskedLinear


def _check_dense(weight, mask) -> None:
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        raise ValueError("weight must be a 2-D tensor (out_features, in_features)")
    if not isinstance(mask, torch.Tensor) or mask.shape != weight.shape:
        raise ValueError(f"mask must be a tensor of the weight's shape {tuple(weight.shape)}")


class LinearForms:
    """Mixin of the sparse linear layers: building one from dense forms, and back."""

    @classmethod
    def from_dense(cls, weight: torch.Tensor, mask: torch.Tensor, bias: Optional[torch.Tensor] = None, **options):
        """The layer with ``weight`` kept where ``mask != 0``; ``options`` go to the format
        (e.g. ``block=`` for BSR, ``n=``/``m=`` for N:M)."""
        _check_dense(weight, mask)
        pattern = cls._pattern_of(mask.to(weight.device), **options)
        layer = cls(weight.shape[1], weight.shape[0], pattern, bias=bias is not None, device=weight.device,
                    dtype=weight.dtype)
        with torch.no_grad():
            layer.values.copy_(pattern.gather(weight.detach()))
            if bias is not None:
                layer.bias.copy_(bias.detach())
        return layer

    @classmethod
    def from_masked(cls, layer: MaskedLinear, **options):
        """The sparse form of a MaskedLinear with a fixed (bool) mask."""
        if not isinstance(layer, MaskedLinear):
            raise TypeError(f"layer must be a MaskedLinear, got {type(layer).__name__}")
        if layer.mask_mode != "fixed":
            raise ValueError("only a fixed (bool) mask has a fixed pattern; this layer's mask is trainable")
        return cls.from_dense(layer.weight, layer.weight_mask, layer.bias, **options)

    @classmethod
    def from_linear(cls, layer: nn.Linear, mask: Optional[torch.Tensor] = None, **options):
        """The sparse form of ``layer`` pruned by ``mask`` (default: its zero weights are pruned)."""
        if isinstance(layer, MaskedLinear):
            return cls.from_masked(layer, **options)
        if not isinstance(layer, nn.Linear):
            raise TypeError(f"layer must be an nn.Linear, got {type(layer).__name__}")
        return cls.from_dense(layer.weight, layer.weight != 0 if mask is None else mask, layer.bias, **options)

    @property
    def weight_shape(self):
        """The dense weight's shape, (out_features, in_features)."""
        return (self.out_features, self.in_features)

    def _state_entries(self, weight: torch.Tensor, mask: torch.Tensor) -> dict:
        # This format's state_dict entries for a dense weight and mask (loading another form's checkpoint).
        pattern = self._pattern_of(mask)
        return {"values": pattern.gather(weight), **self._index_entries(pattern)}

    def dense_weight(self) -> torch.Tensor:
        """The dense weight (zeros at pruned entries), detached."""
        return self.pattern.scatter(self.values.detach())

    def _copy_into(self, layer: nn.Linear) -> nn.Linear:
        with torch.no_grad():
            layer.weight.copy_(self.dense_weight())
            if self.bias is not None:
                layer.bias.copy_(self.bias)
        return layer

    def to_masked(self) -> MaskedLinear:
        """A MaskedLinear with the same kept weights, mask and bias (pruned weights are zeros)."""
        return self._copy_into(MaskedLinear(self.in_features, self.out_features, bias=self.bias is not None,
                                            device=self.values.device, dtype=self.values.dtype,
                                            mask=self.pattern.mask()))

    def to_dense(self) -> nn.Linear:
        """A plain nn.Linear computing the same function (its weight has the pruned zeros)."""
        return self._copy_into(nn.Linear(self.in_features, self.out_features, bias=self.bias is not None,
                                         device=self.values.device, dtype=self.values.dtype))
