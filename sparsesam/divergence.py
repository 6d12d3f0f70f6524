"""Stop a training run whose numbers stopped being numbers, and say where.

A learning rate far too large (``sparsesam train --lr 1e6``) used to end
with exit 0 and an exported model whose BatchNorm ``running_var`` was
inf: in training mode BatchNorm normalises with the batch's own
statistics, so the loss can stay finite while the running statistics the
exported model evaluates with have already overflowed. Two checks stop
such a run before anything is exported:

* :meth:`StepCheck.step` on every step's loss, read from the Python float
  the loop reads anyway for its running mean (``loss.item()``): no extra
  device sync;
* :func:`check_state` at the end of every epoch: every floating parameter
  and buffer of the model (BatchNorm's running statistics included), one
  reduction per tensor and one device sync for all of them.

Both raise :class:`TrainingDiverged` (a FloatingPointError), which names
the epoch and the step; the CLI prints it on one line and exits with
status 3.

Under torchrun both checks are agreed by all ranks (one small all-reduce,
sparsesam.distributed.any_rank): when one rank sees a NaN, every rank
raises at the same step, so none is left waiting in a collective the
others never reach. Without a process group they cost nothing more.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import nn

from .distributed import any_rank


class TrainingDiverged(FloatingPointError):
    """A loss, a parameter or a BatchNorm statistic became NaN or inf during training.

    ``what``: what is non-finite ("the loss is nan"); ``epoch`` (1-based), ``step`` (1-based, within the
    epoch; None for an end-of-epoch check), ``where`` ("train", "magnitude finetune") and ``hint`` ("lr
    1e+06") are filled in by whoever knows them (:meth:`locate`).
    """

    def __init__(self, what: str, *, epoch: Optional[int] = None, step: Optional[int] = None,
                 where: Optional[str] = None, hint: Optional[str] = None) -> None:
        super().__init__(what)
        self.what, self.epoch, self.step, self.where, self.hint = what, epoch, step, where, hint

    def locate(self, *, epoch: Optional[int] = None, where: Optional[str] = None,
               hint: Optional[str] = None) -> "TrainingDiverged":
        """Fill in what the raiser did not know (the fields already set are kept); returns self."""
        self.epoch = self.epoch if self.epoch is not None else epoch
        self.where = self.where if self.where is not None else where
        self.hint = self.hint if self.hint is not None else hint
        return self

    def __str__(self) -> str:
        text = f"{self.where}: " if self.where else ""
        text += f"training diverged: {self.what}"
        if self.epoch is not None and self.step is not None:
            text += f" at epoch {self.epoch}, step {self.step}"
        elif self.epoch is not None:
            text += f" after epoch {self.epoch}"
        elif self.step is not None:
            text += f" at step {self.step}"
        return text + (f" ({self.hint})" if self.hint else "")


class StepCheck:
    """Counts an epoch's steps and refuses a non-finite value of any of them."""

    def __init__(self) -> None:
        self.steps = 0

    def step(self, **values: float) -> None:
        """Count one step; raise TrainingDiverged naming the first of ``values`` (``loss=...``) that is NaN
        or inf (on every rank, if any rank's is)."""
        self.steps += 1
        bad = next(((key, number) for key, number in values.items() if not math.isfinite(number)), None)
        if any_rank(bad is not None):
            what = f"the {bad[0]} is {bad[1]}" if bad is not None else "a value is NaN or inf on another rank"
            raise TrainingDiverged(what, step=self.steps)


@torch.no_grad()
def check_state(model: nn.Module) -> None:
    """Raise TrainingDiverged naming the first parameter or buffer of ``model`` that holds NaN or inf (on
    every rank, if any rank's does: under DDP the BatchNorm statistics of the last step are each rank's own)."""
    problem = _non_finite(model)
    if any_rank(problem is not None):
        raise TrainingDiverged(problem if problem is not None else "a parameter or buffer holds NaN or inf on "
                                                                   "another rank")


def _non_finite(model: nn.Module) -> Optional[str]:
    tensors = [(name, t) for named in (model.named_parameters(), model.named_buffers())
               for name, t in named if t.is_floating_point() and t.numel()]
    if not tensors:
        return None
    device = tensors[0][1].device
    finite = torch.stack([torch.isfinite(t).all().to(device) for _, t in tensors])
    if bool(finite.all()):  # the one sync
        return None
    bad = [name for (name, _), ok in zip(tensors, finite.tolist()) if not ok]
    more = f" (and {len(bad) - 1} more tensor{'s' if len(bad) > 2 else ''})" if len(bad) > 1 else ""
    return f"{bad[0]} holds NaN or inf{more}"
