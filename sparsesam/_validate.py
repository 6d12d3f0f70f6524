"""The checks on numeric settings, in one place: every float is finite and in its range, or refused.

Used by the algorithm configs, the optimizers and the CLI (whose argparse
types and run-time checks call :meth:`Range.problem`, so that the flag is
named). A setting of NaN or inf never makes sense here: NaN fails every
comparison, so a check written ``if value < 0: raise`` lets it through, and
a NaN radius, learning rate or weight decay silently turns a run into
plain SGD or its weights into NaN. The message says what was wanted and
what was given::

    >>> NON_NEGATIVE.check("rho", float("nan"))
    Traceback (most recent call last):
    ValueError: rho must be a finite number >= 0, got nan

Bools and strings are refused (TypeError), not converted: ``True`` or
``"0.5"`` as a float setting is a caller's mistake that float() would hide.
"""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Any, Mapping, Optional


class ConfigError(ValueError):
    """A bad setting given by the user: the CLI prints it on one line and exits with status 2."""


@dataclass(frozen=True)
class Range:
    """The finite numbers between ``low`` and ``high`` (None: unbounded; ``*_open``: the bound excluded)."""

    low: Optional[float] = None
    high: Optional[float] = None
    low_open: bool = False
    high_open: bool = False

    def describe(self) -> str:
        """What a value must be, as the end of "NAME must be ...": "a finite number >= 0", "in [0, 1)"."""
        if self.low is not None and self.high is not None:
            return (f"in {'(' if self.low_open else '['}{_show(self.low)}, "
                    f"{_show(self.high)}{')' if self.high_open else ']'}")
        if self.low is not None:
            return f"a finite number {'>' if self.low_open else '>='} {_show(self.low)}"
        if self.high is not None:
            return f"a finite number {'<' if self.high_open else '<='} {_show(self.high)}"
        return "a finite number"

    def contains(self, value: float) -> bool:
        if not math.isfinite(value):
            return False
        if self.low is not None and (value <= self.low if self.low_open else value < self.low):
            return False
        if self.high is not None and (value >= self.high if self.high_open else value > self.high):
            return False
        return True

    def problem(self, value) -> Optional[str]:
        """None when ``value`` is a real number in this range, else "must be ..., got ..." (no name)."""
        if not is_real(value):
            return f"must be a number, got {type(value).__name__} {value!r}"
        if not self.contains(float(value)):
            return f"must be {self.describe()}, got {_show(float(value))}"
        return None

    def check(self, name: str, value) -> float:
        """``value`` as a float; TypeError (not a number) or ValueError (non-finite, out of range) naming ``name``."""
        problem = self.problem(value)
        if problem is not None:
            raise (ValueError if is_real(value) else TypeError)(f"{name} {problem}")
        return float(value)


FINITE = Range()
NON_NEGATIVE = Range(low=0.0)
POSITIVE = Range(low=0.0, low_open=True)
FRACTION = Range(0.0, 1.0, high_open=True)           # a sparsity: 1 would remove everything
PROBABILITY = Range(0.0, 1.0)
OPEN_PROBABILITY = Range(0.0, 1.0, low_open=True, high_open=True)  # a significance level
MOMENTUM = Range(0.0, 1.0, high_open=True)


def number_problem(value: Any, allowed: Range) -> Optional[str]:
    """None when ``value`` (a number, or a list of them: non-empty, every entry) is in ``allowed``, else
    "must be ..., got ..." (without the flag's name)."""
    if not isinstance(value, (list, tuple)):
        return allowed.problem(value)
    if not value:
        return f"must list one or more numbers, each {allowed.describe()}"
    for i, entry in enumerate(value):
        problem = allowed.problem(entry)
        if problem is not None:
            return f"{problem} (entry {i + 1} of {len(value)})"
    return None


def check_numbers(args: Any, flags: Mapping[str, Range]) -> None:
    """The same ranges on a namespace built in code (not parsed): a ConfigError naming the first flag out of
    its range. ``flags``: ``{"--flag-name": Range}``; a value of None (a default left to the command) passes."""
    for flag, allowed in flags.items():
        value = getattr(args, flag.lstrip("-").replace("-", "_"))
        problem = None if value is None else number_problem(value, allowed)
        if problem is not None:
            raise ConfigError(f"{flag} {problem}")


def is_real(value) -> bool:
    """A Python or NumPy real number, not a bool (a one-element tensor is not: convert it first)."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _show(value: float) -> str:
    """``0`` rather than ``0.0`` for a whole bound; a value as Python prints it (nan, inf, 1e+06)."""
    return str(int(value)) if math.isfinite(value) and value == int(value) and abs(value) < 1e15 else str(value)


def finite_tensor(name: str, tensor) -> None:
    """A floating tensor free of NaN and inf (other dtypes pass): one reduction, and a device sync where the
    tensor lives on an accelerator, so call it where a tensor is taken in, not in a step's inner loop."""
    import torch  # here, so that the scalar checks above stay importable without torch's import cost

    if not tensor.is_floating_point() or bool(torch.isfinite(tensor).all()):
        return
    raise ValueError(f"{name} contains NaN or inf ({int(torch.isnan(tensor).sum())} NaN, "
                     f"{int(torch.isinf(tensor).sum())} inf)")
