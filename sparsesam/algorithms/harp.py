"""HARP: Holistic Adversarially Robust Pruning (Zhao & Wressnegger, ICLR 2023), as intellisec/harp runs it.

HARP learns per layer both *how many* weights (or channels) to keep and
*which*. The pruning stage (``harp_prune``) freezes the conv / linear
weights and biases and trains, with one SGD (lr 0.1, momentum 0.9, weight
decay 5e-4, cosine; configs/config-cifar10.yml) over all of them:

* the scores s of every scored layer (HYDRA's scaled init from |w|): the
  mask keeps the top-k_l of |s| (GetSubnet, straight-through);
* one rate parameter per layer, ``k_l = sigmoid(p_l) * (1 - k_min) + k_min``
  (utils/utils.py rate_act_func) with ``k_min = alpha * k``, alpha = 0.1
  (args.py), k the target keep rate; p_l starts at rate_init_func of the
  initial strategy (below) and gets the mask's summed gradient sum(dL/dM);
* the BatchNorm affine parameters (utils/model.py freeze_vars leaves
  BatchNorm alone unless --freeze-bn), and BatchNorm's statistics update.

The loss is the adversarial loss (PGD-AT, TRADES or MART) plus
``gamma * L_hw`` (trainer/adv.py, utils/hw.py):

    L_hw = max(0, current_rate / target_rate - 1),

current_rate the fraction of the scored layers' parameters the rates keep
(unstructured) or of the network's FLOPs (channel; _hardware_cost.py).
gamma = (epoch + 1) * gamma0 (gamma0 = 0.01, the README's CIFAR command)
until the end of the first epoch after which L_hw rounds (4 decimals) to 0;
gamma is then frozen at that epoch's value for the rest of the search
(train.py's frozen_gamma). The target is reached through the loss only:
nothing rescales the rates afterwards, so a search too short for gamma to
grow enough ends above the target -- the history's kept / hw_loss / gamma
per epoch and the summary's learnt_keep_rates show it.

Initial strategy: every layer starts at one keep rate (the official
``*_uni`` strategies of configs/strategies.json with --rate-stg-init):
initial_keep, by default ``min(1, 10 k)`` -- the README's pairing of the
``010_uni`` strategy (10% kept) with the target k = 0.01 -- so L_hw > 0 at
the start. Then the masks are fixed (the learnt scores' top-k_l) and the
weights fine-tuned under the same loss (``harp_finetune``: lr 0.1, cosine,
100 epochs). Granularities: unstructured, channel (one score per output
channel) and N:M (the rate is n/m: only the scores learn, no L_hw).

Deviations kept, with their reasons:

* channel masks remove output channels (the official ones, input
  channels): sparsesam's channel masks, compaction and sparse forms work on
  output channels. So the classifier is not scored (its outputs are the
  classes), the first conv's image channels are never pruned, and there is
  no map_shortcut_rate (see _hardware_cost.py for the FLOPs indexing);
* a layer keeps at least one weight / channel (kept_count), where
  GetSubnet can keep none;
* the default epochs are the official ones (20 + 100); the demo and the
  study set their own through the config.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, List, Optional

import torch
from torch import nn

from ..nn import masked_layers
from ..pruning import score_parameters
from . import _config
from ._hardware_cost import HardwareCost, trace_layer_shapes
from ._score_pruning import ScorePruning, ScorePruningConfig
from .base import example_input, model_device

# rate_init_func keeps the sigmoid's argument inside [-1 + 1e-2, 1 - 1e-2].
_RATE_INIT_CLIP = 1e-2


@dataclass
class HARPConfig(ScorePruningConfig):
    finetune_epochs: int = 100         # README: harp_finetune --epochs 100 (pruning: 20)
    finetune_lr: float = 0.1           # configs/config-cifar10.yml lr, both stages
    gamma: float = 0.01                # gamma0 of gamma = (epoch + 1) * gamma0 (README, CIFAR)
    alpha: float = 0.1                 # k_min = alpha * k (args.py)
    initial_keep: Optional[float] = None  # the uniform start; None: min(1, 10 k)
    hardware_cost: str = "auto"        # "auto": params (unstructured) / flops (channel), as the official code

    def check(self) -> None:
        super().check()
        _config.non_negative("gamma", self.gamma, positive=True)
        _config.fraction("alpha", self.alpha)
        if self.alpha == 0:
            raise ValueError("alpha must be in (0, 1), got 0 (k_min = alpha * k must be > 0)")
        if self.initial_keep is not None:
            _config.fraction("initial_keep", self.initial_keep, high_open=False)
            k_min = self.alpha * (1.0 - self.target_sparsity)
            if self.initial_keep <= k_min:
                raise ValueError(f"initial_keep must be > k_min = alpha * (1 - target_sparsity) = {k_min}, "
                                 f"got {self.initial_keep}")
        _config.choice("hardware_cost", self.hardware_cost, ("auto", "params", "flops"))
        if self.hardware_cost == "flops" and self.granularity != "channel":
            raise ValueError("hardware_cost='flops' counts channels: it needs granularity='channel' "
                             f"(got {self.granularity!r}); unstructured rates count parameters")


def rate_init(rate: float, k_min: float) -> float:
    """utils/utils.py rate_init_func: the p with ``sigmoid(p) (1 - k_min) + k_min = rate``, clipped as there."""
    u = (rate - k_min) / (1.0 - k_min)
    u = min(max(u, -1.0 + _RATE_INIT_CLIP), 1.0 - _RATE_INIT_CLIP)
    if u <= 0:
        raise ValueError(f"rate must be > k_min = {k_min}, got {rate}")
    return math.log(u / (1.0 - u))


class LearnableRate(nn.Module):
    """``k = sigmoid(p) * (1 - k_min) + k_min`` (rate_act_func): a keep rate in [k_min, 1], p a float32 scalar."""

    def __init__(self, initial: float, k_min: float) -> None:
        super().__init__()
        self.k_min = float(k_min)
        self.p = nn.Parameter(torch.zeros(()))
        self.set_rate(initial)

    @torch.no_grad()
    def set_rate(self, rate: float) -> None:
        self.p.fill_(rate_init(rate, self.k_min))

    def forward(self) -> torch.Tensor:
        return torch.sigmoid(self.p) * (1.0 - self.k_min) + self.k_min


class HARP(ScorePruning):
    """HARP: learnt per-layer rates and scores under an adversarial loss + gamma L_hw; see the module docstring."""

    config_type = HARPConfig
    name = "harp"

    def __init__(self, config=None) -> None:
        super().__init__(config)
        self.cost: Optional[HardwareCost] = None
        self.frozen_gamma: Optional[float] = None
        self.learnt_rates: Dict[str, float] = {}  # the rates the search ended with

    @property
    def learns_rates(self) -> bool:
        return self.config.granularity != "nm"

    @property
    def k_min(self) -> float:
        return self.config.alpha * self.keep_target

    @property
    def initial_keep(self) -> float:
        c = self.config
        return min(1.0, 10.0 * self.keep_target) if c.initial_keep is None else c.initial_keep

    @property
    def cost_kind(self) -> str:
        c = self.config
        if c.hardware_cost != "auto":
            return c.hardware_cost
        return "flops" if c.granularity == "channel" else "params"

    def _make_rates(self, layers):
        if not self.learns_rates:
            return {}
        return {name: LearnableRate(self.initial_keep, self.k_min) for name, _ in layers}

    def _restructure(self, phase, model, loader):
        super()._restructure(phase, model, loader)
        if phase == "search" and self.learns_rates:
            self.cost = self._hardware_cost(model, loader)

    def _hardware_cost(self, model: nn.Module, loader) -> HardwareCost:
        scored = [name for name, _ in self.scored_layers(model)]
        counted = list(scored)
        if self.cost_kind == "flops":
            # Every conv / linear of the network counts (the unscored classifier too, as hw_flops_loss's last FC).
            counted = [name for name, _ in masked_layers(model)]
        shapes = trace_layer_shapes(model, example_input(loader).to(model_device(model)), counted)
        return HardwareCost(self.cost_kind, shapes, scored)

    # ------------------------------------------------------------ the loss
    def current_rate(self) -> torch.Tensor:
        """The fraction of the cost the current rates keep (differentiable in the rates)."""
        return self.cost.kept({name: rate() for name, rate in self.rates.items()})

    def target_rate(self) -> float:
        return self.cost.target(self.keep_target)

    def hardware_loss(self) -> torch.Tensor:
        """``max(0, current_rate / target_rate - 1)`` (utils/hw.py)."""
        return torch.relu(self.current_rate() / self.target_rate() - 1.0)

    def gamma(self, epoch: int) -> float:
        """train.py / utils/hw.py: the frozen gamma once L_hw reached 0, else (epoch + 1) * gamma0."""
        return self.frozen_gamma if self.frozen_gamma is not None else (epoch + 1) * self.config.gamma

    def _has_regulariser(self) -> bool:
        return self.learns_rates

    def _regulariser(self, epoch):
        return self.gamma(epoch) * self.hardware_loss()

    def _epoch_extras(self, phase, epoch):
        if not self.learns_rates:
            return {}
        gamma = self.gamma(epoch)
        with torch.no_grad():
            current = float(self.current_rate())
            loss = float(self.hardware_loss())
        if round(loss, 4) == 0.0:  # train.py: np.round(loss_hw, 4) == 0 freezes gamma at this epoch's value
            self.frozen_gamma = gamma
        return {"gamma": gamma, "kept": current, "hw_loss": loss, "target": self.target_rate()}

    # ------------------------------------------------------------ training
    def _search_parameters(self, model) -> List[nn.Parameter]:
        batch_norm = [p for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
                      for p in m.parameters(recurse=False)]
        return [*score_parameters(model), *(rate.p for rate in self.rates.values()), *batch_norm]

    def _optimizer(self, phase, model):
        c = self.config
        if phase != "search":
            return super()._optimizer(phase, model)
        # utils/schedules.py get_optimizer: one SGD over every trainable parameter, weight decay on all.
        optimizer = torch.optim.SGD(self._search_parameters(model), lr=c.score_lr, momentum=c.momentum,
                                    weight_decay=c.weight_decay)
        return optimizer, [c.score_lr]

    def _before_freeze(self, model):
        if self.learns_rates:
            with torch.no_grad():
                self.learnt_rates = {name: float(rate()) for name, rate in self.rates.items()}

    def _state(self):
        return {"learnt_rates": dict(self.learnt_rates), "frozen_gamma": self.frozen_gamma}

    def _load_state(self, state):
        self.learnt_rates = dict(state["learnt_rates"])
        self.frozen_gamma = state["frozen_gamma"]

    def _summary(self, model, loader):
        summary, compact = super()._summary(model, loader)
        if self.learnt_rates:
            summary["learnt_keep_rates"] = dict(self.learnt_rates)
        if self.frozen_gamma is not None:
            summary["frozen_gamma"] = self.frozen_gamma
        return summary, compact
