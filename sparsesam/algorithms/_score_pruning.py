"""Score-based pruning with frozen weights, then fine-tuning with the mask fixed (HYDRA, and HARP on top).

Phase "search": the conv / linear weights are frozen; every prunable
layer's mask keeps the largest |s| at its rate k_l (GetSubnet's count:
``numel - int((1 - k_l) numel)`` weights, ``round(k_l C)`` output channels,
or n of every m), for scores s initialised from |w| (attach_scores,
HYDRA's scaled init), learnt through the straight-through estimator under
the (adversarial) training loss plus whatever regulariser the subclass
adds. The score-to-mask step is sparsesam.pruning.ScoreToMask: a
threshold selection forward and the fused ``mask_score_grad`` backward.
Phase "finetune": the binary masks are frozen (freeze_scores) and the
weights are trained under the same loss. Subclasses choose the per-layer
rates (fixed floats for HYDRA, learnable modules for HARP), which
parameters the search trains and the regulariser.
"""
from __future__ import annotations

from abc import abstractmethod
from dataclasses import dataclass
from typing import Dict, List, Optional

import torch
from torch import nn

from ..nn import masked_layers, sparsify
from ..pruning import GRANULARITIES, attach_scores, freeze_scores, score_parameters
from ..pruning._common import prunable_layers
from . import _config
from ._steps import LOSSES, EpochMeter, make_loss, plain_step
from .base import Algorithm


@dataclass
class ScorePruningConfig(_config.TrainingConfig):
    search_epochs: int = 20
    finetune_epochs: int = 20
    score_lr: float = 0.1            # HYDRA's score learning rate (SGD, momentum)
    finetune_lr: float = 0.01
    granularity: str = "unstructured"  # "unstructured", "channel" or "nm"
    n: int = 2                       # N:M: keep n of every m
    m: int = 4
    loss: str = "pgd_at"             # "clean", "pgd_at", "trades" or "mart"
    eps: float = 8 / 255             # L-inf radius of the training attack (images in [0, 1])
    attack_steps: int = 10
    beta: float = 6.0                # TRADES / MART trade-off

    def check(self) -> None:
        super().check()
        _config.count("search_epochs", self.search_epochs)
        _config.count("finetune_epochs", self.finetune_epochs)
        _config.non_negative("score_lr", self.score_lr, positive=True)
        _config.non_negative("finetune_lr", self.finetune_lr, positive=True)
        _config.choice("granularity", self.granularity, GRANULARITIES)
        _config.count("n", self.n, 1)
        _config.count("m", self.m, 1)
        if self.n > self.m:
            raise ValueError(f"n must be <= m, got n={self.n}, m={self.m}")
        if self.granularity == "nm" and abs((1 - self.n / self.m) - self.target_sparsity) > 1e-9:
            raise ValueError(f"target_sparsity must be 1 - n/m = {1 - self.n / self.m} for granularity='nm', "
                             f"got {self.target_sparsity}")
        _config.choice("loss", self.loss, LOSSES)
        _config.non_negative("eps", self.eps)
        _config.count("attack_steps", self.attack_steps, 1)
        _config.non_negative("beta", self.beta)


