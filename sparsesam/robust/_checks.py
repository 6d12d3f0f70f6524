"""Argument checks of sparsesam.robust: a ValueError / TypeError that names the
argument, before any sampling or model call."""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch

SEVERITIES = (1, 2, 3, 4, 5)


def images(name: str, x, *, channels: Optional[Sequence[int]] = None) -> None:
    """A floating (N, C, H, W) batch with values in [0, 1] (and C in ``channels``)."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"{name} must be a floating tensor with values in [0, 1], got {x.dtype}")
    if x.dim() != 4:
        raise ValueError(f"{name} must have rank 4 (N, C, H, W), got shape {tuple(x.shape)}")
    if channels is not None and x.shape[1] not in channels:
        want = " or ".join(str(c) for c in channels)
        raise ValueError(f"{name} must have {want} channels, got {x.shape[1]} (shape {tuple(x.shape)})")
    if x.numel() == 0:
        return
    # One reduction for both NaN and range: NaN fails both comparisons.
    low, high = torch.aminmax(x)
    if not (low >= 0 and high <= 1):
        raise ValueError(f"{name} must hold values in [0, 1], got min {low.item():.4g}, max {high.item():.4g}")


def image(name: str, x) -> None:
    """One (C, H, W) image with values in [0, 1]."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 3:
        raise ValueError(f"{name} must be one image of rank 3 (C, H, W), got shape {tuple(x.shape)}")
    images(name, x.unsqueeze(0))


def labels(name: str, y, n: int) -> None:
    if not isinstance(y, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(y).__name__}")
    if y.dtype not in (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8):
        raise TypeError(f"{name} must be an integer tensor of class indices, got {y.dtype}")
    if y.shape != (n,):
        raise ValueError(f"{name} must have shape ({n},) to match the images, got {tuple(y.shape)}")


def number(name: str, value) -> float:
    """A real number as a float (a Python or NumPy number, or a one-element tensor).

    Strings and bools are refused, not converted: ``"0.5"`` or ``True`` as a
    setting is a caller's mistake that float() would hide.
    """
    if isinstance(value, (str, bytes, bool)) or value is None:
        raise TypeError(f"{name} must be a real number, got {type(value).__name__} {value!r}")
    try:
        return float(value)
    except (TypeError, ValueError):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}") from None


def finite(name: str, value) -> float:
    value = number(name, value)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    return value


def positive(name: str, value) -> float:
    """Finite and > 0 (NaN and inf refused: a radius or noise level of inf certifies nothing)."""
    value = number(name, value)
    if not (value > 0 and math.isfinite(value)):  # NaN fails the comparison
        raise ValueError(f"{name} must be finite and > 0, got {value}")
    return value


def non_negative(name: str, value) -> float:
    """Finite and >= 0."""
    value = number(name, value)
    if not (value >= 0 and math.isfinite(value)):
        raise ValueError(f"{name} must be finite and >= 0, got {value}")
    return value


def positive_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return value


def probability(name: str, value, *, open_low: bool = True, open_high: bool = True) -> float:
    value = number(name, value)  # NaN fails both comparisons below
    ok_low = value > 0 if open_low else value >= 0
    ok_high = value < 1 if open_high else value <= 1
    if not (ok_low and ok_high):
        interval = ("(" if open_low else "[") + "0, 1" + (")" if open_high else "]")
        raise ValueError(f"{name} must be in {interval}, got {value}")
    return value


def severity(value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value not in SEVERITIES:
        raise ValueError(f"severity must be an integer in 1..5, got {value!r}")
    return value


def choice(name: str, value, options: Sequence[str]) -> str:
    if value not in options:
        raise ValueError(f"unknown {name} {value!r}; expected one of {', '.join(options)}")
    return value


def value_range(name: str, value, *, low_bound: Optional[float] = None) -> tuple:
    """A (low, high) pair with low <= high (and low >= low_bound)."""
    try:
        low, high = (number(name, v) for v in value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a (low, high) pair of numbers, got {value!r}") from None
    if not (math.isfinite(low) and math.isfinite(high)):
        raise ValueError(f"{name} must be finite, got ({low}, {high})")
    if not low <= high:
        raise ValueError(f"{name} must have low <= high, got ({low}, {high})")
    if low_bound is not None and low < low_bound:
        raise ValueError(f"{name} must have low >= {low_bound}, got ({low}, {high})")
    return low, high
