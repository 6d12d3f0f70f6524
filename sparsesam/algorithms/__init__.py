"""The algorithms: AdaSAP, HARP and C-SAM, and the baselines they are compared with.

Each is a class built from its dataclass config, with one method::

    result = ALGORITHMS["harp"](HARPConfig(target_sparsity=0.9)).fit(model, train_loader, val_loader=test_loader)
    result.model, result.history, result.summary

fit() sparsifies the model in place, returns a FitResult (one finite-valued
dict per epoch in history), and resumes exactly from a checkpoint object
(``load() -> Optional[dict]``, ``save(state)``; see base.py).
"""
from typing import Dict

from .adasap import AdaSAP, AdaSAPConfig, channel_radii
from .asam_prune import AsamPrune, AsamPruneConfig
from ._steps import LOSSES, make_loss
from .base import Algorithm, FitResult
from .csam import CSAM, CSAMConfig, binarize_top_k, magnitude_soft_mask
from .harp import HARP, HARPConfig, LearnableRate, rate_init
from .hydra import Hydra, HydraConfig
from .magnitude import Magnitude, MagnitudeConfig
from .sam_prune import SamPrune, SamPruneConfig

ALGORITHMS: Dict[str, type] = {
    "adasap": AdaSAP,
    "harp": HARP,
    "csam": CSAM,
    "magnitude": Magnitude,
    "hydra": Hydra,
    "sam_prune": SamPrune,
    "asam_prune": AsamPrune,
}

__all__ = [
    "ALGORITHMS", "Algorithm", "FitResult", "LOSSES", "make_loss",
    "AdaSAP", "AdaSAPConfig", "channel_radii",
    "HARP", "HARPConfig", "LearnableRate", "rate_init",
    "CSAM", "CSAMConfig", "magnitude_soft_mask", "binarize_top_k",
    "Hydra", "HydraConfig", "Magnitude", "MagnitudeConfig", "SamPrune", "SamPruneConfig",
    "AsamPrune", "AsamPruneConfig",
]
