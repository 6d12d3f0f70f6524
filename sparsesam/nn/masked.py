"""MaskedLinear and MaskedConv2d: drop-in nn.Linear / nn.Conv2d with a weight mask.

They subclass the torch layers (``isinstance(m, nn.Linear)`` stays true and
every attribute is where code expects it) and add one tensor, ``weight_mask``:

* ``mask_mode="fixed"``: a bool buffer (1 byte per weight); pruned entries
  are exact zeros and never receive gradient.
* ``mask_mode="trainable"``: a float ``nn.Parameter`` of the weight's dtype,
  a soft or learnable mask; it receives ``dL/dM = G * W``.

The name ``weight_mask`` is the one ``torch.nn.utils.prune`` uses, and
state_dicts load in four shapes: our own, a dense model's (no mask: the
current mask is kept), a ``torch.nn.utils.prune`` model's (``weight_orig`` +
``weight_mask``) and one of the layer's sparse forms (``values`` + a
format's index, see :mod:`sparsesam.nn._checkpoint_forms`).
"""
from __future__ import annotations

import torch
from torch.nn.utils import parametrize
from torch import nn
import torch.nn.functional as F

from ..ops import apply_mask, masked_conv2d, masked_linear
from ._checkpoint_forms import in_own_form

MASK_MODES = ("fixed", "trainable")


def non_finite_mask_error(name: str, mask: torch.Tensor) -> str | None:
    """The one-line complaint about a floating mask holding NaN or inf, or None.

    A fixed mask would keep such entries (NaN != 0) and a trainable one
    multiplies them into the weight (inf * 0 = NaN): either way garbage, so
    every mask the layers take in must be finite.
    """
    if not mask.is_floating_point():
        return None
    bad = ~torch.isfinite(mask)
    if not bool(bad.any()):
        return None
    return (f"{name} contains NaN or inf ({int(torch.isnan(mask).sum())} NaN, "
            f"{int(torch.isinf(mask).sum())} inf): a mask must be finite")


class _MaskedWeight:
    """The mask bookkeeping shared by the masked layers (a mixin over nn.Module)."""

    weight: nn.Parameter
    weight_mask: torch.Tensor
    mask_mode: str

    def _init_mask(self, mask_mode: str = "fixed", mask: torch.Tensor | None = None) -> None:
        if mask_mode not in MASK_MODES:
            raise ValueError(f"mask_mode must be one of {MASK_MODES}, got {mask_mode!r}")
        self.mask_mode = mask_mode
        if mask_mode == "fixed":
            self.register_buffer("weight_mask", torch.ones_like(self.weight, dtype=torch.bool))
        else:
            self.weight_mask = nn.Parameter(torch.ones_like(self.weight))
        if mask is not None:
            self.set_mask(mask)

    @torch.no_grad()
    def set_mask(self, mask: torch.Tensor) -> None:
        """Copy ``mask`` in (bool or numeric, the weight's shape); fixed masks keep ``mask != 0``."""
        if not isinstance(mask, torch.Tensor):
            raise TypeError(f"mask must be a torch.Tensor, got {type(mask).__name__}")
        if mask.shape != self.weight.shape:
            raise ValueError(f"mask has shape {tuple(mask.shape)} but weight has {tuple(self.weight.shape)}")
        error = non_finite_mask_error("mask", mask)
        if error is not None:
            raise ValueError(error)
        if parametrize.is_parametrized(self, "weight_mask"):
            # The mask is computed from scores at every read: a copy into it
            # would be lost without a trace.
            raise RuntimeError("this layer's mask is driven by scores (sparsesam.pruning.attach_scores); "
                               "call sparsesam.pruning.freeze_scores(model) before set_mask")
        if self.mask_mode == "fixed":
            self.weight_mask.copy_(mask != 0)
        else:
            self.weight_mask.copy_(mask)

    @property
    def sparsity(self) -> float:
        """Fraction of weights whose mask entry is zero."""
        return 1.0 - float(torch.count_nonzero(self.weight_mask)) / max(self.weight_mask.numel(), 1)

    def effective_weight(self) -> torch.Tensor:
        """``weight * mask``: what the forward uses (differentiable)."""
        return apply_mask(self.weight, self.weight_mask)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
        # A checkpoint of this layer in a sparse form (values + index) loads as its dense weight and mask.
        state_dict = in_own_form(state_dict, prefix, "dense", tuple(self.weight.shape), lambda: self.weight_mask != 0,
                                 lambda weight, mask: {"weight": weight, "weight_mask": mask}, error_msgs)
        if state_dict is None:
            return
        # A torch.nn.utils.prune checkpoint stores the dense weight as weight_orig.
        orig = state_dict.pop(prefix + "weight_orig", None)
        if orig is not None and prefix + "weight" not in state_dict:
            state_dict[prefix + "weight"] = orig
        mask_key = prefix + "weight_mask"
        had_mask = mask_key in state_dict
        if had_mask and isinstance(state_dict[mask_key], torch.Tensor):
            error = non_finite_mask_error(mask_key, state_dict[mask_key])
            if error is not None:
                error_msgs.append(error)  # load_state_dict raises with it, whatever strict
                return
        if had_mask and self.mask_mode == "fixed":
            state_dict[mask_key] = state_dict[mask_key] != 0
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs)
        if not had_mask and mask_key in missing_keys:
            # A dense checkpoint: the weights load, the current mask stays.
            missing_keys.remove(mask_key)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, mask_mode={self.mask_mode}, sparsity={self.sparsity:.4f}"


