"""Baseline HYDRA (Sehwag et al., NeurIPS 2020): score masks with one uniform rate per layer, then fine-tuning.

Every prunable layer keeps the same fraction ``1 - target_sparsity`` of its
weights (GetSubnet's count), of its output channels (one score per
channel), or n of every m, chosen by scores initialised from |w| (HYDRA's
scaled init) and trained with frozen weights under the adversarial (or
clean) loss; then the weights are fine-tuned under that loss with the
masks fixed. The rates are fixed: only the scores learn in the search.
"""
from __future__ import annotations

from dataclasses import dataclass

from ._score_pruning import ScorePruning, ScorePruningConfig


@dataclass
class HydraConfig(ScorePruningConfig):
    pass


class Hydra(ScorePruning):
    """HYDRA: uniform per-layer rates; see the module docstring."""

    config_type = HydraConfig
    name = "hydra"

    def _make_rates(self, layers):
        return {name: self.keep_target for name, _ in layers}
