"""Baseline: SAM training of the dense model, then magnitude pruning and SAM fine-tuning.

granularity="unstructured" (the default): one global threshold on |w|.
granularity="channel": ``target_sparsity`` of the output channels removed
by L2 norm, exactly as AdaSAP prunes (see _channels.py): the "SAM + prune"
baseline of structured pruning.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..nn import sparsify
from ..optim import SAM
from ..pruning import channel_sparsity, global_sparsity, magnitude_prune
from . import _config
from ._channels import GRANULARITIES, compact_summary, gate, prune_channels_l2
from ..training import cross_entropy_loss
from ._steps import EpochMeter, sam_step
from .base import Algorithm


@dataclass
class SamPruneConfig(_config.TrainingConfig):
    sam_epochs: int = 10
    finetune_epochs: int = 10
    lr: float = 0.05
    finetune_lr: float = 0.01
    rho: float = 0.05
    adaptive: bool = False
    granularity: str = "unstructured"  # or "channel": structured, target_sparsity = fraction of channels
    channel_scope: str = "layer"       # channel granularity: "layer" (every layer loses the fraction) or "global"

    def check(self) -> None:
        super().check()
        _config.count("sam_epochs", self.sam_epochs)
        _config.count("finetune_epochs", self.finetune_epochs)
        _config.non_negative("lr", self.lr, positive=True)
        _config.non_negative("finetune_lr", self.finetune_lr, positive=True)
        _config.non_negative("rho", self.rho)
        _config.choice("granularity", self.granularity, GRANULARITIES)
        _config.choice("channel_scope", self.channel_scope, ("layer", "global"))


class SamPrune(Algorithm):
    """SAM (rho, optionally ASAM) on the dense model; magnitude prune to the target; fine-tune with SAM.

    The model is sparsified at the start with a mask of ones (exactly the
    dense model), so every phase has the same state_dict layout.
    """

    config_type = SamPruneConfig
    name = "sam_prune"
    data_parallel = True  # pruning reads the weights (equal on every rank); every epoch is a plain / SAM step

    def phases(self):
        return [("sam", self.config.sam_epochs), ("finetune", self.config.finetune_epochs)]

    @property
    def structured(self) -> bool:
        return self.config.granularity == "channel"

    def _compacts(self, phase):
        return phase == "finetune" and self.structured  # fine-tune the compacted model, as AdaSAP does

    def _restructure(self, phase, model, loader):
        sparsify(model)
        if phase == "finetune" and self.structured:
            gate(model, loader)

    def _enter(self, phase, model, loader):
        if phase == "sam":
            sparsify(model)
        elif self.structured:
            prune_channels_l2(model, loader, self.config.target_sparsity, self.config.channel_scope)
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
            loss, logits = sam_step(model, x, y, optimizer, cross_entropy_loss, self.step)
            self.step += 1
            meter.add(len(y), logits, y, loss=loss)
        return meter.means()

    def _sparsity(self, model):
        return channel_sparsity(model) if self.structured else global_sparsity(model)

    def _summary(self, model, loader):
        return compact_summary(model, loader) if self.structured else ({}, None)
