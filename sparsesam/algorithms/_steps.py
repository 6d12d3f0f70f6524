"""Training steps the algorithms share: a plain step, a SAM step, and the (adversarial) losses.

A loss function here is ``loss_fn(model, x, y, step) -> (loss, logits)``:
``step`` seeds whatever it draws (the attack's random start), so a run
resumed from a checkpoint draws the same numbers; ``logits`` are the clean
predictions used for the training accuracy (None: measured separately).

Every algorithm's epoch adds each step's values to an :class:`EpochMeter`,
which refuses a NaN or inf one (sparsesam.divergence.TrainingDiverged,
naming the step; Algorithm.fit adds the phase and the epoch): the values
are Python floats the step has read already, so the check costs no sync.
"""
from __future__ import annotations

from typing import Callable, Dict, Optional, Tuple

import torch
from torch import nn

from ..divergence import StepCheck
from ..training import cross_entropy_loss, take_step
from ..robust import mart_loss, pgd_at_loss, trades_loss
from ..robust.model_state import eval_mode

LossFn = Callable[[nn.Module, torch.Tensor, torch.Tensor, int], Tuple[torch.Tensor, Optional[torch.Tensor]]]
ADVERSARIAL_LOSSES = {"pgd_at": pgd_at_loss, "trades": trades_loss, "mart": mart_loss}
LOSSES = ("clean", *ADVERSARIAL_LOSSES)


def make_loss(name: str, *, eps: float, attack_steps: int, beta: float, seed: int) -> LossFn:
    """"clean" (cross-entropy) or an adversarial training loss of sparsesam.robust, L-inf, eps in [0, 1] pixels."""
    if name == "clean":
        return cross_entropy_loss
    adversarial = ADVERSARIAL_LOSSES[name]
    extra = {} if name == "pgd_at" else {"beta": beta}

    def loss_fn(model, x, y, step):
        # Attack seeds differ per step and per run seed, and are reproducible from the step counter alone.
        loss = adversarial(model, x, y, eps=eps, steps=attack_steps, seed=seed * 1_000_003 + step, **extra)
        return loss, None

    return loss_fn


class EpochMeter:
    """Running means of a training epoch, shown on the progress bar; a NaN or inf value stops the run."""

    def __init__(self, bar) -> None:
        self.bar = bar
        self.sums: Dict[str, float] = {}
        self.seen = 0
        self.correct = 0
        self.check = StepCheck()

    def add(self, batch_size: int, logits: Optional[torch.Tensor], y: torch.Tensor, **values: float) -> None:
        """One step's batch: its size, clean logits (None: no accuracy) and values (the loss, ...); raises
        TrainingDiverged if a value is NaN or inf."""
        self.check.step(**values)
        self.seen += batch_size
        for key, value in values.items():
            self.sums[key] = self.sums.get(key, 0.0) + float(value) * batch_size
        if logits is not None:
            self.correct += int((logits.argmax(1) == y).sum())
        self.bar.set_postfix({k: f"{v / self.seen:.3f}" for k, v in self.sums.items()})

    def means(self) -> Dict[str, float]:
        out = {key: value / max(self.seen, 1) for key, value in self.sums.items()}
        out["accuracy"] = self.correct / max(self.seen, 1)
        return out


@torch.no_grad()
def clean_logits(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Predictions in eval mode (BatchNorm statistics untouched), for the accuracy of adversarial epochs."""
    with eval_mode(model):
        return model(x)


def plain_step(model: nn.Module, x, y, optimizer: torch.optim.Optimizer, loss_fn: LossFn, step: int,
               extra_loss: Optional[Callable[[], torch.Tensor]] = None) -> Tuple[float, torch.Tensor, Dict[str, float]]:
    """One step of ``optimizer`` on ``loss_fn (+ extra_loss())``; returns (task loss, clean logits, extras)."""
    loss, logits, extras = take_step(model, x, y, optimizer, loss_fn, step, sam=False, extra_loss=extra_loss)
    if logits is None:
        logits = clean_logits(model, x)
    return loss.item(), logits.detach(), extras


def sam_step(model: nn.Module, x, y, optimizer, loss_fn: LossFn, step: int) -> Tuple[float, torch.Tensor]:
    """SAM's two passes (training.take_step); returns (task loss, clean logits)."""
    loss, logits, _ = take_step(model, x, y, optimizer, loss_fn, step, sam=True)
    if logits is None:
        logits = clean_logits(model, x)
    return loss.item(), logits.detach()
