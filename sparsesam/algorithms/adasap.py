"""AdaSAP: Adaptive Sharpness-Aware Pruning (ICLR 2024), in three phases.

1. *Adaptive weight perturbation.* ASAM training in which every output
   channel i of a prunable layer has its own radius

       rho_i = rho_max - (s_i - s_min) / (s_max - s_min) * (rho_max - rho_min)

   from its importance score s_i (the pruning criterion: L2 norm or Taylor),
   so the channels likely to be pruned are pushed hardest into flat regions
   and their removal costs little. Scores and radii are refreshed at the
   start of every epoch (SAM.set_channel_rho). The radii come from the
   scores pruning ranks: the convolutions whose outputs meet in a residual
   sum (coupled_channel_groups) are pruned together by their group's mean
   score, so they get one radius per channel from that score, the same in
   every member (channel_radii); s_min / s_max are taken over each such
   unit (scope="layer") or all of them ("global"). Other parameters
   (biases, BatchNorm, the classifier) get rho_min: nothing marks them for
   removal.
2. *Structured pruning* of ``target_sparsity`` of the output channels by the
   same criterion; the convolutions whose outputs meet in a residual sum
   are ranked together (coupled_channel_groups), and the pruned channels
   are gated (gate_pruned_channels) so that the masked model computes what
   the physically smaller one computes.
3. *Fine-tuning* with uniform ASAM (one radius) on the pruned network,
   which is first compacted in place: the fine-tuning trains the physically
   smaller model (torch-pruning through compact_channels; see
   _compacted.py), whose gradients are the gated masked model's up to float
   rounding. A resumed run rebuilds that structure from the kept channel
   indices saved in the checkpoint. At the end the trained small model is
   put back into the original architecture, masked and gated (removed
   channels hold zeros), which is what fit() returns.

Under torchrun (``fit(..., parallel=wrap_ddp)``) every phase is a SAM
step through DDP (both passes' gradients averaged, so one norm and one
step on every rank), and the channel scores are made the same on every
rank: L2 scores read the weights (equal everywhere); Taylor scores, which
each rank accumulates from its own batches, are averaged over the ranks
(weighted by the samples each scored) before they set radii or prune.
That average is not what one process would score on the concatenated
batches (a batch's score is ``|sum w g|``, not linear in the batch), only
the same on every rank.

No official implementation was found (searched by name and title); the
formula and defaults are the paper's. asam_prune (asam_prune.py) is this
algorithm with one radius for every channel: its control.

target_sparsity is the fraction of output channels removed from the
prunable layers (all masked layers but the classifier). The result's
compact_model is the physically smaller plain model (compact_channels);
the summary reports its parameters and MACs ("trained_compacted": the sizes
of the model the fine-tuning trained).
"""
from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from ..distributed import all_reduce_tensors_mean, unwrap, world
from ..nn import sparsify
from ..optim import SAM
from ..pruning import (CHANNEL_CRITERIA, accumulate_taylor, channel_prune, channel_scores, channel_sparsity,
                       compact_channels, coupled_channel_groups, gate_pruned_channels, global_sparsity,
                       prune_channels)
from ..pruning._common import prunable_layers
from ..pruning.channel import coupled_unit_scores
from . import _config
from ..training import cross_entropy_loss
from ._steps import EpochMeter, sam_step
from .base import Algorithm, example_input, model_device, on_device


