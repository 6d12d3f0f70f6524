"""Sparsity schedules: small objects that say the target sparsity at a training step.

``schedule(step)`` is the sparsity the masks should have at ``step``;
``schedule.is_update_step(step)`` says whether to recompute masks there.
Between updates the target holds its last value, so ``schedule(step)`` is
always the sparsity the model has after the updates up to ``step``.
"""
from __future__ import annotations

from abc import ABC, abstractmethod

from ._common import check_fraction


def _check_int(name: str, value, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return value


class SparsitySchedule(ABC):
    """Base: the target sparsity at a step, and the steps where masks change."""

    final_sparsity: float

    @abstractmethod
    def __call__(self, step: int) -> float:
        """The target sparsity after the updates up to ``step``."""

    @abstractmethod
    def is_update_step(self, step: int) -> bool:
        """Whether the masks are recomputed at ``step``."""

    def __repr__(self) -> str:
        fields = ", ".join(f"{k}={v!r}" for k, v in vars(self).items())
        return f"{type(self).__name__}({fields})"


class OneShot(SparsitySchedule):
    """Dense until ``step``, then ``final_sparsity`` at once."""

    def __init__(self, final_sparsity: float, step: int = 0) -> None:
        self.final_sparsity = check_fraction("final_sparsity", final_sparsity)
        self.step = _check_int("step", step, 0)

    def __call__(self, step: int) -> float:
        return self.final_sparsity if step >= self.step else 0.0

    def is_update_step(self, step: int) -> bool:
        return step == self.step


class Iterative(SparsitySchedule):
    """``rounds`` pruning rounds, ``interval`` steps apart, the first at ``start_step``.

    spacing="geometric" (iterative magnitude pruning, Frankle & Carbin):
    every round removes the same fraction of the weights still kept, so after
    round i of k the sparsity is ``1 - (1 - s_f)^(i/k)``; "linear": ``s_f * i/k``.
    """

    SPACINGS = ("geometric", "linear")

    def __init__(self, final_sparsity: float, rounds: int, interval: int, start_step: int = 0,
                 spacing: str = "geometric") -> None:
        self.final_sparsity = check_fraction("final_sparsity", final_sparsity)
        self.rounds = _check_int("rounds", rounds, 1)
        self.interval = _check_int("interval", interval, 1)
        self.start_step = _check_int("start_step", start_step, 0)
        if spacing not in self.SPACINGS:
            raise ValueError(f"spacing must be one of {self.SPACINGS}, got {spacing!r}")
        self.spacing = spacing

    def rounds_done(self, step: int) -> int:
        if step < self.start_step:
            return 0
        return min(self.rounds, (step - self.start_step) // self.interval + 1)

    def __call__(self, step: int) -> float:
        i = self.rounds_done(step)
        if i == self.rounds:
            return self.final_sparsity  # exactly, not up to rounding of the power
        if self.spacing == "linear":
            return self.final_sparsity * i / self.rounds
        return 1.0 - (1.0 - self.final_sparsity) ** (i / self.rounds)

    def is_update_step(self, step: int) -> bool:
        offset = step - self.start_step
        return 0 <= offset < self.rounds * self.interval and offset % self.interval == 0


class GradualCubic(SparsitySchedule):
    """Zhu & Gupta (2017): ``s_t = s_f + (s_i - s_f) (1 - (t - t0) / (n dt))^3``.

    Masks are updated every ``frequency`` (dt) steps from ``start_step`` (t0)
    for ``num_updates`` (n) intervals, i.e. at t0, t0 + dt, ..., t0 + n dt;
    the sparsity rises fast at first and levels off at ``final_sparsity``.
    Before t0 the target is ``initial_sparsity``.
    """

    def __init__(self, final_sparsity: float, num_updates: int, frequency: int = 1, start_step: int = 0,
                 initial_sparsity: float = 0.0) -> None:
        self.final_sparsity = check_fraction("final_sparsity", final_sparsity)
        self.initial_sparsity = check_fraction("initial_sparsity", initial_sparsity)
        if self.initial_sparsity > self.final_sparsity:
            raise ValueError(f"initial_sparsity ({initial_sparsity}) must not exceed final_sparsity ({final_sparsity})")
        self.num_updates = _check_int("num_updates", num_updates, 1)
        self.frequency = _check_int("frequency", frequency, 1)
        self.start_step = _check_int("start_step", start_step, 0)

    @property
    def end_step(self) -> int:
        return self.start_step + self.num_updates * self.frequency

    def __call__(self, step: int) -> float:
        if step < self.start_step:
            return self.initial_sparsity
        # The value holds between updates: evaluate at the last update step.
        last = min(step, self.end_step)
        last -= (last - self.start_step) % self.frequency
        progress = (last - self.start_step) / (self.num_updates * self.frequency)
        return self.final_sparsity + (self.initial_sparsity - self.final_sparsity) * (1.0 - progress) ** 3

    def is_update_step(self, step: int) -> bool:
        offset = step - self.start_step
        return 0 <= offset <= self.num_updates * self.frequency and offset % self.frequency == 0
