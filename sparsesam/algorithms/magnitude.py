"""Baseline: global magnitude pruning to the target, then fine-tuning with the mask fixed."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..nn import sparsify
from ..pruning import global_sparsity, magnitude_prune
from . import _config
from ._steps import EpochMeter, clean_loss, plain_step
from .base import Algorithm


@dataclass
class MagnitudeConfig(_config.TrainingConfig):
    finetune_epochs: int = 10
    lr: float = 0.01

    def check(self) -> None:
        super().check()
        _config.count("finetune_epochs", self.finetune_epochs)
        _config.non_negative("lr", self.lr, positive=True)


def sgd(model: nn.Module, lr: float, config) -> torch.optim.SGD:
    params = [p for p in model.parameters() if p.requires_grad]
    return torch.optim.SGD(params, lr=lr, momentum=config.momentum, weight_decay=config.weight_decay)


class Magnitude(Algorithm):
    """Keep the largest ``1 - target_sparsity`` of all masked weights by |w| (one global threshold); fine-tune."""

    config_type = MagnitudeConfig
    name = "magnitude"

    def phases(self):
        return [("finetune", self.config.finetune_epochs)]

    def _restructure(self, phase, model, loader):
        sparsify(model)

    def _enter(self, phase, model, loader):
        sparsify(model)
        magnitude_prune(model, self.config.target_sparsity, scope="global")

    def _optimizer(self, phase, model):
        return sgd(model, self.config.lr, self.config), [self.config.lr]

    def _train_epoch(self, phase, epoch, model, loader, optimizer, bar):
        meter = EpochMeter(bar)
        for x, y in bar:
            loss, logits, _ = plain_step(model, x, y, optimizer, clean_loss, self.step)
            self.step += 1
            meter.add(len(y), logits, y, loss=loss)
        return meter.means()

    def _sparsity(self, model):
        return global_sparsity(model)