@dataclass
class AdaSAPConfig(_config.TrainingConfig):
    adaptive_epochs: int = 10        # phase 1: ASAM with per-channel radii
    finetune_epochs: int = 10        # phase 3: uniform ASAM on the pruned network
    lr: float = 0.05
    finetune_lr: float = 0.01
    rho_min: float = 0.01            # the paper's defaults
    rho_max: float = 2.0
    finetune_rho: float = 0.5        # uniform ASAM radius for fine-tuning (ASAM's CIFAR value)
    adaptive: bool = True            # ASAM-style perturbation |w|^2 g / || |w| g ||
    criterion: str = "l2"            # "l2" or "taylor"
    scope: str = "layer"             # "layer" (each layer loses target_sparsity) or "global"
    taylor_batches: int = 8          # batches whose gradients give Taylor scores

    def check(self) -> None:
        super().check()
        _config.count("adaptive_epochs", self.adaptive_epochs)
        _config.count("finetune_epochs", self.finetune_epochs)
        _config.non_negative("lr", self.lr, positive=True)
        _config.non_negative("finetune_lr", self.finetune_lr, positive=True)
        _config.non_negative("rho_min", self.rho_min)
        _config.non_negative("rho_max", self.rho_max)
        if self.rho_max < self.rho_min:
            raise ValueError(f"rho_max must be >= rho_min, got rho_max={self.rho_max} < rho_min={self.rho_min}")
        _config.non_negative("finetune_rho", self.finetune_rho)
        _config.choice("criterion", self.criterion, CHANNEL_CRITERIA)
        _config.choice("scope", self.scope, ("layer", "global"))
        _config.count("taylor_batches", self.taylor_batches, 1)


def channel_radii(scores: Dict[str, torch.Tensor], rho_min: float, rho_max: float, scope: str,
                  coupled: Optional[Sequence[Sequence[str]]] = None) -> Dict[str, torch.Tensor]:
    """AdaSAP's rho_i: rho_max for the least important channel, rho_min for the most important.

    The radius of a channel comes from the score of the unit that pruning
    ranks (pruning.channel.coupled_unit_scores): for the layers of a
    ``coupled`` group (channels tied by a residual sum, pruned together by
    the group's mean score) the group's score, so every member gets the
    same radius per channel; for any other layer its own score. s_min /
    s_max are taken over each unit (scope="layer") or all units ("global").
    Where every score is equal nothing singles a channel out: rho_min.
    """
    def radii(s: torch.Tensor, low: torch.Tensor, high: torch.Tensor) -> torch.Tensor:
        if high <= low:
            return torch.full_like(s, rho_min)
        return rho_max - (s - low) / (high - low) * (rho_max - rho_min)

    _config.choice("scope", scope, ("layer", "global"))
    units = coupled_unit_scores({name: s.detach() for name, s in scores.items()}, coupled)
    if scope == "global":
        everything = torch.cat([s for _, s in units])
        per_unit = [radii(s, everything.min(), everything.max()) for _, s in units]
    else:
        per_unit = [radii(s, s.min(), s.max()) for _, s in units]
    out = {}
    for (names, _), rho in zip(units, per_unit):
        for name in names:
            out[name] = rho.to(scores[name].device)
    return {name: out[name] for name in scores}