class ScorePruning(Algorithm):
    """Shared body of HYDRA and HARP (see the module docstring)."""

    # The scores (and HARP's rate parameters, submodules of the score parametrizations) are parameters of the
    # model DDP wraps: it averages their gradients, so every rank takes the same step and the score-to-mask
    # step gives the same masks; the regulariser (HARP's L_hw) is added on every rank and so counted once in
    # the average.
    data_parallel = True

    def __init__(self, config=None) -> None:
        super().__init__(config)
        c = self.config
        self.loss_fn = make_loss(c.loss, eps=c.eps, attack_steps=c.attack_steps, beta=c.beta, seed=c.seed)
        self.rates: Dict[str, object] = {}

    @property
    def keep_target(self) -> float:
        return 1.0 - self.config.target_sparsity

    def phases(self):
        return [("search", self.config.search_epochs), ("finetune", self.config.finetune_epochs)]

    # ----------------------------------------------------------- structure
    def scored_layers(self, model: nn.Module) -> List[tuple]:
        """The layers that get scores, as attach_scores picks them.

        No classifier under channel masks (it would lose classes); N:M only where m divides the inputs.
        """
        c = self.config
        layers = prunable_layers(model, keep_output_layer=c.granularity == "channel")
        return [(name, layer) for name, layer in layers if not (c.granularity == "nm" and layer.weight.shape[1] % c.m)]

    @abstractmethod
    def _make_rates(self, layers) -> Dict[str, object]:
        """The keep-rate of each scored layer by name: a fixed number (HYDRA) or a learnable module (HARP)."""

    def _regulariser(self, epoch: int) -> Optional[torch.Tensor]:
        return None

    def _restructure(self, phase, model, loader):
        if phase == "search":
            sparsify(model, mask_mode="trainable")
            layers = self.scored_layers(model)
            self.rates = self._make_rates(layers)
            names = [name for name, _ in layers]
            attach_scores(model, None if self.config.granularity == "nm" else self.rates, self.config.granularity,
                          self.config.n, self.config.m, init="hydra", include=names, keep_output_layer=False)
            self._freeze_weights(model)
        else:
            sparsify(model)

    def _freeze_weights(self, model: nn.Module) -> None:
        learnt = {id(p) for p in self._search_parameters(model)}
        for p in model.parameters():
            p.requires_grad_(id(p) in learnt)

    def _search_parameters(self, model: nn.Module) -> List[nn.Parameter]:
        return score_parameters(model)

    def _enter(self, phase, model, loader):
        if phase == "search":
            self._restructure(phase, model, loader)
            return
        self._before_freeze(model)
        freeze_scores(model)
        # Layers without scores (the classifier under channel masks) keep their all-ones mask, fixed.
        for _, layer in masked_layers(model):
            if layer.mask_mode == "trainable":
                mask = layer.weight_mask.detach().clone()
                del layer.weight_mask
                layer._init_mask("fixed", mask)
        for p in model.parameters():
            p.requires_grad_(True)
        self.rates = {}

    def _before_freeze(self, model: nn.Module) -> None:
        pass

    # ------------------------------------------------------------ training
    def _optimizer(self, phase, model):
        c = self.config
        if phase == "search":
            optimizer = torch.optim.SGD(score_parameters(model), lr=c.score_lr, momentum=c.momentum,
                                        weight_decay=c.weight_decay)
            return optimizer, [c.score_lr]
        optimizer = torch.optim.SGD(model.parameters(), lr=c.finetune_lr, momentum=c.momentum,
                                    weight_decay=c.weight_decay)
        return optimizer, [c.finetune_lr]

    def _epoch_extras(self, phase: str, epoch: int) -> Dict[str, float]:
        return {}

    def _train_epoch(self, phase, epoch, model, loader, optimizer, bar):
        meter = EpochMeter(bar)
        regulariser = (lambda: self._regulariser(epoch)) if phase == "search" and self._has_regulariser() else None
        for x, y in bar:
            loss, logits, extras = plain_step(model, x, y, optimizer, self.loss_fn, self.step, regulariser)
            self.step += 1
            meter.add(len(y), logits, y, loss=loss, **extras)
        return {**meter.means(), **(self._epoch_extras(phase, epoch) if phase == "search" else {})}

    def _has_regulariser(self) -> bool:
        return False

    def _sparsity(self, model):
        names = {name for name, _ in self.scored_layers(model)}
        total = pruned = 0
        for name, layer in masked_layers(model):
            if name in names:
                mask = layer.weight_mask.detach()
                total += mask.numel()
                pruned += mask.numel() - int(torch.count_nonzero(mask))
        return pruned / max(total, 1)

    def _summary(self, model, loader):
        per_layer = {}
        names = {name for name, _ in self.scored_layers(model)}
        for name, layer in masked_layers(model):
            if name in names:
                per_layer[name] = layer.sparsity
        return {"layer_sparsity": per_layer, "granularity": self.config.granularity}, None
