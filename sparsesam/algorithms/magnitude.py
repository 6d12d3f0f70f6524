"""Baseline: magnitude pruning to the target, then fine-tuning with the mask fixed.

granularity="unstructured" (the default): one global threshold on |w|.
granularity="channel": ``target_sparsity`` of the output channels removed
by L2 norm, exactly as AdaSAP prunes (see _channels.py): the
"magnitude + fine-tune" baseline of structured pruning; it fine-tunes the
compacted model, as AdaSAP does (see _compacted.py).

Fine-tuning runs its masked layers in ``execution`` form (default "auto":
sparse where measured faster); see base.py.

loss: the fine-tuning loss, "clean" or an adversarial one ("pgd_at",
"trades", "mart" with eps / attack_steps / beta): magnitude pruning with
adversarial fine-tuning is the baseline HARP and HYDRA are compared with.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..nn import sparsify
from ..pruning import channel_sparsity, global_sparsity, magnitude_prune
from . import _config
from ._channels import GRANULARITIES, compact_summary, gate, prune_channels_l2
from ._steps import LOSSES, EpochMeter, make_loss, plain_step
from .base import Algorithm


@dataclass
class MagnitudeConfig(_config.TrainingConfig):
    finetune_epochs: int = 10
    lr: float = 0.01
    granularity: str = "unstructured"  # or "channel": structured, target_sparsity = fraction of channels
    channel_scope: str = "layer"       # channel granularity: "layer" (every layer loses the fraction) or "global"
    loss: str = "clean"                # fine-tuning loss: "clean", "pgd_at", "trades" or "mart"
    eps: float = 8 / 255               # L-inf radius of the training attack (images in [0, 1])
    attack_steps: int = 10
    beta: float = 6.0                  # TRADES / MART trade-off

    def check(self) -> None:
        super().check()
        _config.count("finetune_epochs", self.finetune_epochs)
        _config.non_negative("lr", self.lr, positive=True)
        _config.choice("granularity", self.granularity, GRANULARITIES)
        _config.choice("channel_scope", self.channel_scope, ("layer", "global"))
        _config.choice("loss", self.loss, LOSSES)
        _config.non_negative("eps", self.eps)
        _config.count("attack_steps", self.attack_steps, 1)
        _config.non_negative("beta", self.beta)


def sgd(model: nn.Module, lr: float, config) -> torch.optim.SGD:
    params = [p for p in model.parameters() if p.requires_grad]
    return torch.optim.SGD(params, lr=lr, momentum=config.momentum, weight_decay=config.weight_decay)


class Magnitude(Algorithm):
    """Keep the largest ``1 - target_sparsity`` of all masked weights by |w| (one global threshold), or of the
    channels by L2 norm (granularity="channel"); fine-tune under ``loss``."""

    config_type = MagnitudeConfig
    name = "magnitude"
    data_parallel = True  # pruning reads the weights (equal on every rank); every epoch is a plain / SAM step

    def __init__(self, config=None) -> None:
        super().__init__(config)
        c = self.config
        self.loss_fn = make_loss(c.loss, eps=c.eps, attack_steps=c.attack_steps, beta=c.beta, seed=c.seed)

    @property
    def structured(self) -> bool:
        return self.config.granularity == "channel"

    def phases(self):
        return [("finetune", self.config.finetune_epochs)]

    def _compacts(self, phase):
        return self.structured  # channel granularity fine-tunes the physically smaller model

    def _restructure(self, phase, model, loader):
        sparsify(model)
        if self.structured:
            gate(model, loader)

    def _enter(self, phase, model, loader):
        sparsify(model)
        if self.structured:
            prune_channels_l2(model, loader, self.config.target_sparsity, self.config.channel_scope)
        else:
            magnitude_prune(model, self.config.target_sparsity, scope="global")

    def _optimizer(self, phase, model):
        return sgd(model, self.config.lr, self.config), [self.config.lr]

    def _train_epoch(self, phase, epoch, model, loader, optimizer, bar):
        meter = EpochMeter(bar)
        for x, y in bar:
            loss, logits, _ = plain_step(model, x, y, optimizer, self.loss_fn, self.step)
            self.step += 1
            meter.add(len(y), logits, y, loss=loss)
        return meter.means()

    def _sparsity(self, model):
        return channel_sparsity(model) if self.structured else global_sparsity(model)

    def _summary(self, model, loader):
        return compact_summary(model, loader) if self.structured else ({}, None)