class AdaSAP(Algorithm):
    """Adaptive per-channel ASAM -> structured channel pruning -> uniform ASAM fine-tuning (module docstring)."""

    config_type = AdaSAPConfig
    name = "adasap"
    data_parallel = True  # SAM steps through DDP; channel scores equal on every rank (see the module docstring)

    def __init__(self, config=None) -> None:
        super().__init__(config)
        self.gates = None
        # Residual-tied layers: traced once per model (a function of its graph, not of its values).
        self._coupled: Optional[Tuple["weakref.ref[nn.Module]", List[List[str]]]] = None

    def phases(self):
        return [("adaptive", self.config.adaptive_epochs), ("finetune", self.config.finetune_epochs)]

    def _compacts(self, phase):
        return phase == "finetune"

    # ----------------------------------------------------------- structure
    def _gate(self, model: nn.Module, loader) -> None:
        # The gates stay on the returned model (its pruned channels output exactly zero); self.gates.remove()
        # takes them off.
        self.gates = gate_pruned_channels(model, example_input(loader).to(model_device(model)))

    def _restructure(self, phase, model, loader):
        sparsify(model)
        if phase == "finetune":
            self._gate(model, loader)

    def _enter(self, phase, model, loader):
        if phase == "adaptive":
            sparsify(model)
            return
        # Phase 2: structured pruning of coupled channel groups by the criterion, then gates.
        example = example_input(loader).to(model_device(model))
        coupled = coupled_channel_groups(model, example)
        if self.config.criterion == "taylor":
            scores = self._taylor_scores(model, loader)
            prune_channels(model, scores, self.config.target_sparsity, scope=self.config.scope, coupled=coupled)
        else:
            channel_prune(model, self.config.target_sparsity, criterion="l2", scope=self.config.scope,
                          coupled=coupled)
        self._gate(model, loader)

    def _taylor_scores(self, model, loader) -> Dict[str, torch.Tensor]:
        """Taylor scores over ``taylor_batches`` of this rank's batches; under torchrun, their mean over the
        ranks weighted by the samples each scored (the same scores on every rank: see the module docstring)."""
        names = [name for name, _ in prunable_layers(model)]
        batches = on_device(loader, model_device(model))
        scored = [0]

        def loss_fn(logits, targets):
            scored[0] += targets.shape[0]  # called once per batch accumulate_taylor uses
            return F.cross_entropy(logits, targets)

        scores = accumulate_taylor(model, batches, loss_fn, num_batches=self.config.taylor_batches, include=names)
        if world().size > 1:
            scores = all_reduce_tensors_mean(scores, weight=scored[0])
        return scores

    def _scores(self, model, loader) -> Dict[str, torch.Tensor]:
        if self.config.criterion == "taylor":
            return self._taylor_scores(model, loader)
        return channel_scores(model, "l2", include=[name for name, _ in prunable_layers(model)])

    # ------------------------------------------------------------ training
    def _optimizer(self, phase, model):
        c = self.config
        if phase == "adaptive":
            optimizer = SAM(model.parameters(), torch.optim.SGD, rho=self._group_rho(), adaptive=c.adaptive,
                            model=model, lr=c.lr, momentum=c.momentum, weight_decay=c.weight_decay)
            return optimizer, [c.lr]
        optimizer = SAM(model.parameters(), torch.optim.SGD, rho=c.finetune_rho, adaptive=c.adaptive, model=model,
                        lr=c.finetune_lr, momentum=c.momentum, weight_decay=c.weight_decay)
        return optimizer, [c.finetune_lr]

    def _group_rho(self) -> float:
        """The radius of the parameters no channel score covers in phase 1 (biases, BatchNorm, classifier)."""
        return self.config.rho_min

    def _refresh_radii(self, model, loader, optimizer) -> Dict[str, float]:
        """Per-channel radii from the channel scores of the weights as they are now; their history columns."""
        # Under torchrun ``model`` is the DDP the epoch trains through: scores, graph tracing and Taylor passes
        # run on the module it wraps (the Taylor hooks want each pass's own gradient, not DDP's average).
        model = unwrap(model)
        layers = dict(prunable_layers(model))
        if self._coupled is None or self._coupled[0]() is not model:
            self._coupled = (weakref.ref(model),
                             coupled_channel_groups(model, example_input(loader).to(model_device(model))))
        radii = channel_radii(self._scores(model, loader), self.config.rho_min, self.config.rho_max,
                              self.config.scope, coupled=self._coupled[1])
        for name, rho in radii.items():
            optimizer.set_channel_rho(layers[name].weight, rho)
        everything = torch.cat([r.cpu() for r in radii.values()])
        return {"rho_mean": float(everything.mean()), "rho_spread": float(everything.max() - everything.min())}

    def _train_epoch(self, phase, epoch, model, loader, optimizer, bar):
        meter = EpochMeter(bar)
        extras = self._refresh_radii(model, loader, optimizer) if phase == "adaptive" else {}
        model.train()
        for x, y in bar:
            loss, logits = sam_step(model, x, y, optimizer, cross_entropy_loss, self.step)
            self.step += 1
            meter.add(len(y), logits, y, loss=loss)
        return {**meter.means(), **extras}

    def _sparsity(self, model):
        return channel_sparsity(model)

    def _summary(self, model, loader):
        example = example_input(loader).to(model_device(model))
        compact, report = compact_channels(model, example)
        summary = {"channel_sparsity": channel_sparsity(model), "weight_sparsity": global_sparsity(model),
                   "params_dense": report.params_before, "params_compact": report.params_after,
                   "macs_dense": report.macs_before, "macs_compact": report.macs_after,
                   "param_ratio": report.param_ratio, "macs_ratio": report.macs_ratio,
                   "compact_max_abs_diff": report.max_abs_diff}
        return summary, compact
