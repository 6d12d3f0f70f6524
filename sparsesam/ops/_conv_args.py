"""Checks of the geometry arguments of the convolution ops (masked_conv2d,
sparse_conv2d): each error names its argument, and a float stride or a bool
padding is refused before it reaches ATen (where it would fail as
"'float' object is not iterable" or be truncated silently)."""
from __future__ import annotations

import numbers
from typing import Tuple


def _is_int(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def int_pair(name: str, value, *, minimum: int) -> Tuple[int, int]:
    """An int or a pair of ints, each >= minimum, as a pair of Python ints."""
    if _is_int(value):
        pair = (int(value), int(value))
    elif isinstance(value, (tuple, list)):
        if len(value) != 2:
            raise ValueError(f"{name} must be an int or a pair of ints, got {len(value)} values {tuple(value)!r}")
        if not all(_is_int(v) for v in value):
            raise TypeError(f"{name} must be an int or a pair of ints, got {tuple(value)!r}")
        pair = (int(value[0]), int(value[1]))
    else:
        raise TypeError(f"{name} must be an int or a pair of ints, got {type(value).__name__} {value!r}")
    if min(pair) < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {pair}")
    return pair


def positive_int(name: str, value) -> int:
    if not _is_int(value):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}")
    if value < 1:
        raise ValueError(f"{name} must be >= 1, got {value}")
    return int(value)
