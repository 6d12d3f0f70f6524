"""SparseConv2d: a Conv2d layer that stores and computes only a fixed mask's kept weights.

The conv counterpart of :class:`~sparsesam.nn.CSRLinear`: ``values`` (a
Parameter of nnz entries) and the int32 :class:`~sparsesam.sparse.CSRPattern`
of the mask viewed as ``(out_channels, in_channels * kh * kw)``, run by
:func:`sparsesam.ops.sparse_conv2d` (a direct sparse convolution: time and
memory grow with nnz, no im2col buffer). Only what that op computes is
accepted: groups = 1 and numeric zero padding (an int or pair, or 'valid');
other layers stay dense (:func:`convertible` says why not).
Conversions to and from :class:`~sparsesam.nn.MaskedConv2d` are exact.

state_dict: ``values``, ``bias``, ``crow_indices``, ``col_indices`` (the
transposed index is rebuilt on load, so a checkpoint of another pattern loads,
and so does a MaskedConv2d's ``weight`` + ``weight_mask``).
"""
from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
from torch import nn

from ..ops import sparse_conv2d
from ..sparse.csr import CSRPattern
from ._csr_weight import CSRWeight, check_pattern
from .masked import MaskedConv2d


def _pair(v) -> Tuple[int, int]:
    return (v, v) if isinstance(v, int) else tuple(v)


def convertible(layer: nn.Conv2d) -> Optional[str]:
    """None if ``layer`` (a MaskedConv2d) can run as a SparseConv2d, else the reason it cannot."""
    if not isinstance(layer, MaskedConv2d):
        return f"not a MaskedConv2d but a {type(layer).__name__}"
    if layer.mask_mode != "fixed":
        return "its mask is trainable (a fixed pattern needs a fixed mask)"
    if layer.groups != 1:
        return f"groups={layer.groups} (sparse_conv2d supports groups=1)"
    if layer.padding_mode != "zeros":
        return f"padding_mode={layer.padding_mode!r} (sparse_conv2d pads with zeros)"
    if isinstance(layer.padding, str) and layer.padding != "valid":
        return f"padding={layer.padding!r} (give the padding as numbers)"
    return None


class SparseConv2d(CSRWeight):
    """``F.conv2d(x, W, b, stride, padding, dilation)`` with W kept only at the entries of a fixed ``pattern``.

    ``pattern`` indexes W as (out_channels, in_channels * kh * kw). Build one
    from a layer with :meth:`from_masked` / :meth:`from_dense`.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size, pattern: CSRPattern, stride=1, padding=0,
                 dilation=1, bias: bool = True, device=None, dtype=None) -> None:
        super().__init__()
        self.in_channels, self.out_channels = in_channels, out_channels
        self.kernel_size, self.stride = _pair(kernel_size), _pair(stride)
        self.padding, self.dilation = _pair(padding), _pair(dilation)
        expected = (out_channels, in_channels * self.kernel_size[0] * self.kernel_size[1])
        check_pattern(pattern, expected, "(out_channels, in_channels * kh * kw)")
        factory = dict(device=device, dtype=dtype)
        self.values = nn.Parameter(torch.empty(pattern.nnz, **factory))
        self.bias = nn.Parameter(torch.empty(out_channels, **factory)) if bias else None
        self._set_pattern(pattern.to(self.values.device))
        self.reset_parameters()

    @property
    def fan_in(self) -> int:
        return self.in_channels * self.kernel_size[0] * self.kernel_size[1]

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """U(-1/sqrt(fan_in), 1/sqrt(fan_in)) for values and bias (nn.Conv2d's bias rule)."""
        bound = 1 / math.sqrt(self.fan_in) if self.fan_in > 0 else 0.0
        self.values.uniform_(-bound, bound)
        if self.bias is not None:
            self.bias.uniform_(-bound, bound)

    @property
    def pattern_shape(self):
        return (self.out_channels, self.fan_in)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return sparse_conv2d(x, self.values, self.pattern, self.bias, self.kernel_size, self.stride, self.padding,
                             self.dilation)

    # --- conversions ----------------------------------------------------------

    @classmethod
    def from_dense(cls, weight: torch.Tensor, mask: torch.Tensor, bias: Optional[torch.Tensor] = None, stride=1,
                   padding=0, dilation=1) -> "SparseConv2d":
        """The layer with ``weight`` (4-D) kept where ``mask != 0`` (values copied, not shared)."""
        if not isinstance(weight, torch.Tensor) or weight.dim() != 4:
            raise ValueError("weight must be a 4-D tensor (out_channels, in_channels, kh, kw)")
        if not isinstance(mask, torch.Tensor) or mask.shape != weight.shape:
            raise ValueError(f"mask must be a tensor of the weight's shape {tuple(weight.shape)}")
        pattern = CSRPattern.from_mask(mask.to(weight.device).flatten(1))
        out_channels, in_channels, kh, kw = weight.shape
        layer = cls(in_channels, out_channels, (kh, kw), pattern, stride, padding, dilation, bias=bias is not None,
                    device=weight.device, dtype=weight.dtype)
        with torch.no_grad():
            layer.values.copy_(pattern.gather(weight.detach().flatten(1)))
            if bias is not None:
                layer.bias.copy_(bias.detach())
        return layer

    @classmethod
    def from_masked(cls, layer: MaskedConv2d) -> "SparseConv2d":
        """The sparse form of a fixed-mask MaskedConv2d (see :func:`convertible`)."""
        reason = convertible(layer)
        if reason is not None:
            raise ValueError(f"layer cannot run as a SparseConv2d: {reason}")
        padding = (0, 0) if layer.padding == "valid" else layer.padding
        return cls.from_dense(layer.weight, layer.weight_mask, layer.bias, layer.stride, padding, layer.dilation)

    @property
    def weight_shape(self):
        """The dense weight's shape, (out_channels, in_channels, kh, kw)."""
        return (self.out_channels, self.in_channels, *self.kernel_size)

    def _state_entries(self, weight: torch.Tensor, mask: torch.Tensor) -> dict:
        # The CSR entries for a dense weight and mask (loading another form's checkpoint).
        pattern = CSRPattern.from_mask(mask.flatten(1))
        return {"values": pattern.gather(weight.flatten(1)), **self._index_entries(pattern)}

    def dense_weight(self) -> torch.Tensor:
        """The dense 4-D weight (zeros at pruned entries), detached."""
        return self.pattern.scatter(self.values.detach()).view(self.out_channels, self.in_channels,
                                                               *self.kernel_size)

    def to_masked(self) -> MaskedConv2d:
        """A MaskedConv2d with the same kept weights, mask and bias (pruned weights are zeros)."""
        dense = self.dense_weight()
        layer = MaskedConv2d(self.in_channels, self.out_channels, self.kernel_size, self.stride, self.padding,
                             self.dilation, bias=self.bias is not None, device=self.values.device,
                             dtype=self.values.dtype, mask=self.pattern.mask().view(dense.shape))
        with torch.no_grad():
            layer.weight.copy_(dense)
            if self.bias is not None:
                layer.bias.copy_(self.bias)
        return layer

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
                f"padding={self.padding}, dilation={self.dilation}, bias={self.bias is not None}, nnz={self.nnz}, "
                f"sparsity={self.sparsity:.4f}")
