"""HARP: Holistic Adversarially Robust Pruning (ICLR 2023), on HYDRA's score masks.

HARP learns per layer both *how many* parameters to keep and *which*.
Weights are frozen; each prunable layer has scores s (initialised from |w|)
whose top-r_l fraction is its mask (straight-through estimator), and a
learnable rate

    r_l = sigmoid(p_l) * (1 - r_min) + r_min,    r_min = 0.1 * k_target,

started at k_target = 1 - target_sparsity. The loss is the adversarial loss
(PGD-AT, TRADES or MART) plus ``gamma_t * L_hw`` with

    L_hw = max(0, kept / k_target - 1),

kept being the fraction of the scored layers' parameters (or FLOPs,
``hardware_cost="flops"``) the rates keep. The rates get the mask's total
gradient through the straight-through estimator (keeping more helps the
loss or not) and L_hw's. gamma_t grows step-wise: the search epochs are
split into len(gamma_steps) equal stages (robustness first with a small
gamma, then reaching the target rate, then both).

L_hw only bounds kept from above, so at the end of the search the rates are
rescaled by one common factor (clipped to [r_min, 1]) so that kept equals
k_target: the result has exactly the target sparsity, distributed over the
layers as HARP learnt it. Then the masks are fixed and the weights
fine-tuned adversarially. Granularities: unstructured, channel (ranked by
the channel's summed |s|) and N:M (the rate is n/m: only the scores learn).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, Tuple

import torch
from torch import nn

from ..pruning import score_parameters
from . import _config
from ._score_pruning import ScorePruning, ScorePruningConfig
from .base import example_input, model_device


@dataclass
class HARPConfig(ScorePruningConfig):
    rate_lr: float = 0.01
    hardware_cost: str = "params"    # what L_hw counts: "params" or "flops"
    gamma_steps: Tuple[float, ...] = (0.1, 1.0, 10.0)

    def check(self) -> None:
        super().check()
        _config.non_negative("rate_lr", self.rate_lr, positive=True)
        _config.choice("hardware_cost", self.hardware_cost, ("params", "flops"))
        if not isinstance(self.gamma_steps, (tuple, list)) or not self.gamma_steps:
            raise ValueError(f"gamma_steps must be a non-empty sequence of numbers, got {self.gamma_steps!r}")
        for gamma in self.gamma_steps:
            _config.non_negative("gamma_steps", gamma)
        if any(b < a for a, b in zip(self.gamma_steps, self.gamma_steps[1:])):
            raise ValueError(f"gamma_steps must not decrease (a step-wise growing schedule), got {self.gamma_steps}")


class LearnableRate(nn.Module):
    """``r = sigmoid(p) * (1 - r_min) + r_min``: a keep rate in [r_min, 1] with a free parameter p."""

    def __init__(self, initial: float, r_min: float) -> None:
        super().__init__()
        self.r_min = float(r_min)
        self.p = nn.Parameter(torch.zeros((), dtype=torch.float64))
        self.set_rate(initial)

    @torch.no_grad()
    def set_rate(self, rate: float) -> None:
        # sigmoid is never exactly 0 or 1: keep the inverse finite.
        u = min(max((rate - self.r_min) / (1.0 - self.r_min), 1e-9), 1.0 - 1e-9)
        self.p.fill_(math.log(u / (1.0 - u)))

    def forward(self) -> torch.Tensor:
        return torch.sigmoid(self.p) * (1.0 - self.r_min) + self.r_min


def rescale_rates(rates: Dict[str, float], costs: Dict[str, float], keep: float, r_min: float) -> Dict[str, float]:
    """One factor a for all layers with ``sum clip(a r_l, r_min, 1) c_l = keep * sum c_l`` (bisection)."""
    total = sum(costs.values())

    def kept(a: float) -> float:
        return sum(min(max(a * rates[n], r_min), 1.0) * costs[n] for n in rates) / total

    low, high = 0.0, 1.0 / max(min(rates.values()), 1e-12)
    for _ in range(200):
        mid = 0.5 * (low + high)
        low, high = (mid, high) if kept(mid) < keep else (low, mid)
    a = 0.5 * (low + high)
    return {n: min(max(a * r, r_min), 1.0) for n, r in rates.items()}


class HARP(ScorePruning):
    """HARP: learnt per-layer rates and scores under an adversarial loss + gamma_t L_hw; see the module docstring."""

    config_type = HARPConfig
    name = "harp"

    def __init__(self, config=None) -> None:
        super().__init__(config)
        self.costs: Dict[str, float] = {}
        self.learnt_rates: Dict[str, float] = {}  # the rates the search ended with, before rescaling to the target

    @property
    def learns_rates(self) -> bool:
        return self.config.granularity != "nm"

    def _make_rates(self, layers):
        if not self.learns_rates:
            return {}
        r_min = 0.1 * self.keep_target
        return {name: LearnableRate(self.keep_target, r_min) for name, _ in layers}

    def _restructure(self, phase, model, loader):
        super()._restructure(phase, model, loader)
        if phase == "search":
            self.costs = self._layer_costs(model, loader)

    @torch.no_grad()
    def _layer_costs(self, model: nn.Module, loader) -> Dict[str, float]:
        """Each scored layer's parameters, or its multiply-accumulates per example (weights x output positions)."""
        layers = self.scored_layers(model)
        if self.config.hardware_cost == "params":
            return {name: float(layer.weight.numel()) for name, layer in layers}
        positions: Dict[str, float] = {}
        hooks = [layer.register_forward_hook(
            lambda module, inputs, output, name=name: positions.__setitem__(name, float(output[0, 0].numel())))
            for name, layer in layers]
        was_training = model.training
        model.eval()
        try:
            model(example_input(loader).to(model_device(model)))
        finally:
            model.train(was_training)
            for hook in hooks:
                hook.remove()
        return {name: float(layer.weight.numel()) * positions[name] for name, layer in layers}

    def kept_fraction(self) -> torch.Tensor:
        """The fraction of the scored layers' cost the current rates keep (differentiable in the rates)."""
        total = sum(self.costs.values())
        return sum(rate() * (self.costs[name] / total) for name, rate in self.rates.items())

    def gamma(self, epoch: int) -> float:
        steps = self.config.gamma_steps
        stage = min(len(steps) - 1, epoch * len(steps) // max(self.config.search_epochs, 1))
        return float(steps[stage])

    def _has_regulariser(self) -> bool:
        return self.learns_rates

    def _regulariser(self, epoch):
        hardware_loss = torch.relu(self.kept_fraction() / self.keep_target - 1.0)
        return self.gamma(epoch) * hardware_loss

    def _epoch_extras(self, phase, epoch):
        if not self.learns_rates:
            return {}
        with torch.no_grad():
            kept = float(self.kept_fraction())
        return {"gamma": self.gamma(epoch), "kept": kept, "hw_loss": max(0.0, kept / self.keep_target - 1.0)}

    def _optimizer(self, phase, model):
        c = self.config
        if phase != "search" or not self.learns_rates:
            return super()._optimizer(phase, model)
        rate_params = [rate.p for rate in self.rates.values()]
        optimizer = torch.optim.SGD([
            {"params": score_parameters(model), "lr": c.score_lr, "weight_decay": c.weight_decay},
            {"params": rate_params, "lr": c.rate_lr, "weight_decay": 0.0},
        ], lr=c.score_lr, momentum=c.momentum)
        return optimizer, [c.score_lr, c.rate_lr]

    def _search_parameters(self, model):
        return [*score_parameters(model), *(rate.p for rate in self.rates.values())]

    def _before_freeze(self, model):
        if not self.learns_rates:
            return
        with torch.no_grad():
            learnt = {name: float(rate()) for name, rate in self.rates.items()}
        r_min = 0.1 * self.keep_target
        for name, value in rescale_rates(learnt, self.costs, self.keep_target, r_min).items():
            self.rates[name].set_rate(value)
        self.learnt_rates = learnt

    def _state(self):
        return {"learnt_rates": dict(self.learnt_rates)}

    def _load_state(self, state):
        self.learnt_rates = dict(state["learnt_rates"])

    def _summary(self, model, loader):
        summary, compact = super()._summary(model, loader)
        if self.learnt_rates:
            summary["learnt_keep_rates"] = dict(self.learnt_rates)
        return summary, compact
