"""Baseline: SAM training of the dense model, then global magnitude pruning and SAM fine-tuning."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..nn import sparsify
from ..optim import SAM
from ..pruning import global_sparsity, magnitude_prune
from . import _config
from ._steps import EpochMeter, clean_loss, sam_step
from .base import Algorithm


@dataclass
class SamPruneConfig(_config.TrainingConfig):
    sam_epochs: int = 10
    finetune_epochs: int = 10
    lr: float = 0.05
    finetune_lr: float = 0.01
    rho: float = 0.05
    adaptive: bool = False

    def check(self) -> None:
        super().check()
        _config.count("sam_epochs", self.sam_epochs)
        _config.count("finetune_epochs", self.finetune_epochs)
        _config.non_negative("lr", self.lr, positive=True)
        _config.non_negative("finetune_lr", self.finetune_lr, positive=True)
        _config.non_negative("rho", self.rho)


class SamPrune(Algorithm):
    """SAM (rho, optionally ASAM) on the dense model; magnitude prune to the target; fine-tune with SAM.

    The model is sparsified at the start with a mask of ones (exactly the
    dense model), so every phase has the same state_dict layout.
    """

    config_type = SamPruneConfig
    name = "sam_prune"

    def phases(self):
        return [("sam", self.config.sam_epochs), ("finetune", self.config.finetune_epochs)]

    def _restructure(self, phase, model, loader):
        sparsify(model)

    def _enter(self, phase, model, loader):
        if phase == "sam":
            sparsify(model)
        else:
            magnitude_prune(model, self.config.target_sparsity, scope="global")

    def _optimizer(self, phase, model):
        c = self.config
        lr = c.lr if phase == "sam" else c.finetune_lr
        optimizer = SAM(model.parameters(), torch.optim.SGD, rho=c.rho, adaptive=c.adaptive, model=model, lr=lr,
                        momentum=c.momentum, weight_decay=c.weight_decay)
        return optimizer, [lr]

    def _train_epoch(self, phase, epoch, model, loader, optimizer, bar):
        meter = EpochMeter(bar)
        for x, y in bar:
            loss, logits = sam_step(model, x, y, optimizer, clean_loss, self.step)
            self.step += 1
            meter.add(len(y), logits, y, loss=loss)
        return meter.means()

    def _sparsity(self, model):
        return global_sparsity(model)
