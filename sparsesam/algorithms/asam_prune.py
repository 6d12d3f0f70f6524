"""Baseline: uniform ASAM, then AdaSAP's pruning and fine-tuning -- AdaSAP's control.

AdaSAP differs from "train with ASAM, prune, fine-tune" in one thing: the
radius of each output channel follows its importance score. asam_prune is
AdaSAP with that one thing removed -- every parameter gets the same ASAM
radius ``rho`` in phase 1 -- and everything else inherited: the same
channel criterion (L2 by default, or Taylor), the same scope, the same
residual-coupled groups ranked together, the same gates, the same
fine-tuning (uniform ASAM at ``finetune_rho`` on the compacted model) and
the same summary. A comparison of the two isolates the effect of the
adaptive radii (the study's AdaSAP comparison uses it as its "SAM + prune"
control; plain-SAM sam_prune would also change the perturbation's form).

target_sparsity is the fraction of output channels removed, as for AdaSAP.
The phase names are AdaSAP's ("adaptive": ASAM is adaptive SAM).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict

from ..pruning import CHANNEL_CRITERIA
from . import _config
from .adasap import AdaSAP


@dataclass
class AsamPruneConfig(_config.TrainingConfig):
    adaptive_epochs: int = 10        # phase 1: uniform ASAM (one radius) on the dense model
    finetune_epochs: int = 10        # phase 3: uniform ASAM on the pruned network, as AdaSAP
    lr: float = 0.05                 # AdaSAP's
    finetune_lr: float = 0.01
    rho: float = 0.5                 # the one phase-1 radius (ASAM's CIFAR value, AdaSAP's fine-tuning radius)
    finetune_rho: float = 0.5
    adaptive: bool = True            # ASAM-style perturbation |w|^2 g / || |w| g ||
    criterion: str = "l2"            # "l2" or "taylor", as AdaSAP
    scope: str = "layer"             # "layer" or "global", as AdaSAP
    taylor_batches: int = 8

    def check(self) -> None:
        super().check()
        _config.count("adaptive_epochs", self.adaptive_epochs)
        _config.count("finetune_epochs", self.finetune_epochs)
        _config.non_negative("lr", self.lr, positive=True)
        _config.non_negative("finetune_lr", self.finetune_lr, positive=True)
        _config.non_negative("rho", self.rho)
        _config.non_negative("finetune_rho", self.finetune_rho)
        _config.choice("criterion", self.criterion, CHANNEL_CRITERIA)
        _config.choice("scope", self.scope, ("layer", "global"))
        _config.count("taylor_batches", self.taylor_batches, 1)


class AsamPrune(AdaSAP):
    """Uniform ASAM (one radius) -> AdaSAP's structured channel pruning -> AdaSAP's fine-tuning."""

    config_type = AsamPruneConfig
    name = "asam_prune"

    def _group_rho(self) -> float:
        return self.config.rho

    def _refresh_radii(self, model, loader, optimizer) -> Dict[str, float]:
        # One radius for every parameter: no per-channel override, nothing to refresh.
        return {}
