"""Channel counts under a width multiplier, shared by the models that take one."""
from __future__ import annotations


def check_width(width: float) -> float:
    """``width`` as a float, or a ValueError naming it (it must be a positive number)."""
    if isinstance(width, bool) or not isinstance(width, (int, float)) or not width > 0:
        raise ValueError(f"width must be a positive number (a multiplier of the paper's channels), got {width!r}")
    return float(width)


def scaled(channels: int, width: float) -> int:
    """``channels * width`` rounded, never below 1 (so a tiny multiplier still builds a network)."""
    return max(1, int(round(channels * width)))