class MaskedLinear(_MaskedWeight, nn.Linear):
    """``nn.Linear`` computing ``x (W*M)^T + b`` with sparsesam's fused masked op."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, device=None, dtype=None,
                 mask_mode: str = "fixed", mask: torch.Tensor | None = None) -> None:
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self._init_mask(mask_mode, mask)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return masked_linear(x, self.weight, self.weight_mask, self.bias)


class MaskedConv2d(_MaskedWeight, nn.Conv2d):
    """``nn.Conv2d`` convolving with ``W*M`` through sparsesam's fused masked op.

    Every nn.Conv2d option works: string paddings ('same', 'valid') and
    non-zero padding modes are applied with ``F.pad`` first, as nn.Conv2d does.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0, dilation=1,
                 groups: int = 1, bias: bool = True, padding_mode: str = "zeros", device=None, dtype=None,
                 mask_mode: str = "fixed", mask: torch.Tensor | None = None) -> None:
        super().__init__(in_channels, out_channels, kernel_size, stride=stride, padding=padding, dilation=dilation,
                         groups=groups, bias=bias, padding_mode=padding_mode, device=device, dtype=dtype)
        self._init_mask(mask_mode, mask)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        padding = self.padding
        if self.padding_mode != "zeros" or isinstance(padding, str):
            mode = "constant" if self.padding_mode == "zeros" else self.padding_mode
            x = F.pad(x, self._reversed_padding_repeated_twice, mode=mode)
            padding = (0, 0)
        return masked_conv2d(x, self.weight, self.weight_mask, self.bias, self.stride, padding, self.dilation, self.groups)


# The dense layer each masked layer stands in for (masked_subclass adds the subclasses it makes).
DENSE_OF = {MaskedLinear: nn.Linear, MaskedConv2d: nn.Conv2d}
MASKED_OF = {dense: masked for masked, dense in DENSE_OF.items()}


class _MaskedForward(_MaskedWeight):
    """A masked subclass of nn.Linear / nn.Conv2d that computes with its own ``forward`` (timm's
    ``Conv2dSame`` pads first, ``StdConv2d`` standardises its weight, ...): that forward runs with
    ``self.weight`` standing for ``W*M`` (differentiable: a fixed mask gives pruned weights a zero
    gradient), as torch.func.functional_call swaps a parameter for the duration of a call. It runs
    dense: the sparse forms of sparsesam.nn.set_execution are for plain layers only.
    """

    def forward(self, *args, **kwargs):
        weight = self._parameters["weight"]
        self._parameters["weight"] = self.effective_weight()
        try:
            return super().forward(*args, **kwargs)
        finally:
            self._parameters["weight"] = weight


def has_own_forward(cls: type) -> bool:
    """Whether ``cls`` (a subclass of nn.Linear or nn.Conv2d) defines how it computes: a forward, or a
    Conv2d ``_conv_forward``, of its own rather than the torch layer's."""
    base = nn.Linear if issubclass(cls, nn.Linear) else nn.Conv2d
    return cls.forward is not base.forward or getattr(cls, "_conv_forward", None) is not getattr(
        base, "_conv_forward", None)


_MASKED_SUBCLASSES: dict = {}


def masked_subclass(cls: type) -> type:
    """The masked class for ``cls``, a subclass of nn.Linear / nn.Conv2d with its own forward
    (has_own_forward): ``Masked<Name>(_MaskedForward, cls)``, made once per class and registered in
    DENSE_OF so that export() turns it back into ``cls``."""
    if cls not in _MASKED_SUBCLASSES:
        made = type(f"Masked{cls.__name__}", (_MaskedForward, cls), {"__module__": __name__})
        _MASKED_SUBCLASSES[cls] = made
        DENSE_OF[made] = cls
    return _MASKED_SUBCLASSES[cls]
