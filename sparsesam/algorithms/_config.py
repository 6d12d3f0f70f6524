"""Checks on the algorithms' config fields: every error names the field."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

from .. import _validate


def fraction(name: str, value, *, high_open: bool = True) -> None:
    """A real number in [0, 1) (or [0, 1] with high_open=False); NaN and inf are refused."""
    (_validate.FRACTION if high_open else _validate.PROBABILITY).check(name, value)


def count(name: str, value, minimum: int = 0) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")


def non_negative(name: str, value, *, positive: bool = False) -> None:
    """A finite real number >= 0 (> 0 with positive=True)."""
    (_validate.POSITIVE if positive else _validate.NON_NEGATIVE).check(name, value)


def choice(name: str, value, choices: Iterable) -> None:
    choices = tuple(choices)
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")


@dataclass
class TrainingConfig:
    """Fields every algorithm has: the target, the seed and SGD's settings (each config has its own learning rates)."""

    target_sparsity: float = 0.5
    seed: int = 0
    momentum: float = 0.9
    weight_decay: float = 5e-4
    cosine: bool = True  # cosine-anneal each phase's learning rate over its epochs
    # How the fixed-mask phases (fine-tuning) run their masked layers: "auto" (each layer times dense and the
    # sparse formats its mask allows on a training batch and keeps the fastest), "dense", "sparse", or a
    # format's name ("csr", "bsr", "nm"); see sparsesam.nn.set_execution.
    execution: str = "auto"

    def check(self) -> None:
        fraction("target_sparsity", self.target_sparsity)
        count("seed", self.seed)
        fraction("momentum", self.momentum)
        non_negative("weight_decay", self.weight_decay)
        if not isinstance(self.cosine, bool):
            raise TypeError(f"cosine must be a bool, got {type(self.cosine).__name__}")
        from ..nn import executions  # the formats registered now
        choice("execution", self.execution, executions())

    def __post_init__(self) -> None:
        self.check()


def check_config(config) -> None:
    """Check a config again (a dataclass may have been changed after construction)."""
    config.check()
